"""How long layer-by-layer calibration will take, said in preflight before a run commits to hours of it.

A decoder layer's time is three parts, each counted in floating-point operations from the model's shapes:

    passes   the forwards over the calibration tokens (one gathers the inputs' statistics, one gives the next
             layer its inputs; awq-gptq gathers twice) and the statistics themselves (X^T X of each quantized
             linear's inputs): per token and forward 2 x sum of out x in + 4 x seq_len x attention width, per
             token and statistic 2 x sum of in^2;
    method   the method's own work on those statistics, k_square x sum of out x in^2 + k_linear x sum of out x in:
             GPTQ's solve (llm-compressor's quantize_weight: its updates and its per-column loop), Phi-aware
             AWQ's scale and clipping searches (screened candidates on every weight, two whole-Gram checks);
    layer    reading the layer, rounding, packing and writing it: in proportion to its weights.

Each constant is seconds per operation on the machine that measured it (REFERENCE_RATE, its float32 matmul rate,
2 threads), fitted to benchmarks/awq.py's side-by-side figures (benchmarks/results/2026-12-04-vm-awq-*.md: the
methods' own work and the layer term at 8x128 tokens, the passes at 256x2048 at Phi-4-mini width) and checked
against every measured layer, Phi-4 width at 256x2048 included (tests/test_timing.py); on another machine they
scale with the rate `machine_rate` times there. AWQ multiplies in bfloat16 where the CPU has AMX
(phi_awq.fast_dtype): without it its search counts AMX_SEARCH_SPEEDUP times longer and its statistics
AMX_STATISTICS_SPEEDUP times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

REFERENCE_RATE = 4.1e11  # FLOP/s of a 1024^3 float32 matmul on 2 threads of the machine the constants come from
PASS_SECONDS = 1.57e-12  # per operation of the passes (1.55x REFERENCE_RATE: 2048-token windows multiply big matrices)
LAYER_SECONDS = 2.94e-8  # per weight: AWQ's layer time at 8x128 tokens less its search and passes, mean of both widths
METHOD_SECONDS = {  # method: (per out x in^2, per out x in); fitted at Phi-4-mini and Phi-4 widths, 8x128 tokens
    "gptq": (1.95e-11, 1.30e-7),  # GPTQ's layer less its passes and LAYER_SECONDS
    "awq": (6.80e-12, 1.05e-7),  # AWQ's search seconds (scale and clipping searches)
    "rtn": (0.0, 0.0),  # its rounding is the layer term
}
GPTQ_STATISTICS = 1.64  # llm-compressor's accumulate_hessian against a plain X^T X (a scaled copy, H rescaled per window)
AMX_SEARCH_SPEEDUP = 1.5  # AWQ's search with bfloat16 products (phi_awq.fast_dtype) against float32: 77.7 / 52.0 s, Phi-4 width
AMX_STATISTICS_SPEEDUP = 2.0  # AWQ's Gram matrices gathered in bfloat16 products (1.8-3x a window, measured)


@dataclass(frozen=True)
class LayerTime:
    """Estimated seconds of one decoder layer's calibration, by part."""

    passes: float
    method: float
    layer: float

    @property
    def total(self) -> float:
        return self.passes + self.method + self.layer


def linears(shapes) -> list[tuple[int, int]]:
    """(out, in) of a Phi-3 block's four linears: qkv_proj, o_proj, gate_up_proj, down_proj."""
    attention = shapes.heads * shapes.head_dim
    return [((shapes.heads + 2 * shapes.kv_heads) * shapes.head_dim, shapes.hidden), (shapes.hidden, attention),
            (2 * shapes.intermediate, shapes.hidden), (shapes.hidden, shapes.intermediate)]


def layer_time(shapes, method: str, tokens: int, seq_len: int, rate: float = REFERENCE_RATE, amx: bool = True) -> LayerTime:
    """Seconds one decoder layer of `shapes` takes to calibrate with `method` on `tokens` tokens in windows of
    `seq_len`, on a machine whose float32 matmul rate is `rate` (`amx`: it multiplies bfloat16 in hardware)."""
    pairs = linears(shapes)
    weights = sum(out * width for out, width in pairs)
    forward = 2 * weights + 4 * seq_len * shapes.heads * shapes.head_dim  # per token
    statistics = 2 * sum(width**2 for _, width in pairs)  # per token, X^T X of each linear's inputs
    parts = ("awq", "gptq") if method == "awq-gptq" else (method,)
    per_token = forward * (1 + len(parts))  # a forward that gathers each method's statistics, one for the next layer
    method_seconds = 0.0
    for part in parts:
        cost = GPTQ_STATISTICS if part == "gptq" else (1 / AMX_STATISTICS_SPEEDUP if amx else 1)
        per_token += statistics * cost
        square, linear = METHOD_SECONDS[part]
        slower_search = AMX_SEARCH_SPEEDUP if part == "awq" and not amx else 1
        method_seconds += slower_search * sum(square * out * width**2 + linear * out * width for out, width in pairs)
    slower = REFERENCE_RATE / rate
    return LayerTime(tokens * per_token * PASS_SECONDS * slower, method_seconds * slower, weights * LAYER_SECONDS * slower)


def calibration_estimates(shapes, recipe, rate: float, amx: bool) -> list[tuple[object, LayerTime]]:
    """(variant, one layer's estimated time) for each variant calibrated layer by layer (RTN takes no
    calibration tokens; stock AWQ and ONNX builds are not calibrated here)."""
    from compress.quantize.llmc import needs_whole_model

    calibration = recipe.calibration
    estimates = []
    for variant in recipe.variants:
        if not variant.calibrated or needs_whole_model(variant):
            continue
        tokens = 0 if variant.method == "rtn" else calibration.samples * calibration.seq_len
        estimates.append((variant, layer_time(shapes, variant.method, tokens, calibration.seq_len, rate, amx)))
    return estimates


def machine_rate(size: int = 1024, tries: int = 5) -> float:
    """This machine's float32 matmul rate in FLOP/s on torch's threads: the best of `tries` products of two
    size x size matrices (~25 ms in all where REFERENCE_RATE was measured)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def has_amx() -> bool:
    import torch

    from compress.quantize.phi_awq import fast_dtype

    return fast_dtype(torch.zeros(1)) == torch.bfloat16


def describe(seconds: float) -> str:
    """A duration as preflight says it: '40 s', '12 min', '2.3 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
