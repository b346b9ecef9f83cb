"""GGUF's Q4_0, Q4_1 and Q8_0 blocks from integer weights, exactly. Pure numpy: arrays in, bytes out.

ggml's blocks hold 32 consecutive inputs of one row each (ggml-common.h):
  Q4_0 (18 bytes): d fp16, qs[16]; byte j holds element j in its low nibble and element j+16 in its high one;
                   weight = (nibble - 8) * d
  Q4_1 (20 bytes): d fp16, m fp16, qs[16] as Q4_0; weight = nibble * d + m
  Q8_0 (34 bytes): d fp16, qs[32] int8; weight = q * d

A group of 32·k inputs with one scale is k blocks with that scale repeated, so any group size that is a
multiple of 32 carries over. Symmetric 4-bit codes are stored unsigned with a zero point of 8 (QuantizedLinear),
which is Q4_0's nibble as it is: only the order inside a block and fp32 → fp16 scales change. Asymmetric 4-bit:
(code - zero) * s = code * s - zero * s, so d = s, m = -zero * s (m rounded to fp16: exact up to that).
Symmetric 8-bit: the code less 128 is Q8_0's int8.
"""

from __future__ import annotations

import numpy as np

from compress.export.repack import QuantizedLinear, fp16_scales

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def block_type(bits: int, symmetric: bool) -> str | None:
    """The GGUF block type that holds such weights exactly, or None."""
    return {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}.get((bits, symmetric))


def why_not_exact(bits: int, group_size: int, symmetric: bool, in_features: int | None = None) -> str | None:
    """None when GGUF blocks hold this scheme exactly, else the reason in words."""
    if block_type(bits, symmetric) is None:
        kind = "symmetric" if symmetric else "asymmetric"
        return f"{kind} {bits}-bit weights have no exact GGUF block (symmetric 4 → Q4_0, asymmetric 4 → Q4_1, symmetric 8 → Q8_0)"
    if group_size != -1 and group_size % BLOCK:
        return f"group size {group_size} is not a multiple of GGUF's 32-weight blocks"
    if in_features is not None and in_features % BLOCK:
        return f"{in_features} inputs per row is not a multiple of GGUF's 32-weight blocks"
    return None


def _per_block(values: np.ndarray, linear: QuantizedLinear) -> np.ndarray:
    """[out, groups] -> [out, blocks]: each group's value repeated over its blocks."""
    return np.repeat(values, linear.group_size // BLOCK, axis=1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """[out, blocks] float -> [out, blocks, 2] uint8, little-endian fp16."""
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def pack_blocks(linear: QuantizedLinear) -> tuple[str, np.ndarray]:
    """-> (GGUF type name, [out, blocks * block bytes] uint8) holding `linear`'s weights."""
    kind = block_type(linear.bits, bool(np.all(linear.zeros == 1 << (linear.bits - 1))))
    reason = why_not_exact(linear.bits, linear.group_size, kind != "Q4_1", linear.in_features)
    if kind is None or reason:
        raise ValueError(reason or f"{linear.bits}-bit weights with zero points have no exact GGUF block")
    rows, blocks = linear.out_features, linear.in_features // BLOCK
    codes = linear.codes.reshape(rows, blocks, BLOCK)
    scales = _per_block(fp16_scales(linear).scales, linear)
    if kind == "Q8_0":
        parts = [_fp16_bytes(scales), (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:
        nibbles = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
        parts = [_fp16_bytes(scales), nibbles]
        if kind == "Q4_1":
            minimum = -_per_block(linear.zeros.astype(np.float32), linear) * scales
            parts.insert(1, _fp16_bytes(minimum))
    return kind, np.concatenate(parts, axis=-1).reshape(rows, blocks * BLOCK_BYTES[kind])


def unpack_blocks(kind: str, data: np.ndarray, in_features: int) -> np.ndarray:
    """[out, in] float32 weights of GGUF blocks (the reference decoder for tests; ggml's own is gguf-py's)."""
    rows = data.shape[0]
    blocks = data.reshape(rows, in_features // BLOCK, BLOCK_BYTES[kind])
    d = blocks[..., :2].copy().view("<f2").astype(np.float32)
    if kind == "Q8_0":
        return (blocks[..., 2:].view(np.int8).astype(np.float32) * d).reshape(rows, in_features)
    offset = 4 if kind == "Q4_1" else 2
    qs = blocks[..., offset:]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view("<f2").astype(np.float32)
        return (nibbles * d + m).reshape(rows, in_features)
    return ((nibbles - 8) * d).reshape(rows, in_features)
