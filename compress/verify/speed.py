"""Prefill and decode speed as ../shared/METRICS.md defines them: one warm-up, then the median of N runs."""

from __future__ import annotations

import statistics

import numpy as np

from compress.verify.cpu_share import CpuShare


def speed_figures(prefill_seconds: list[float], decode_seconds: list[float], prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """tok/s from timed runs: prefill = prompt tokens / time to first logits; decode = (new - 1) / first-to-last."""
    prefill = [prompt_tokens / s for s in prefill_seconds]
    decode = [(new_tokens - 1) / s for s in decode_seconds]
    return {
        "prefill_tps": statistics.median(prefill),
        "prefill_tps_min": min(prefill),
        "prefill_tps_max": max(prefill),
        "decode_tps": statistics.median(decode),
        "decode_tps_min": min(decode),
        "decode_tps_max": max(decode),
        "speed_runs": float(len(decode)),
    }


def measure_speed(runtime, prompt: np.ndarray, new_tokens: int, runs: int) -> tuple[dict[str, float], list[int]]:
    """Time greedy generation of `new_tokens` after `prompt` on a loaded runtime. -> (figures, tokens); the
    figures include `others_cpu`, other processes' share of the CPU during the timed runs."""
    runtime.timed_generation(prompt, new_tokens)  # warm-up: allocations, kernel selection
    prefill, decode = [], []
    tokens: list[int] = []
    load = CpuShare()
    for _ in range(runs):
        with load.window():
            prefill_s, decode_s, tokens = runtime.timed_generation(prompt, new_tokens)
        prefill.append(prefill_s)
        decode.append(decode_s)
    return {**speed_figures(prefill, decode, len(prompt), new_tokens), "others_cpu": load.share}, tokens
