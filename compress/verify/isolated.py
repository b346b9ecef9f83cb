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


class SpeedServer:
    """A worker in --serve-speed mode: it loads its job's folder once (after measuring it, with `measure_first`),
    then times one generation per request. Kept open, one server serves many requests: the pipeline keeps the
    baseline's across every artifact of a run, where memory allows, instead of loading it once per artifact."""

    def __init__(self, job: dict, job_dir: Path, name: str):
        job_file, self.log_file = _write_job(job, job_dir, name)
        self.result_file = job_dir / f"{name}.result.json"
        with self.log_file.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "compress.verify.worker", str(job_file), "--serve-speed"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env={**os.environ, **ENVIRONMENT}, text=True)
        self.loaded = False

    def wait_loaded(self) -> None:
        """Until it has loaded (and measured) its folder and warmed up."""
        if not self.loaded:
            _answer(self.process, self.log_file)
            self.loaded = True

    def time_one(self) -> dict:
        """One timed generation: prefill and decode seconds, and others' CPU seconds over its wall seconds."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return _answer(self.process, self.log_file)

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:  # it ended already
            pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class KeptServer:
    """A SpeedServer started on first use and kept until closed (a context manager); closed, it starts afresh
    on the next use."""

    def __init__(self, job: dict, job_dir: Path, name: str):
        self._arguments = (job, job_dir, name)
        self._server: SpeedServer | None = None

    def get(self) -> SpeedServer:
        if self._server is None:
            self._server = SpeedServer(*self._arguments)
        return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> KeptServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def interleaved_speed(jobs: dict[str, dict], job_dir: Path, prompt_tokens: int, new_tokens: int, runs: int) -> dict[str, dict]:
    """Speed figures of each job's folder, its runs taken in turn with the others' (baseline, artifact, baseline,
    artifact…), each model in a process of its own, so that a ratio of two of them sees the same load."""
    servers: dict[str, SpeedServer] = {}
    try:
        for name, job in jobs.items():
            servers[name] = SpeedServer(job, job_dir, f"{name}-speed")
        return time_in_turn(servers, prompt_tokens, new_tokens, runs)
    finally:
        for server in servers.values():
            server.close()


def time_in_turn(servers: dict[str, SpeedServer], prompt_tokens: int, new_tokens: int, runs: int) -> dict[str, dict]:
    """`runs` generations of each server's model, taken in turn. -> speed figures and others' CPU share by name."""
    for server in servers.values():
        server.wait_loaded()
    timings: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(runs):
        for name, server in servers.items():
            interrupts.check()
            timings[name].append(server.time_one())
    return {name: {**speed_figures([t["prefill_s"] for t in taken], [t["decode_s"] for t in taken], prompt_tokens, new_tokens),
                   "others_cpu": others_share(sum(t["others_seconds"] for t in taken), sum(t["wall_seconds"] for t in taken))}
            for name, taken in timings.items()}


def measure_and_time_in_turn(job: dict, baseline: SpeedServer, job_dir: Path, prompt_tokens: int, new_tokens: int,
                             runs: int) -> tuple[dict, dict[str, dict]]:
    """An artifact's figures (as measure_in_subprocess) and its speed taken in turn with the baseline's server.

    The artifact's accuracy and generations run in the process that then times it, while the baseline's
    server loads (or waits, loaded by an earlier artifact): one process and one load of the artifact fewer
    than measuring and timing apart. The baseline's server stays open. -> (the artifact's result, the figures
    of both, named "baseline" and "artifact")."""
    artifact = SpeedServer({**job, "measure_first": True}, job_dir, "artifact-speed")
    try:
        speeds = time_in_turn({"baseline": baseline, "artifact": artifact}, prompt_tokens, new_tokens, runs)
    finally:
        artifact.close()
    return json.loads(artifact.result_file.read_text()), speeds


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
