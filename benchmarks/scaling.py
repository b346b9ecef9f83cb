"""Benchmark 4: how GPTQ calibration's peak RSS and wall time grow with depth, extrapolated to the real
models and compared with compress.model.estimate_memory (what preflight prints and refuses on).

    python -m benchmarks.scaling [--scaling phi4:1,2,4 --scaling phi4-mini:1,2,4]

Each slice (random bf16 weights at the family's real width, N layers) is quantized by compress's own
quantize_gptq (W4 g128, lm_head kept) on 8×128 random tokens in a fresh process; peak RSS is its VmHWM.
A least-squares line over the slices gives the per-layer cost; the line at the real depth is the estimate.
Slices run cheapest first; one whose predicted time (from those already measured) would overrun the
suite's deadline is skipped and reported as such, so `make bench` keeps to its budget on a busy machine.
"""

from __future__ import annotations

import time
from dataclasses import replace

from benchmarks.common import log, probe, threads
from benchmarks.maths import extrapolate, gptq_work, linear_fit, max_residual, predicted_seconds
from benchmarks.models import FULL_LAYERS, WIDTHS, random_model

CALIBRATION = {"calibration_samples": 8, "calibration_seq_len": 128, "group_size": 128}
DEFAULT_PLAN = {"phi4-mini": [1, 2, 4], "phi4": [1, 2]}
# How memory grows with calibration tokens: the 1-layer Phi-4-mini-width slice again with 8× the samples.
TOKENS_CHECK = {"width": "phi4-mini", "layers": 1, "calibration_samples": 64}
EVAL_SEQ_LEN = 256  # only for estimate_memory's signature; its quantize figure does not use it
MIB = 2**20


def estimate_memory_mb(info, samples: int = CALIBRATION["calibration_samples"]) -> float:
    """compress.model.estimate_memory's quantize figure (MiB) for this benchmark's calibration."""
    from compress.model import estimate_memory

    return estimate_memory(info, samples, CALIBRATION["calibration_seq_len"], EVAL_SEQ_LEN).quantize / MIB


def _full_depth(info_1, info_2, layers: int):
    """The ModelInfo of the real depth, from two slices: shared tensors + layers × one layer's tensors."""
    per_layer = info_2.parameters - info_1.parameters
    per_layer_bytes = info_2.weight_bytes - info_1.weight_bytes
    return replace(info_1, config={**info_1.config, "num_hidden_layers": layers},
                   parameters=info_1.parameters + (layers - 1) * per_layer,
                   weight_bytes=info_1.weight_bytes + (layers - 1) * per_layer_bytes)


def family(name: str, layer_counts: list[int], deadline: float | None, measured_before: dict) -> dict:
    """Quantize each slice of `name` in a fresh process. `measured_before`: {width: [(layers, seconds)]} so far."""
    from compress.model import inspect_model

    slices, skipped = [], []
    pool = max(layer_counts)
    for layers in sorted(layer_counts):
        predicted = _predict(name, layers, measured_before)
        if deadline is not None and predicted is not None and time.monotonic() + predicted > deadline:
            skipped.append({"layers": layers, "predicted_seconds": round(predicted),
                            "reason": f"would take about {predicted / 60:.0f} min; the suite's time budget is nearly spent"})
            log(f"scaling: {name} width, {layers} layer(s) skipped ({skipped[-1]['reason']})")
            continue
        folder = random_model(name, layers, "bf16", pool_layers=pool)
        log(f"scaling: {name} width, {layers} layer(s): quantize_gptq on 8x128 tokens")
        measured = probe("gptq", {"model": str(folder), "threads": threads(), **CALIBRATION}, f"scaling-{name}-{layers}L")
        info = inspect_model(str(folder))
        slices.append({"layers": layers, "parameters": info.parameters, "weight_bytes": info.weight_bytes,
                       "peak_rss_mb": measured["peak_rss_mb"], "oneshot_seconds": measured["oneshot_seconds"],
                       "quantize_seconds": measured["quantize_seconds"], "process_seconds": measured["process"]["seconds"],
                       "estimate_mb": estimate_memory_mb(info), "threads": measured["threads"],
                       "others_cpu": measured["process"]["others_cpu"], "rss_at_end_mb": measured.get("rss_at_end_mb")})
        measured_before.setdefault(name, []).append((layers, measured["process"]["seconds"]))
    result = {"slices": slices, "skipped": skipped, "full_layers": FULL_LAYERS[name]}
    if len({s["layers"] for s in slices}) < 2:
        return result
    xs = [s["layers"] for s in slices]
    full = FULL_LAYERS[name]
    for key in ("peak_rss_mb", "quantize_seconds"):
        ys = [s[key] for s in slices]
        fit = linear_fit(xs, ys)
        result[key] = {"intercept": fit[0], "per_layer": fit[1], "max_residual": max_residual(fit, xs, ys),
                       "at_full_depth": extrapolate(fit, full)}
    one = inspect_model(str(random_model(name, 1, "bf16", pool_layers=pool)))
    two = inspect_model(str(random_model(name, 2, "bf16", pool_layers=pool)))
    full_info = _full_depth(one, two, full)
    result["full_depth"] = {"parameters": full_info.parameters, "weight_bytes": full_info.weight_bytes,
                            "estimate_mb": estimate_memory_mb(full_info)}
    result["estimate_ratio_at_full_depth"] = result["full_depth"]["estimate_mb"] / result["peak_rss_mb"]["at_full_depth"]
    return result


def _predict(name: str, layers: int, measured: dict) -> float | None:
    """From this width's slices, else from another width's scaled by their GPTQ work per layer."""
    if measured.get(name):
        return predicted_seconds(layers, measured[name])
    for other, slices in measured.items():
        scale = gptq_work(WIDTHS[name]) / gptq_work(WIDTHS[other])
        return predicted_seconds(layers, slices, scale)
    return None


def tokens_check(deadline: float | None, measured: dict) -> dict | None:
    """Peak RSS of one slice at 8× the calibration samples, against the same slice at the default."""
    from compress.model import inspect_model

    name, layers, samples = TOKENS_CHECK["width"], TOKENS_CHECK["layers"], TOKENS_CHECK["calibration_samples"]
    predicted = _predict(name, layers, measured)
    if not measured.get(name) or (deadline is not None and predicted is not None and time.monotonic() + 1.5 * predicted > deadline):
        return None
    folder = random_model(name, layers, "bf16", pool_layers=max(2, layers))
    log(f"scaling: {name} width, {layers} layer(s): quantize_gptq on {samples}x{CALIBRATION['calibration_seq_len']} tokens")
    job = {"model": str(folder), "threads": threads(), **CALIBRATION, "calibration_samples": samples}
    measured_more = probe("gptq", job, f"scaling-{name}-{layers}L-{samples}samples")
    info = inspect_model(str(folder))
    plan = estimate_memory_mb(info, samples), estimate_memory_mb(info, CALIBRATION["calibration_samples"])
    return {"width": name, "layers": layers, "calibration_samples": samples, "peak_rss_mb": measured_more["peak_rss_mb"],
            "estimate_mb": plan[0], "estimate_growth_mb": plan[0] - plan[1]}


def run(plan: dict[str, list[int]] | None = None, deadline: float | None = None) -> dict:
    """Every width of `plan` ({width: [layers]}), cheapest first; `deadline` is a time.monotonic() value."""
    plan = plan or DEFAULT_PLAN
    measured: dict[str, list[tuple[int, float]]] = {}
    result: dict = {"calibration": CALIBRATION, "stored_dtype": "bf16", "families": {}}
    for name, counts in plan.items():
        found = result["families"][name] = family(name, counts, deadline, measured)
        base = next((s for s in found["slices"] if s["layers"] == TOKENS_CHECK["layers"]), None)
        if name == TOKENS_CHECK["width"] and base and (check := tokens_check(deadline, measured)):
            check["growth_mb"] = check["peak_rss_mb"] - base["peak_rss_mb"]
            result["tokens_check"] = check
    return result


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "scaling"])
