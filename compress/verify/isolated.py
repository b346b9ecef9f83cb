"""Run verify/worker.py in a fresh process for one (model folder, target) and read back its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from compress import interrupts


class MeasurementError(RuntimeError):
    """The worker failed; the message is the last line it printed."""


def measure_in_subprocess(job: dict, job_dir: Path, name: str) -> dict:
    """Write the job, run the worker, return its result. The worker's log is kept beside the job."""
    interrupts.check()
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(job_dir / f"{name}.result.json")}
    job_file = job_dir / f"{name}.job.json"
    job_file.write_text(json.dumps(job, indent=2))
    log_file = job_dir / f"{name}.log"
    environment = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with log_file.open("w") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "compress.verify.worker", str(job_file)],
            stdout=log, stderr=subprocess.STDOUT, env=environment, check=False,
        )
    if completed.returncode != 0:
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {completed.returncode}"
        raise MeasurementError(f"{last} (full log: {log_file})")
    return json.loads(Path(job["result"]).read_text())
