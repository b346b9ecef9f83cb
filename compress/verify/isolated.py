"""Run verify/worker.py in a fresh process for one (model folder, target) and read back its figures; or two
workers side by side that time their models in turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from compress import interrupts
from compress.verify.cpu_share import others_share
from compress.verify.speed import speed_figures


class MeasurementError(RuntimeError):
    """The worker failed; the message is the last line it printed."""


ENVIRONMENT = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def measure_in_subprocess(job: dict, job_dir: Path, name: str) -> dict:
    """Write the job, run the worker, return its result. The worker's log is kept beside the job."""
    interrupts.check()
    job_file, log_file = _write_job(job, job_dir, name)
    with log_file.open("w") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "compress.verify.worker", str(job_file)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENVIRONMENT}, check=False,
        )
    if completed.returncode != 0:
        raise _failure(log_file, f"exit code {completed.returncode}")
    return json.loads(Path(job_dir / f"{name}.result.json").read_text())


def interleaved_speed(jobs: dict[str, dict], job_dir: Path, prompt_tokens: int, new_tokens: int, runs: int) -> dict[str, dict]:
    """Speed figures of each job's folder, its runs taken in turn with the others' (baseline, artifact, baseline,
    artifact…), each model in a process of its own, so that a ratio of two of them sees the same load."""
    processes: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, job in jobs.items():
            job_file, log_file = _write_job(job, job_dir, f"{name}-speed")
            with log_file.open("w") as log:
                processes[name] = (subprocess.Popen(
                    [sys.executable, "-m", "compress.verify.worker", str(job_file), "--serve-speed"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, env={**os.environ, **ENVIRONMENT}, text=True), log_file)
        for name in jobs:
            _answer(*processes[name])  # loaded and warmed up
        timings: dict[str, list[dict]] = {name: [] for name in jobs}
        for _ in range(runs):
            for name in jobs:
                interrupts.check()
                process, log_file = processes[name]
                process.stdin.write("run\n")
                process.stdin.flush()
                timings[name].append(_answer(process, log_file))
    finally:
        for process, _ in processes.values():
            process.stdin.close()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    return {name: {**speed_figures([t["prefill_s"] for t in taken], [t["decode_s"] for t in taken], prompt_tokens, new_tokens),
                   "others_cpu": others_share(sum(t["others_seconds"] for t in taken), sum(t["wall_seconds"] for t in taken))}
            for name, taken in timings.items()}


def _write_job(job: dict, job_dir: Path, name: str) -> tuple[Path, Path]:
    """The job file (its result named beside it) and where its log goes."""
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file = job_dir / f"{name}.job.json"
    job_file.write_text(json.dumps({**job, "result": str(job_dir / f"{name}.result.json")}, indent=2))
    return job_file, job_dir / f"{name}.log"


def _answer(process: subprocess.Popen, log_file: Path) -> dict:
    """The next line a --serve-speed worker answers; its log's last line as the error if it ended instead."""
    line = process.stdout.readline()
    if not line:
        raise _failure(log_file, f"exit code {process.wait()}")
    return json.loads(line)


def _failure(log_file: Path, otherwise: str) -> MeasurementError:
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    return MeasurementError(f"{lines[-1] if lines else otherwise} (full log: {log_file})")
