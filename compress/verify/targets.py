"""The only module that knows CPU from CUDA: which targets exist here and how to run on them.

A target that is not present is reported "not-verified" with the reason, never skipped silently and
never counted as a pass.
"""

from __future__ import annotations

import os
import platform


def availability(target: str, runtime: str = "transformers") -> str | None:
    """None when `target` can be verified on this machine in `runtime`, else the reason it cannot."""
    if target == "cpu":
        return None
    if target != "cuda":
        return f"unknown target {target!r}"
    if runtime == "llama.cpp":
        return "compress builds llama.cpp for the CPU only"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if runtime == "onnxruntime-genai":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            return "onnxruntime-genai here has no CUDA provider (install onnxruntime-genai-cuda in a separate environment)"
    return None


def free_device_memory(target: str) -> int | None:
    """Free bytes on the target's accelerator, or None for the CPU (see psutil for host memory)."""
    if target != "cuda" or availability(target):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info()
    return int(free)


def device_for(target: str) -> str:
    return {"cpu": "cpu", "cuda": "cuda"}[target]


def prepare(target: str, runtime: str) -> dict:
    """Set up the process for `target` and describe it, so every figure records where it came from.

    torch is imported only for the transformers runtime, so an ONNX artifact's peak memory is its own.
    """
    threads = int(os.environ.get("COMPRESS_THREADS", os.cpu_count() or 1))
    described = {"target": target, "runtime": runtime, "threads": threads, "cpu": cpu_model(), "machine": platform.machine()}
    if runtime == "llama.cpp":  # how its OpenMP threads wait between ops changes its speed: recorded with every speed
        described["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") or "unset (libgomp: spins briefly, then sleeps)"
    if runtime == "transformers":
        import torch

        torch.set_num_threads(threads)
        if target == "cuda":
            described["gpu"] = torch.cuda.get_device_name(0)
            torch.cuda.reset_peak_memory_stats()
    return described


def cpu_model() -> str:
    """The processor's model name, recorded with every figure."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
