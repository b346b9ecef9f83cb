"""Measure one model folder on one target in a process of its own.

    python -m compress.verify.worker JOB.json [--serve-speed]

Each artifact (and the baseline) is loaded from disk and run here alone, so its peak memory is its own
and nothing of the parent's models leaks into its figures. The job names the folder, runtime, target,
token windows and reference; the result JSON holds accuracy, speed and memory figures.
With `write_reference` set (the baseline), the top-k reference is written instead of scored against.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from compress.verify.accuracy import (
    Reference,
    perplexity,
    stack_windows,
    summarise,
    window_figures,
    window_reference,
)
from compress.verify.cpu_share import CpuShare
from compress.verify.speed import measure_speed
from compress.verify.targets import device_for, prepare


def _runtime(name: str, folder: Path, device: str, threads: int | None = None, context_tokens: int = 512):
    """Import only the runtime this job needs, so its libraries alone count in the peak memory.

    `threads` (from targets.prepare) is the CPU thread count every runtime gets, so speeds compare;
    `context_tokens` the longest sequence the job runs (llama.cpp sizes its context and logits by it)."""
    if name == "llama.cpp":
        from compress.runtimes.llama_cpp import LlamaCppRuntime

        return LlamaCppRuntime(folder, device, threads, context_tokens)
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


def context_tokens(job: dict, windows: np.ndarray, prompt: np.ndarray) -> int:
    """The longest sequence a job runs: a window, the speed prompt and its tokens, a generation prompt and its."""
    prompts = [len(ids) + job.get("generation_tokens", 0) for ids in job.get("prompts", [])]
    return max([windows.shape[1], len(prompt) + job.get("new_tokens", 0), *prompts])


def run_job(job: dict) -> dict:
    """Accuracy, generations, speed and memory of one folder on one target.

    With `layerwise` (the baseline), accuracy comes from a layer-at-a-time forward of the checkpoint on
    disk (compress/layerwise.py), before anything else is loaded. With `whole_model` false the runtime is
    never loaded (it would not fit the memory budget): no generations and no speed, and the result says why.
    """
    return _run(job)[1]


def _run(job: dict):
    """-> (the runtime it loaded, None if it loaded none; run_job's result)."""
    described = prepare(job["target"], job["runtime"])
    data = np.load(job["windows"])
    windows, prompt = data["windows"], data["prompt"]
    folder = Path(job["artifact"])
    runtime, load_seconds = None, 0.0
    context = context_tokens(job, windows, prompt)

    def logprobs():
        nonlocal runtime, load_seconds
        if job.get("layerwise"):
            from compress.layerwise import window_logprobs

            return window_logprobs(folder, windows, job.get("activation_budget"), Path(job["spill_dir"]))
        started = time.perf_counter()
        runtime = _runtime(job["runtime"], folder, device_for(job["target"]), described["threads"], context)
        load_seconds = time.perf_counter() - started
        return runtime.window_logprobs(windows)

    started = time.perf_counter()
    metrics = {} if job.get("speed_only") else _accuracy(job, logprobs(), windows[:, 1:])
    eval_seconds = time.perf_counter() - started
    if job.get("layerwise"):  # what the layer-by-layer pass alone needed, before any whole model is loaded
        metrics["peak_rss_mb_layerwise"] = peak_rss_mb()

    continuations, generated = [], []
    if job.get("whole_model", True):
        if runtime is None:
            started = time.perf_counter()
            runtime = _runtime(job["runtime"], folder, device_for(job["target"]), described["threads"], context)
            load_seconds = time.perf_counter() - started
        stop_ids = set(job.get("stop_ids", []))
        prompts = [] if job.get("speed_only") else job.get("prompts", [])
        continuations = [runtime.generate(ids, job["generation_tokens"], stop_ids) for ids in prompts]
        if not job.get("skip_speed"):  # the caller times it interleaved with the baseline (serve_speed)
            speed, generated = measure_speed(runtime, prompt, job["new_tokens"], job["speed_runs"])
            metrics.update(speed)
        device_peak = runtime.peak_device_memory_mb()
        if device_peak is not None:
            metrics["peak_vram_mb"] = device_peak
    metrics["peak_rss_mb"] = peak_rss_mb()
    return runtime, {
        "metrics": metrics,
        "generated": generated,
        "continuations": continuations if job.get("whole_model", True) else None,
        "not_measured": None if job.get("whole_model", True) else job.get("whole_model_reason"),
        "environment": described,
        "seconds": {"load": load_seconds, "evaluate": eval_seconds},
    }


def _accuracy(job: dict, logprobs, targets: np.ndarray) -> dict:
    """Write the top-k reference (the baseline) or score against it (an artifact). `logprobs` gives each
    window's log-probs as blocks of rows (compress.verify.accuracy.BLOCK_ROWS positions each)."""
    if job.get("write_reference"):
        parts = [window_reference(blocks, target, job["top_k"]) for blocks, target in zip(logprobs, targets, strict=True)]
        reference = Reference(**stack_windows(parts))
        np.savez(job["write_reference"], **reference.as_arrays())
        ppl, nll_se = perplexity(reference.target_logprobs)
        return {"ppl": ppl, "nll_se": nll_se}
    with np.load(job["reference"]) as stored:
        reference = Reference(**{key: stored[key] for key in ("top_ids", "top_logprobs", "target_logprobs")})
    parts = [window_figures(reference.window(index), blocks, targets[index]) for index, blocks in enumerate(logprobs)]
    return summarise(reference, stack_windows(parts))


def serve_speed(job: dict) -> None:
    """Speed on request, so that two models can be timed in turn: load and warm up, answer one line, then time
    one generation per line read from stdin and answer each with its seconds and others' CPU share.

    With `measure_first` the job's accuracy and generations (run_job, without speed) come first, written to
    its result file, and the runtime they loaded is the one timed: one process and one load, not two."""
    replies = os.fdopen(os.dup(1), "w")  # the answers' own channel: what libraries print goes to the log
    os.dup2(2, 1)
    described = prepare(job["target"], job["runtime"])
    data = np.load(job["windows"])
    prompt = data["prompt"]
    runtime = None
    if job.get("measure_first"):
        runtime, result = _run({**job, "skip_speed": True})
        Path(job["result"]).write_text(json.dumps(result, indent=2))
    if runtime is None:
        runtime = _runtime(job["runtime"], Path(job["artifact"]), device_for(job["target"]), described["threads"],
                           context_tokens(job, data["windows"], prompt))
    runtime.timed_generation(prompt, job["new_tokens"])  # warm-up
    print(json.dumps({"environment": described}), file=replies, flush=True)
    for _ in sys.stdin:
        load = CpuShare()
        with load.window():
            prefill_s, decode_s, _tokens = runtime.timed_generation(prompt, job["new_tokens"])
        print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "others_seconds": load.others_seconds,
                          "wall_seconds": load.wall_seconds}), file=replies, flush=True)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    if sys.argv[2:] == ["--serve-speed"]:
        serve_speed(job)
        return
    result = run_job(job)
    Path(job["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
