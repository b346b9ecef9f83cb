"""The only module that knows CPU from CUDA: which targets exist here and how to run on them.

A target that is not present is reported "not-verified" with the reason, never skipped silently and
never counted as a pass.
"""

from __future__ import annotations

import os
import platform


def availability(target: str) -> str | None:
    """None when `target` can be verified on this machine, else the reason it cannot."""
    if target == "cpu":
        return None
    if target == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device on this machine"
        return None
    return f"unknown target {target!r}"


def free_device_memory(target: str) -> int | None:
    """Free bytes on the target's accelerator, or None for the CPU (see psutil for host memory)."""
    if target != "cuda" or availability(target):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info()
    return int(free)


def device_for(target: str) -> str:
    return {"cpu": "cpu", "cuda": "cuda"}[target]


def prepare(target: str) -> dict:
    """Set up the process for `target` and describe it, so every figure records where it came from."""
    import torch

    threads = int(os.environ.get("COMPRESS_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    described = {"target": target, "threads": threads, "cpu": _cpu_model(), "machine": platform.machine()}
    if target == "cuda":
        described["gpu"] = torch.cuda.get_device_name(0)
        torch.cuda.reset_peak_memory_stats()
    return described


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
