"""Pure arithmetic of the benchmarks: bytes read per decoded token, bandwidth use, linear fits, targets.

No I/O: tensor listings come in as {name: (numel, nbytes)} (see compress.verify.size.read_tensors /
read_onnx), node lists as [(op_type, inputs, attributes)].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TokenBytes:
    """Bytes read from memory to decode one token (../shared/METRICS.md, "Bandwidth bound")."""

    linear: int  # every linear layer of the decoder blocks: weights, scales, zero points
    head: int  # the LM head, whole: every decoded token needs every vocabulary logit
    embedding_row: int  # one row of the embedding table
    kv_cache: int  # K and V of every layer at the measured context

    @property
    def total(self) -> int:
        return self.linear + self.head + self.embedding_row + self.kv_cache

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: float, dtype_bytes: int) -> int:
    """K and V read by one decode step attending to `context` positions."""
    return round(2 * layers * kv_heads * head_dim * context * dtype_bytes)


def mean_decode_context(prompt_tokens: int, new_tokens: int) -> float:
    """Mean positions attended over the timed decode steps: step i (1..new-1) sees prompt + i tokens."""
    return prompt_tokens + new_tokens / 2


def _sizes(value) -> tuple[int, int]:
    """(numel, nbytes) from a listing entry: a pair, or an array (weight_shape tensors)."""
    if isinstance(value, np.ndarray):
        return int(value.size), int(value.nbytes)
    return int(value[0]), int(value[1])


def checkpoint_token_bytes(tensors: dict, vocab: int, tied: bool) -> tuple[int, int, int]:
    """(linear, head, embedding_row) bytes from a safetensors listing, float or compressed-tensors.

    Linear layers are every `model.layers.*.*_proj.*` tensor (weight, or weight_packed with its scales,
    zero points and shape); the head is `lm_head.*`, or the embedding table when the head is tied to it.
    """
    linear = head = table = 0
    for name, value in tensors.items():
        size = _sizes(value)[1]
        if name.startswith("model.layers.") and "_proj." in name:
            linear += size
        elif name.startswith("lm_head."):
            head += size
        elif name.startswith("model.embed_tokens."):
            table += size
    if tied and head == 0:
        head = table
    return linear, head, table // vocab


def dequantized_linear_bytes(tensors: dict, dtype_bytes: int) -> int:
    """Bytes of the decoder linear layers once a runtime dequantizes them (weight_shape products × dtype)."""
    total = 0
    for name, value in tensors.items():
        if name.startswith("model.layers.") and name.endswith(".weight_shape"):
            total += int(np.prod(value)) * dtype_bytes
        elif name.startswith("model.layers.") and name.endswith("_proj.weight"):
            total += _sizes(value)[0] * dtype_bytes
    return total


def onnx_token_bytes(initializers: dict[str, tuple[int, int]], nodes: list, vocab: int, hidden: int) -> tuple[int, int, int]:
    """(linear, head, embedding_row) bytes of an ONNX GenAI graph.

    MatMulNBits count their packed weights, scales, zero points and g_idx; MatMul / MatMulInteger their
    weight initializer (with `_scale` / `_zero_point`). The head is the one whose output width is the
    vocabulary (MatMulNBits N; a float weight of hidden × vocab elements).
    The embedding is the Gather / GatherBlockQuantized on `input_ids`; a table that is not an initializer
    (a Transpose or Reshape of the head's weights, when the builder shares them) is the head's bytes.
    """
    counted: set[str] = set()

    def take(names) -> int:
        present = [n for n in dict.fromkeys(names) if n in initializers and n not in counted]
        counted.update(present)
        return sum(initializers[n][1] for n in present)

    linear = head = 0
    gathers = []
    for op_type, inputs, attributes in nodes:
        if op_type == "MatMulNBits":
            size, width = take(inputs[1:5]), int(attributes["N"])
        elif op_type in ("MatMul", "MatMulInteger") and len(inputs) > 1 and inputs[1] in initializers:
            numel = initializers[inputs[1]][0]
            base = inputs[1].removesuffix("_quantized")
            size, width = take([inputs[1], base + "_scale", base + "_zero_point"]), (vocab if numel == hidden * vocab else 0)
        else:
            if op_type in ("Gather", "GatherBlockQuantized") and len(inputs) > 1 and inputs[1] == "input_ids":
                gathers.append(inputs)
            continue
        if width == vocab:
            head += size
        else:
            linear += size
    table = 0
    for inputs in gathers:
        if inputs[0] in initializers:  # a table of its own: data, then scales and zero points if quantized
            table += sum(initializers[n][1] for n in dict.fromkeys([inputs[0], *inputs[2:]]) if n in initializers)
        else:  # the head's weights reshaped: its bytes (scales and zero points included) hold the table
            table += head
    return linear, head, table // vocab


def bandwidth_use(bytes_per_token: int, decode_tps: float, bound_bytes_per_s: float) -> dict[str, float]:
    """Achieved bandwidth = bytes/token × tok/s, its share of the measured bound, and the bound in tok/s."""
    achieved = bytes_per_token * decode_tps
    return {
        "achieved_gb_per_s": achieved / 1e9,
        "share_of_bound": achieved / bound_bytes_per_s,
        "bound_tps": bound_bytes_per_s / bytes_per_token,
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = intercept + slope·x. -> (intercept, slope). Needs two distinct xs."""
    if len(set(xs)) < 2:
        raise ValueError("a line needs at least two distinct x values")
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return float(y.mean() - slope * x.mean()), slope


def extrapolate(fit: tuple[float, float], x: float) -> float:
    intercept, slope = fit
    return intercept + slope * x


def max_residual(fit: tuple[float, float], xs: list[float], ys: list[float]) -> float:
    """Largest |measured − fitted| relative to the measured value: how straight the line really is."""
    return max(abs(y - extrapolate(fit, x)) / abs(y) for x, y in zip(xs, ys, strict=True))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def target(name: str, measured: float | None, threshold: float, at_least: bool, detail: str = "") -> dict:
    """One target to report against (never asserted): met, missed, or not measured (None)."""
    met = None if measured is None else (measured >= threshold if at_least else measured <= threshold)
    return {"name": name, "measured": measured, "threshold": threshold, "at_least": at_least, "met": met, "detail": detail}


def gptq_work(config: dict) -> float:
    """Relative GPTQ cost of one decoder layer: Σ over its linear layers of out·in² (error propagation) + in³
    (the Hessian's Cholesky factorizations). Only ratios between widths mean anything."""
    hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim),
              (2 * intermediate, hidden), (hidden, intermediate)]  # (out, in): qkv, o, gate_up, down
    return float(sum(out * inp**2 + inp**3 for out, inp in shapes))


def predicted_seconds(layers: int, measured: list[tuple[int, float]], scale: float = 1.0) -> float | None:
    """Seconds a slice of `layers` should take, from measured (layers, seconds) slices of a width scaled by
    `scale` (1 for the same width): proportional to depth from the deepest measured slice, which
    overestimates a little (its fixed costs are scaled too). None with nothing measured."""
    if not measured:
        return None
    deepest = max(measured)
    return scale * deepest[1] * layers / deepest[0]
