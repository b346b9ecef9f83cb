"""Preflight's calibration time: each part scales with what it counts, the machine's rate scales all of them,
the estimate stays near what benchmarks/awq.py measured on the machine the constants come from, and
`compress run` says it before calibrating."""

import json
from pathlib import Path

import pytest

from compress import timing
from compress.memory import Shapes

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
WIDTHS = {"phi4-mini": (3072, 8192, 24, 8), "phi4": (5120, 17920, 40, 10)}


def shapes(width: str) -> Shapes:
    hidden, intermediate, heads, kv_heads = WIDTHS[width]
    return Shapes(hidden, intermediate, heads, kv_heads, 128, 200064, 1, True, 0, 0, 2)


def test_each_part_scales_with_what_it_counts():
    mini = shapes("phi4-mini")
    few, many = timing.layer_time(mini, "gptq", 1024, 128), timing.layer_time(mini, "gptq", 4096, 128)
    assert many.passes == pytest.approx(4 * few.passes) and many.method == few.method and many.layer == few.layer
    awq, gptq, both = (timing.layer_time(mini, method, 1024, 128) for method in ("awq", "gptq", "awq-gptq"))
    assert both.method == pytest.approx(awq.method + gptq.method) and both.passes > max(awq.passes, gptq.passes)
    assert timing.layer_time(mini, "rtn", 0, 128).passes == 0
    slower = timing.layer_time(mini, "awq", 1024, 128, rate=timing.REFERENCE_RATE / 2)
    assert slower.total == pytest.approx(2 * awq.total)
    without_amx = timing.layer_time(mini, "awq", 1024, 128, amx=False)
    assert without_amx.method > awq.method and without_amx.passes > awq.passes
    assert timing.layer_time(mini, "gptq", 1024, 128, amx=False) == gptq  # GPTQ never uses bfloat16
    assert timing.layer_time(shapes("phi4"), "awq", 1024, 128).method > 3 * awq.method


def measured_rows() -> list[dict]:
    rows = []
    for path in sorted(RESULTS.glob("*-awq-*.json")):
        rows += json.loads(path.read_text()).get("awq", {}).get("rows", [])
    return rows


@pytest.mark.parametrize("row", measured_rows(), ids=lambda row: f"{row['width']}-{row['tokens']}-{row['method']}")
def test_the_estimate_is_near_what_the_benchmark_measured(row):
    """On the reference machine (2 Xeon cores with AMX), within 30% of every measured layer: both methods,
    both widths, both calibration sizes."""
    samples, seq_len = (int(n) for n in row["tokens"].split("x"))
    estimate = timing.layer_time(shapes(row["width"]), row["method"], samples * seq_len, seq_len)
    assert estimate.total == pytest.approx(row["layer_seconds"], rel=0.3)
    if row["method"] == "awq":
        assert estimate.method == pytest.approx(row["search_seconds"], rel=0.3)


def test_durations_read_as_people_say_them():
    assert [timing.describe(seconds) for seconds in (12, 600, 4 * 3600)] == ["12 s", "10 min", "4.0 h"]


def test_the_machine_rate_is_a_rate():
    assert 1e8 < timing.machine_rate(size=256, tries=2) < 1e14


@pytest.mark.slow
def test_preflight_says_how_long_calibration_takes(demo_run):
    _out, result = demo_run
    lines = [line for line in result.stdout.splitlines() if "time, calibrating" in line]
    assert any("gptq-w4g128" in line for line in lines) and any("AWQ's search" in line for line in lines), result.stdout
    assert all("GFLOP/s" in line for line in lines)
