"""Others' share of the CPU while a figure is timed, and speed timed in turn with the baseline."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from compress.model import ASSETS
from compress.verify.cpu_share import CpuShare, others_share
from compress.verify.isolated import KeptServer, interleaved_speed, measure_and_time_in_turn, measure_in_subprocess


def test_others_share_is_their_cpu_seconds_over_all_cores_time():
    assert others_share(1.0, 1.0, cores=2) == 0.5  # another job held one of two cores throughout
    assert others_share(-0.01, 1.0, cores=2) == 0.0 and others_share(1.0, 0.0, cores=2) == 0.0


def test_a_process_spinning_beside_the_window_is_counted_and_our_own_work_is_not():
    cores = os.cpu_count() or 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load = CpuShare()
        with load.window():
            time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert load.share > 0.6 / cores  # one core of `cores` (less /proc/stat's 10 ms ticks)
    own = CpuShare()
    with own.window():
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            pass
    assert own.share < load.share


@pytest.mark.slow
def test_interleaved_speed_times_both_models_and_records_their_load(tmp_path):
    windows = tmp_path / "windows.npz"
    np.savez(windows, windows=np.zeros((2, 16), dtype=np.int64), prompt=np.arange(1, 17, dtype=np.int64))
    job = {"artifact": str(ASSETS / "tiny-phi4-mini"), "runtime": "transformers", "target": "cpu", "windows": str(windows),
           "new_tokens": 8}
    speeds = interleaved_speed({"baseline": job, "artifact": job}, tmp_path / "jobs", 16, 8, 3)
    for figures in speeds.values():
        assert figures["decode_tps"] > 0 and figures["speed_runs"] == 3 and 0 <= figures["others_cpu"] <= 1
    assert (tmp_path / "jobs" / "artifact-speed.log").is_file()


@pytest.mark.slow
def test_an_artifact_measured_in_the_process_that_times_it_has_the_figures_it_has_alone(tmp_path):
    """measure_and_time_in_turn (the pipeline's path where the baseline fits beside the artifact) against the
    worker on its own: the same accuracy and generations, plus speed figures for both models."""
    windows = tmp_path / "windows.npz"
    tokens = np.random.default_rng(0).integers(3, 500, (2, 32))
    np.savez(windows, windows=tokens, prompt=np.arange(1, 17, dtype=np.int64))
    model = str(ASSETS / "tiny-phi4-mini")
    job = {"artifact": model, "runtime": "transformers", "target": "cpu", "windows": str(windows), "top_k": 8,
           "new_tokens": 8, "speed_runs": 3, "prompts": [[1, 2, 3]], "stop_ids": [], "generation_tokens": 4}
    measure_in_subprocess({**job, "write_reference": str(tmp_path / "reference.npz"), "skip_speed": True}, tmp_path / "ref", "cpu")
    scored = {**job, "reference": str(tmp_path / "reference.npz")}
    alone = measure_in_subprocess({**scored, "skip_speed": True}, tmp_path / "alone", "cpu")
    with KeptServer(job, tmp_path / "baseline", "baseline-speed") as baseline:
        together, speeds = measure_and_time_in_turn(scored, baseline.get(), tmp_path / "together", 16, 8, 3)
        server = baseline.get()
        again, _ = measure_and_time_in_turn(scored, baseline.get(), tmp_path / "again", 16, 8, 3)
        assert baseline.get() is server and server.process.poll() is None  # one baseline process for both
    assert server.process.poll() is not None  # closed with the block
    for key in ("ppl", "kld", "top1"):
        assert together["metrics"][key] == pytest.approx(alone["metrics"][key], rel=1e-6), key
        assert again["metrics"][key] == pytest.approx(alone["metrics"][key], rel=1e-6), key
    assert together["metrics"]["kld"] < 1e-6 and together["continuations"] == alone["continuations"]
    assert "decode_tps" not in together["metrics"]  # timed in turn, not alone
    assert speeds["artifact"]["decode_tps"] > 0 and speeds["baseline"]["decode_tps"] > 0
