"""AWQ for Phi-3-architecture blocks (Phi-4, Phi-4-mini): every exact rescaling, fused layers included.

A scale s > 0 per channel moves magnitude from a layer's input channels into its weights: the producer of
the channel is divided by s and the consumer's input columns are multiplied by s, so the float model is
unchanged while the quantizer sees salient columns larger. Four places allow that exactly in a Phi-3 block:

    input_layernorm            -> qkv_proj        norm weight / s; every qkv input column x s
    qkv_proj (v rows)          -> o_proj          v rows / s; o_proj input column of query head h, dim d x s[h // group, d]
    post_attention_layernorm   -> gate_up_proj    norm weight / s; every gate_up input column x s
    gate_up_proj (up rows)     -> down_proj       up rows / s; down_proj input column j x s[j]   (down(up * act(gate)))

llm-compressor 0.14's AWQ can express the two norm mappings but not a slice of a fused module, and it folds
the scales it finds into the weights without returning them; so all four are searched here, with one loss,
and the scales are kept as data. For each mapping the search tries s = mean|x|^alpha on a grid of alpha
(alpha = 0 is plain RTN) and keeps the alpha whose consumer output error after fake quantization is least.

The error of a consumer with weight W [out, in] on inputs X [n, in] is computed from its Gram matrix
G = X^T X (the same statistic GPTQ collects): ||X W^T - (X / s) Q(W s)^T||^2 = tr(D G D^T) with
D = W - Q(W s) / s. Statistics come from the original model in one pass: each rescaling is exact, so the
only input that changes is the consumer's own, by 1 / s, which the formula already accounts for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

KEEP = 16  # compress.quantize.plan.KEEP: a layer left in floating point

NORM_QKV, V_O, NORM_GATE_UP, UP_DOWN = (
    "input_layernorm→qkv_proj", "qkv_proj[v]→o_proj", "post_attention_layernorm→gate_up_proj", "gate_up_proj[up]→down_proj")
KINDS = (V_O, NORM_QKV, UP_DOWN, NORM_GATE_UP)  # search order: a slice's rows change before its module's columns


@dataclass(frozen=True)
class Shape:
    """What the rescalings need to know about a Phi-3 block."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> Shape:
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(hidden, int(get("intermediate_size")), heads, int(get("num_key_value_heads") or heads),
                   int(get("head_dim") or hidden // heads))

    @property
    def v_rows(self) -> slice:
        start = (self.heads + self.kv_heads) * self.head_dim
        return slice(start, start + self.kv_heads * self.head_dim)

    def o_columns_to_v(self) -> np.ndarray:
        """For each o_proj input column, the v channel (kv head, dim) that produced it under GQA."""
        group = self.heads // self.kv_heads
        head = np.arange(self.heads).repeat(self.head_dim)
        dim = np.tile(np.arange(self.head_dim), self.heads)
        return (head // group) * self.head_dim + dim


@dataclass(frozen=True)
class Mapping:
    kind: str
    layer: int

    @property
    def consumer(self) -> str:
        name = {NORM_QKV: "self_attn.qkv_proj", V_O: "self_attn.o_proj", NORM_GATE_UP: "mlp.gate_up_proj",
                UP_DOWN: "mlp.down_proj"}[self.kind]
        return f"model.layers.{self.layer}.{name}"

    @property
    def label(self) -> str:
        return f"layers.{self.layer} {self.kind}"


def phi3_mappings(layers: int, plan: dict[str, int]) -> tuple[list[Mapping], list[str]]:
    """Every mapping of a `layers`-deep Phi-3 model whose consumer is quantized; the rest as 'label: why'."""
    applied, skipped = [], []
    for layer in range(layers):
        for kind in KINDS:
            mapping = Mapping(kind, layer)
            bits = plan.get(mapping.consumer)
            if bits is None or bits == KEEP:
                skipped.append(f"{mapping.label}: {mapping.consumer} stays in floating point, nothing to protect")
            else:
                applied.append(mapping)
    return applied, skipped


def fake_quantize(weight, bits: int, group_size: int, symmetric: bool):
    """Round-to-nearest with min-max scales per group of input columns, as compressed-tensors' RTN does
    (symmetric: scale = max|w| / ((2^bits - 1) / 2), range [-2^(bits-1), 2^(bits-1) - 1]); dequantized."""
    import torch

    out, columns = weight.shape
    group = columns if group_size == -1 else group_size
    grouped = weight.reshape(out, columns // group, group)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    low = grouped.amin(-1, keepdim=True).clamp(max=0)
    high = grouped.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale = torch.maximum(-low, high) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (high - low) / (qmax - qmin)
        zero = torch.round(qmin - low / scale.clamp(min=torch.finfo(scale.dtype).tiny))
    scale = scale.clamp(min=torch.finfo(scale.dtype).eps)
    quantized = torch.clamp(torch.round(grouped / scale) + zero, qmin, qmax)
    return ((quantized - zero) * scale).reshape(out, columns)


def output_error(weight, gram, scale_columns, bits: int, group_size: int, symmetric: bool) -> float:
    """Sum over calibration tokens of ||x W^T - (x / s) Q(W s)^T||^2, from the inputs' Gram matrix (rows taken
    ERROR_ELEMENTS weights at a time: the fake quantizer's copies of a whole Phi-4 down_proj are ~2 GB). A
    bfloat16 `gram` is multiplied in bfloat16 (see product)."""
    total = 0.0
    for part in row_chunks(weight):
        delta = part - fake_quantize(part * scale_columns, bits, group_size, symmetric) / scale_columns
        total += float((product(delta, gram) * delta).sum())
    return total


def product(a, b):
    """a @ b in b's dtype, as float32: bfloat16 where the search chose it (fast_dtype), float32 otherwise."""
    return (a.to(b.dtype) @ b).float()


def fast_dtype(tensor):
    """The dtype the search multiplies `tensor` in: bfloat16 where the CPU multiplies it in hardware (AMX:
    4.3-4.7x float32's speed on a Phi-4 Gram matrix, the error it gives 4-7e-4 of its value, measured), the
    tensor's own otherwise."""
    import torch

    amx = tensor.device.type == "cpu" and _has_amx()
    return torch.bfloat16 if amx and BFLOAT16_SEARCH else tensor.dtype


@functools.cache
def _has_amx() -> bool:
    """Asked once: fast_dtype runs in a hook at every calibration window."""
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


ERROR_ELEMENTS = 2**22  # weights output_error and the weight statistic take at a time (16 MiB in float32)
BFLOAT16_SEARCH = True  # multiply in bfloat16 where the hardware does (fast_dtype)
SEARCH_RANK = 128  # directions of a Gram matrix the scale search keeps whole; the rest by their diagonal
SEARCH_ELEMENTS = 2**14  # weights the scale search quantizes at a time, every candidate on them at once
SCREEN = 4  # the scale search tries every candidate on one piece of rows in SCREEN ...
FINALISTS = 8  # ... and the FINALISTS best of them on all rows


@dataclass(frozen=True)
class Sketch:
    """A Gram matrix as the scale search uses it: a factor of its largest directions plus the diagonal of the
    rest, G ~ L L^T + diag(r). The error of a rounding difference D is then ||D L||^2 + sum_j r_j ||D_:j||^2:
    out x in x rank a candidate instead of out x in^2, and exact where in <= rank (L L^T = G, r = 0). `kept`
    is the share of tr(G) in L."""

    factor: object  # L [in, rank]
    residual: object  # r [in]
    kept: float

    @classmethod
    def of(cls, gram, rank: int | None = None) -> Sketch:
        factor = gram_factor(gram, rank or SEARCH_RANK)
        residual = (gram.diagonal() - factor.square().sum(1)).clamp(min=0)
        trace = float(gram.diagonal().sum())
        return cls(factor.to(fast_dtype(factor)), residual, float(factor.square().sum()) / trace if trace > 0 else 1.0)

    def errors(self, delta):
        """The sketched output error of each rounding difference in `delta` [candidates, rows, in] (float64)."""
        projected = product(delta.reshape(-1, delta.shape[-1]), self.factor).reshape(delta.shape[0], -1)
        return projected.square().sum(1).double() + (delta.square().sum(1) @ self.residual).double()


def sketched_errors(weight, sketch: Sketch, candidates: list, bits: int, group_size: int, symmetric: bool,
                    every: int = 1) -> list[float]:
    """The sketched output error of each candidate column scale, on every `every`-th piece of SEARCH_ELEMENTS
    weights (all of them by default). Every candidate is tried on a piece at once, so the fake quantizer's
    dozen passes run in cache and each op does enough work for the threads of in_pieces to run side by side
    (one op per candidate and piece measured 20 s for a Phi-4-mini-width gate_up_proj on 1 thread and on 2:
    the interpreter was the limit)."""
    import torch

    out, columns = weight.shape
    scales = torch.stack(candidates)[:, None]  # [candidates, 1, in]
    step = max(1, SEARCH_ELEMENTS // columns)

    def piece(start: int):
        scaled = weight[start:start + step] * scales
        flat = scaled.reshape(-1, columns)
        delta = (flat - fake_quantize(flat, bits, group_size, symmetric)).reshape(scaled.shape) / scales
        return sketch.errors(delta)

    return torch.stack(in_pieces(piece, range(0, out, step * every))).sum(0).tolist()


def screened_errors(weight, sketch: Sketch, candidates: list, bits: int, group_size: int, symmetric: bool) -> dict[int, float]:
    """{candidate index: sketched error on all rows} for the FINALISTS candidates least in error on every
    SCREEN-th piece of rows: each row's error is its own, so a spread subset of rows ranks the candidates
    nearly as all rows do, and the finalists are then compared on all of them."""
    screened = sketched_errors(weight, sketch, candidates, bits, group_size, symmetric, every=SCREEN)
    finalists = sorted(range(len(candidates)), key=screened.__getitem__)[:FINALISTS]
    errors = sketched_errors(weight, sketch, [candidates[i] for i in finalists], bits, group_size, symmetric)
    return dict(zip(finalists, errors, strict=True))


def in_pieces(work, tasks) -> list:
    """[work(task) for task in tasks], spread over as many Python threads as torch has threads, each running
    torch on one: pieces small enough to stay in cache are too small for torch's own threads, whose barrier at
    every op costs a scheduler slice when another program holds a core (measured: the sketched search of one
    Phi-4-mini-width mapping took over 10 minutes on 2 threads beside one busy core, 3 s on one)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1:
            return [work(task) for task in tasks]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, tasks))
    finally:
        torch.set_num_threads(threads)


def gram_factor(gram, rank: int):
    """L [in, k] with L L^T the best rank-k approximation of the PSD matrix `gram` found by a randomized range
    finder (Halko, Martinsson & Tropp 2011: one power iteration, 8 extra directions, seeded), k = min(rank, in);
    where in <= rank, the exact factor (eigendecomposition)."""
    import torch

    size = gram.shape[0]
    if size <= rank:
        values, vectors = torch.linalg.eigh(gram.double())
        return (vectors * values.clamp(min=0).sqrt()).float()
    probe = torch.randn(size, rank + 8, generator=torch.Generator().manual_seed(0), dtype=gram.dtype)
    basis = torch.linalg.qr(gram @ torch.linalg.qr(gram @ probe).Q).Q
    values, vectors = torch.linalg.eigh((basis.T @ gram @ basis).double())
    values, vectors = values[-rank:].clamp(min=0), vectors[:, -rank:]
    return (basis.double() @ vectors * values.sqrt()).float()


@dataclass
class Statistics:
    """Of one consumer's inputs over the calibration tokens: Gram matrix X^T X, sum of |x|, token count."""

    gram: object
    abs_sum: object
    tokens: int = 0

    @property
    def mean_abs(self):
        return self.abs_sum / max(self.tokens, 1)


def search_scale(weight, stats: Statistics, columns_to_channel, bits: int, group_size: int, symmetric: bool,
                 n_grid: int) -> tuple[object, dict]:
    """The best s for one mapping -> (s per channel, what the search saw).

    Tries s = mean|x|^alpha and AWQ's "duo" form mean|x|^alpha / mean|w|^(1 - alpha) (w normalized per
    group) for alpha on a grid in [0, 1), each evaluated through a Sketch of the Gram matrix, all of them on
    a quarter of the rows and the best FINALISTS on all (screened_errors); the best is then evaluated on the
    whole Gram matrix against alpha = 0 of the first form (s = 1, plain RTN) and kept only if it is lower, so
    the result is never worse than RTN on this objective (to bfloat16's 1e-3 where fast_dtype uses it).
    `columns_to_channel` maps each consumer input column to its channel (identity except for v->o, where query
    heads share their KV head's channel); a channel's magnitudes are the means over its columns.
    """
    import torch

    channels = int(columns_to_channel.max()) + 1
    index = torch.as_tensor(columns_to_channel)
    count = torch.bincount(index, minlength=channels).double()

    def per_channel(values):
        return (torch.zeros(channels, dtype=torch.float64).index_add_(0, index, values.double()) / count).clamp(min=1e-8)

    x_mean = per_channel(stats.mean_abs)
    w_mean = per_channel(_normalized_weight_magnitude(weight, group_size))
    grid, scales = [], []
    for form in ("plain", "duo"):
        for step in range(n_grid):
            alpha = step / n_grid
            scale = x_mean.pow(alpha) if form == "plain" else x_mean.pow(alpha) / w_mean.pow(1 - alpha)
            grid.append((form, alpha))
            scales.append((scale / (scale.max() * scale.min()).sqrt()).clamp(min=1e-4).float())
    sketch = Sketch.of(stats.gram)
    sketched = screened_errors(weight, sketch, [scale[index] for scale in scales], bits, group_size, symmetric)
    chosen = min(sketched, key=sketched.__getitem__)
    scale, (form, alpha) = scales[chosen], grid[chosen]
    gram = stats.gram.to(fast_dtype(stats.gram))
    rtn = output_error(weight, gram, torch.ones(len(index)), bits, group_size, symmetric)
    error = output_error(weight, gram, scale[index], bits, group_size, symmetric) if alpha or form != "plain" else rtn
    del gram
    if error >= rtn:
        scale, error, form, alpha = torch.ones(channels), rtn, "plain", 0.0
    return scale, {"form": form, "alpha": alpha, "error": error, "rtn_error": rtn, "error_vs_rtn": error / rtn if rtn > 0 else 1.0,
                   "rank": sketch.factor.shape[1], "trace_kept": round(sketch.kept, 4)}


def _normalized_weight_magnitude(weight, group_size: int):
    """Per input column: mean over rows of |w| / max|w| of its group (AWQ's weight statistic)."""
    columns = weight.shape[1]
    group = columns if group_size == -1 else group_size
    total = 0
    for part in row_chunks(weight):
        grouped = part.abs().reshape(len(part), columns // group, group)
        total = total + (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).sum(0).reshape(columns)
    return total / weight.shape[0]


def row_chunks(weight):
    """The weight's rows, ERROR_ELEMENTS weights at a time."""
    step = max(1, ERROR_ELEMENTS // weight.shape[1])
    return (weight[start:start + step] for start in range(0, weight.shape[0], step))


CLIP_RATIOS = tuple(1 - step / 20 for step in range(10))  # 1.0 down to 0.55
CLIP_ELEMENTS = 2**18  # weights the clipping search takes at a time (all ratios on rows that stay in cache)


def search_clip(weight, gram, bits: int, group_size: int, symmetric: bool, frozen_rows: slice | None = None,
                input_scale=None):
    """AWQ's clipping: per (row, group), the range ratio in CLIP_RATIOS whose quantized weights give the least
    output error on that group's inputs (the group's diagonal block of the Gram matrix, of inputs divided by
    `input_scale` where the weight's columns were multiplied by it) -> (clipped weight, mean ratio chosen).
    Not exact: it changes the float weights, trading outliers for resolution."""
    import torch

    out, columns = weight.shape
    group = columns if group_size == -1 else group_size
    groups = columns // group
    blocks = torch.stack([gram[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(groups)])
    if input_scale is not None:
        divisor = input_scale.reshape(groups, group)
        blocks /= divisor[:, :, None] * divisor[:, None, :]
    frozen = torch.zeros(out, dtype=torch.bool)
    if frozen_rows is not None:
        frozen[frozen_rows] = True
    clipped = torch.empty_like(weight)
    step = max(1, CLIP_ELEMENTS // columns)

    def piece(start: int):
        rows = slice(start, start + step)
        clipped[rows], ratios = _clip_rows(weight[rows], blocks, bits, group_size, symmetric, frozen[rows])
        return float(ratios.sum())

    return clipped, sum(in_pieces(piece, range(0, out, step))) / (out * groups)


def _clip_rows(weight, blocks, bits: int, group_size: int, symmetric: bool, frozen):
    """search_clip on a few rows -> (their clipped weights, the ratio chosen per (row, group))."""
    import torch

    out, columns = weight.shape
    groups, group = blocks.shape[0], blocks.shape[1]
    grouped = weight.reshape(out, groups, group)
    high, low = grouped.amax(-1, keepdim=True).clamp(min=0), grouped.amin(-1, keepdim=True).clamp(max=0)
    if symmetric:
        high = torch.maximum(high, -low)
        low = -high
    best_error = torch.full((out, groups), float("inf"))
    best = grouped.clone()
    chosen = torch.ones(out, groups)
    for ratio in CLIP_RATIOS:
        clipped = torch.maximum(torch.minimum(grouped, high * ratio), low * ratio)
        delta = grouped - fake_quantize(clipped.reshape(out, columns), bits, group_size, symmetric).reshape(out, groups, group)
        error = torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta)
        if ratio < 1:
            error[frozen] = float("inf")
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better[..., None], clipped, best)
        chosen = torch.where(better, torch.full_like(chosen, ratio), chosen)
    return best.reshape(out, columns), chosen


def consumer_columns(mapping: Mapping, shape: Shape) -> np.ndarray:
    if mapping.kind == V_O:
        return shape.o_columns_to_v()
    width = shape.intermediate if mapping.kind == UP_DOWN else shape.hidden
    return np.arange(width)


def apply_scale(model, mapping: Mapping, scale, shape: Shape) -> None:
    """Rescale one mapping in place (exact in real arithmetic): producer / s, consumer columns x s."""
    import torch

    block = model.model.layers[mapping.layer]
    with torch.no_grad():
        if mapping.kind in (NORM_QKV, NORM_GATE_UP):
            norm, linear = ((block.input_layernorm, block.self_attn.qkv_proj) if mapping.kind == NORM_QKV
                            else (block.post_attention_layernorm, block.mlp.gate_up_proj))
            _scale_(norm.weight, 1 / scale)
            _scale_(linear.weight, scale)
        elif mapping.kind == V_O:
            qkv = block.self_attn.qkv_proj
            _scale_rows(qkv, shape.v_rows, 1 / scale)
            _scale_(block.self_attn.o_proj.weight, scale[torch.as_tensor(shape.o_columns_to_v())])
        else:
            up = slice(shape.intermediate, 2 * shape.intermediate)
            _scale_rows(block.mlp.gate_up_proj, up, 1 / scale)
            _scale_(block.mlp.down_proj.weight, scale)


def _scale_(tensor, factor) -> None:
    """tensor *= factor along its last axis, in fp32, written back in the tensor's own dtype."""
    tensor.data.copy_((tensor.data.float() * factor.float()).to(tensor.dtype))


def _scale_rows(linear, rows: slice, factor) -> None:
    weight = linear.weight.data
    weight[rows] = (weight[rows].float() * factor.float()[:, None]).to(weight.dtype)
    if linear.bias is not None:
        linear.bias.data[rows] = (linear.bias.data[rows].float() * factor.float()).to(linear.bias.dtype)
