"""What every benchmark shares: the cache, the environment recorded with each figure, and subprocesses
whose wall time and peak RSS are their own."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from compress.verify.cpu_share import busy_cpu_seconds, others_share
from compress.verify.targets import cpu_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BENCH_CACHE", ROOT / "benchmarks" / ".cache"))
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "onnxruntime", "onnxruntime-genai", "numpy")


def threads() -> int:
    return int(os.environ.get("COMPRESS_THREADS", os.cpu_count() or 1))


def environment() -> dict:
    """Host, CPU, threads, memory and library versions: recorded with every figure."""
    import psutil

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {
        "host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "versions": versions,
    }


def run_measured(command: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `command` in a fresh process. -> wall seconds, peak RSS (MiB) of the largest process in its tree,
    and `others_cpu`: the share of the machine's CPU time that other processes used meanwhile (0 = it ran
    alone; 0.5 on 2 cores = another job held one core), from /proc/stat minus the child's own CPU time.

    Peak RSS is the largest VmHWM among the child and its descendants, polled while they run. Not wait4's
    ru_maxrss: Linux carries the parent's resident size at fork into it, and this runner holds several GB
    after reading an fp32 graph's tensors for the bandwidth figures (every overhead row read 5,100 MiB).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    environment_vars = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": str(ROOT), **(env or {})}
    busy_before = busy_cpu_seconds()
    with log.open("w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=environment_vars)
        deadline = None if timeout is None else started + timeout
        peak_kb = 0
        while True:
            peak_kb = max(peak_kb, _tree_peak_kb(process.pid))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline and time.perf_counter() > deadline:
                process.kill()
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    others = busy_cpu_seconds() - busy_before - usage.ru_utime - usage.ru_stime
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "returncode": process.returncode, "log": str(log),
            "others_cpu": others_share(others, seconds)}


def _tree_peak_kb(pid: int) -> int:
    """The largest VmHWM (kB) of `pid` and its living descendants; 0 for any that already ended."""
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    peak = 0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                peak = max(peak, next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0))
        except OSError:
            continue
    return peak


class ProbeError(RuntimeError):
    """A measuring subprocess failed; the message is its last line and where its log is."""


def probe(mode: str, job: dict, name: str, timeout: float | None = None) -> dict:
    """`python -m benchmarks.probe MODE JOB.json` in a fresh process; its result JSON plus wall time and peak RSS."""
    folder = CACHE / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    job_file, result_file = folder / f"{name}.job.json", folder / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "result": str(result_file)}, indent=1))
    measured = run_measured([sys.executable, "-m", "benchmarks.probe", mode, str(job_file)], folder / f"{name}.log", timeout=timeout)
    if measured["returncode"] != 0 or not result_file.is_file():
        lines = [line for line in Path(measured["log"]).read_text(errors="replace").splitlines() if line.strip()]
        raise ProbeError(f"{mode} probe {name} failed: {lines[-1] if lines else measured['returncode']} (log: {measured['log']})")
    return {**json.loads(result_file.read_text()), "process": measured}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
