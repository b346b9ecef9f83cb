"""Measure one model folder on one target in a process of its own.

    python -m compress.verify.worker JOB.json

Each artifact (and the baseline) is loaded from disk and run here alone, so its peak memory is its own
and nothing of the parent's models leaks into its figures. The job names the folder, runtime, target,
token windows and reference; the result JSON holds accuracy, speed and memory figures.
With `write_reference` set (the baseline), the top-k reference is written instead of scored against.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from compress.verify.accuracy import Reference, make_reference, perplexity, position_figures, summarise
from compress.verify.speed import measure_speed
from compress.verify.targets import device_for, prepare


def _runtime(name: str, folder: Path, device: str, threads: int | None = None):
    """Import only the runtime this job needs, so its libraries alone count in the peak memory.

    `threads` (from targets.prepare) is the CPU thread count every runtime gets, so speeds compare."""
    if name == "onnxruntime-genai":
        from compress.runtimes.ort_genai import GenaiRuntime

        return GenaiRuntime(folder, device, threads)
    from compress.runtimes.torch_hf import TorchRuntime

    return TorchRuntime(folder, device)


def peak_rss_mb() -> float:
    """This process's own peak resident memory: VmHWM, which starts afresh at exec.

    Not getrusage's ru_maxrss: Linux carries it over fork and exec, so a worker started by a parent that
    held a large model would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems: the best there is


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([part[key] for part in parts]) for key in parts[0]}


def run_job(job: dict) -> dict:
    described = prepare(job["target"], job["runtime"])
    started = time.perf_counter()
    runtime = _runtime(job["runtime"], Path(job["artifact"]), device_for(job["target"]), described["threads"])
    load_seconds = time.perf_counter() - started
    data = np.load(job["windows"])
    windows, prompt = data["windows"], data["prompt"]
    targets = windows[:, 1:]

    started = time.perf_counter()
    if job.get("speed_only"):  # the baseline's accuracy came from the cache; speed is measured in every run
        metrics = {}
    elif job.get("write_reference"):
        parts = [
            make_reference(logprobs, target, job["top_k"]).as_arrays()
            for logprobs, target in zip(runtime.window_logprobs(windows), targets, strict=True)
        ]
        reference = Reference(**_stack(parts))
        np.savez(job["write_reference"], **reference.as_arrays())
        ppl, nll_se = perplexity(reference.target_logprobs)
        metrics = {"ppl": ppl, "nll_se": nll_se}
    else:
        with np.load(job["reference"]) as stored:
            reference = Reference(**{key: stored[key] for key in ("top_ids", "top_logprobs", "target_logprobs")})
        parts = []
        for index, logprobs in enumerate(runtime.window_logprobs(windows)):
            parts.append(position_figures(reference.window(index), logprobs, targets[index]))
        metrics = summarise(reference, _stack(parts))
    eval_seconds = time.perf_counter() - started

    stop_ids = set(job.get("stop_ids", []))
    prompts = [] if job.get("speed_only") else job.get("prompts", [])
    continuations = [runtime.generate(ids, job["generation_tokens"], stop_ids) for ids in prompts]
    speed, generated = measure_speed(runtime, prompt, job["new_tokens"], job["speed_runs"])
    metrics.update(speed)
    metrics["peak_rss_mb"] = peak_rss_mb()
    device_peak = runtime.peak_device_memory_mb()
    if device_peak is not None:
        metrics["peak_vram_mb"] = device_peak
    return {
        "metrics": metrics,
        "generated": generated,
        "continuations": continuations,
        "environment": described,
        "seconds": {"load": load_seconds, "evaluate": eval_seconds},
    }


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run_job(job)
    Path(job["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
