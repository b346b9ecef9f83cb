"""report.md and the terminal summary from hand-built reports: what a new user reads first. Pure: no model runs."""

import io

from rich.console import Console

from compress.quantize.plan import resolve_plan
from compress.report import print_summary, render_markdown, summary_rows

PHI4_LAYERS = [f"model.layers.{i}.{part}" for i in range(40)
               for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")] + ["lm_head"]


def _metrics(kld: float, tps: float, **extra) -> dict:
    return {"ppl": 10.0, "kld": kld, "kld_se": 0.001, "top1": 0.95, "decode_tps": tps, "prefill_tps": 10 * tps,
            "decode_speedup": tps / 100, **extra}


def _variant(name: str, size: int, kld: float, tps: float, plan: dict | None = None, **extra) -> dict:
    return {"name": name, "method": "rtn", "format": "onnx", "runtime": "onnxruntime-genai", "path": f"release/{name}",
            "released": True, "not_released_because": [], "size_bytes": size, "bits_per_weight": 4.5,
            "bits_per_weight_all": 5.0, "layer_plan": plan, "layer_bits": None,
            "targets": {"cpu": {"status": "pass", "failures": [], "metrics": _metrics(kld, tps, **extra), "environment": {}},
                        "cuda": {"status": "not-verified", "failures": ["no CUDA device on this machine"], "metrics": {},
                                 "environment": {}}}}


def make_report(variants: list[dict], baseline_cpu: dict | None = None) -> dict:
    return {
        "recipe": "hand-built", "model": "builtin:tiny", "model_parameters": 3.3e6,
        "evaluation": {"windows": 32, "seq_len": 256, "dataset": "builtin:pydoc-eval", "speed_runs": 3,
                       "new_tokens": 32, "prompt_tokens": 64},
        "gates": {}, "kld_note": "KLD keeps the top 64.",
        "baseline": {"size_bytes": 4 * 2**20, "targets": {
            "cpu": {"ppl": 9.9, "decode_tps": 100.0, "status": "measured", "environment": {}, **(baseline_cpu or {})},
            "cuda": {"status": "not-verified", "reason": "no CUDA device on this machine"}}},
        "variants": variants, "versions": {"compress": "0.1.0"}, "data": {},
    }


def test_an_absent_target_is_one_line_not_a_row_of_dashes_per_artifact():
    report = make_report([_variant("a", 2**20, 0.02, 150), _variant("b", 2 * 2**20, 0.01, 120)])
    assert [(row["name"], row["target"]) for row, _ in summary_rows(report)] == [("baseline", "cpu"), ("a", "cpu"), ("b", "cpu")]
    markdown = render_markdown(report)
    assert markdown.count("no CUDA device") == 1
    assert "- cuda: not verified for any artifact — no CUDA device on this machine" in markdown
    console = Console(file=io.StringIO(), width=200)
    print_summary(report, console)
    assert console.file.getvalue().count("no CUDA device") == 1


def test_layer_plans_are_printed_as_runs_with_the_full_plan_left_in_json():
    plan = resolve_plan(PHI4_LAYERS, 4, ["lm_head"], [])
    plan.update({name: 8 for name in plan if name.endswith("down_proj")})
    markdown = render_markdown(make_report([_variant("mixed", 2**20, 0.02, 150, plan)]))
    assert "  - layers 0–39: qkv_proj, o_proj, gate_up_proj 4 bits; down_proj 8 bits\n  - lm_head kept" in markdown
    assert "model.layers.0" not in markdown and len(markdown.splitlines()) < 40


def test_the_recommendation_states_its_rule_and_names_smallest_and_fastest():
    # "small" is 3% smaller than "good" at five times its KLD: "good" is recommended, "small" named as smallest
    report = make_report([_variant("small", 1000 * 2**10, 0.05, 150), _variant("good", 1030 * 2**10, 0.01, 120),
                          _variant("fast", 3000 * 2**10, 0.009, 300)])
    markdown = render_markdown(report)
    assert "- Recommended: good (onnx):" in markdown and "at most 1.1× its size." in markdown
    assert "- Smallest: small (onnx):" in markdown and "- Fastest: fast (onnx):" in markdown


def test_speeds_taken_under_load_are_flagged_and_so_are_ratios_built_on_them():
    quiet = _variant("quiet", 2**20, 0.02, 150, others_cpu=0.05, baseline_others_cpu=0.05, speed_interleaved=True)
    busy = _variant("busy", 2**20, 0.02, 3000, others_cpu=0.45, baseline_others_cpu=0.05, speed_interleaved=True)
    loaded_base = _variant("base-busy", 2**20, 0.02, 150, others_cpu=0.05, baseline_others_cpu=0.6, speed_interleaved=True)
    report = make_report([quiet, busy, loaded_base], baseline_cpu={"others_cpu": 0.31})
    table = {row["variant"]: row for row in _table_rows(render_markdown(report))}
    assert table["quiet"]["tok/s"] == "150" and table["quiet"]["× base"] == "1.50"
    assert table["busy"]["tok/s"] == "3000 †" and table["busy"]["× base"] == "30.00 †"
    assert table["base-busy"]["tok/s"] == "150" and table["base-busy"]["× base"] == "1.50 †"
    assert table["baseline"]["tok/s"] == "100 †"
    markdown = render_markdown(report)
    assert "more than 20% of the machine's CPU (baseline on cpu 31%, busy (onnx) on cpu 45%, base-busy (onnx) on cpu 60%)" in markdown
    assert "timed apart from the baseline" not in markdown


def test_a_speedup_not_timed_in_turn_with_the_baseline_says_so():
    apart = _variant("apart", 2**20, 0.02, 150, others_cpu=0.0, speed_interleaved=False)
    assert "timed apart from the baseline instead: apart (onnx, cpu)" in render_markdown(make_report([apart]))


def _table_rows(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


def test_when_every_speed_was_taken_under_load_the_note_gives_the_range():
    report = make_report([_variant("a", 2**20, 0.02, 150, others_cpu=0.5), _variant("b", 2**20, 0.02, 150, others_cpu=0.77)],
                         baseline_cpu={"others_cpu": 0.31})
    assert "more than 20% of the machine's CPU (every speed here: 31%–77%)" in render_markdown(report)
