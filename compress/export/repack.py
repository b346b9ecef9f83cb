"""Repack integer weights between compressed-tensors, AutoGPTQ v1 and AutoAWQ GEMM layouts.

Pure numpy: arrays in, arrays out, no I/O. Every format stores the same numbers (unsigned codes,
unsigned zero points, one scale per group of inputs); only the packing differs:

  compressed-tensors `pack-quantized` (0.19):
    weight_packed     [out, ceil(in*bits/32)] int32, packed along the input dim, a dense little-endian
                      bit stream (value i at bit i*bits) of the signed code + 2^(bits-1), i.e. the
                      unsigned code
    weight_scale      [out, groups] float
    weight_zero_point [ceil(out*bits/32), groups] int32, asymmetric only, packed the same way along the
                      output dim; symmetric schemes have none and imply a zero point of 2^(bits-1)
  AutoGPTQ v1: qweight [in*bits/32, out] packed along the input dim, qzeros [groups, out*bits/32]
    packed along the output dim holding zero - 1, scales [groups, out] float16, g_idx [in]
  AutoAWQ GEMM (4-bit): qweight [in, out/8] and qzeros [groups, out/8] packed along the output dim in
    the interleaved order AWQ_ORDER, zeros without offset, scales [groups, out] float16

In every layout the first value of an int32 sits in its lowest bits.
Weight = (code - zero) * scale, the same formula compressed-tensors' `dequantize` uses on signed values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

GPTQ_BITS = (2, 4, 8)  # the int32 packings AutoGPTQ and the ONNX GenAI builder share
AWQ_BITS = (4,)
# Word position k of an AutoAWQ GEMM int32 holds output column 8*j + AWQ_ORDER[k] (AutoAWQ's
# WQLinear_GEMM.from_linear; the ONNX GenAI builder undoes it in AWQModel.reverse_reorder_tensor).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized Linear in plain, unpacked form."""

    codes: np.ndarray  # [out, in] uint8, 0 .. 2^bits-1
    scales: np.ndarray  # [out, groups] float32 (float16 values once a format has rounded them)
    zeros: np.ndarray  # [out, groups] uint8, unsigned zero point (2^(bits-1) for symmetric schemes)
    bits: int
    group_size: int  # inputs per group; in_features when there is one group per row

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def groups(self) -> int:
        return self.scales.shape[1]


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values along the last axis, 32/bits per int32, first value lowest."""
    per_word = 32 // bits
    if 32 % bits or values.shape[-1] % per_word:
        raise ValueError(f"cannot pack {values.shape[-1]} values of {bits} bits into whole int32 words")
    words = np.zeros((*values.shape[:-1], values.shape[-1] // per_word), dtype=np.uint32)
    for position in range(per_word):
        words |= values[..., position::per_word].astype(np.uint32) << np.uint32(position * bits)
    return words.view(np.int32)


def unpack_int32(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` unsigned `bits`-bit values along the last axis of int32 `words`, as uint8.

    The words are read as one little-endian bit stream, first value lowest: for 1, 2, 4 and 8 bits that is
    32/bits values per word; for 3, 5, 6 and 7 bits values straddle words, as compressed-tensors packs them.
    """
    words = np.ascontiguousarray(words).view(np.uint32).astype("<u4")
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    usable = stream.shape[-1] // bits
    values = stream[..., : usable * bits].reshape(*words.shape[:-1], usable, bits)
    values = (values.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)
    if count > values.shape[-1]:
        raise ValueError(f"{words.shape[-1]} int32 words hold {values.shape[-1]} values, not {count}")
    return values[..., :count]


def unpack_compressed_tensors(
    packed: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    symmetric: bool,
) -> QuantizedLinear:
    """A `pack-quantized` Linear (group or channel strategy; group_size -1 = one group per row)."""
    out_features, in_features = (int(size) for size in shape)
    group_size = in_features if group_size in (None, -1) else int(group_size)
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_features} input features")
    groups = in_features // group_size
    scale = np.asarray(scale, dtype=np.float32).reshape(out_features, -1)  # [out, groups]
    if scale.shape[1] != groups:
        raise ValueError(f"{scale.shape[1]} scales per row do not match {groups} groups of {group_size}")
    # packed: [out, ceil(in*bits/32)] int32; its bit fields are already the unsigned codes
    codes = unpack_int32(packed, bits, in_features)  # [out, in]
    if symmetric:
        if zero_point is not None:
            raise ValueError("a symmetric scheme stores no zero point, but one was given")
        zeros = np.full((out_features, groups), 1 << (bits - 1), dtype=np.uint8)
    elif zero_point is None:
        raise ValueError("an asymmetric scheme needs its weight_zero_point")
    else:
        # zero_point: [ceil(out*bits/32), groups] int32, packed along the output dim
        zeros = unpack_int32(np.asarray(zero_point).T, bits, out_features).T  # [out, groups]
    return QuantizedLinear(codes, scale, np.ascontiguousarray(zeros), bits, group_size)


def dequantize(linear: QuantizedLinear) -> np.ndarray:
    """Float weights [out, in] float32: (code - zero) * scale, group by group."""
    shape = (linear.out_features, linear.groups, linear.group_size)
    centered = linear.codes.reshape(shape).astype(np.float32) - linear.zeros[..., None].astype(np.float32)
    return (centered * linear.scales[..., None].astype(np.float32)).reshape(linear.out_features, linear.in_features)


def fp16_scales(linear: QuantizedLinear) -> QuantizedLinear:
    """The same layer with scales rounded to float16, the only change GPTQ and AWQ files make."""
    with np.errstate(over="ignore"):
        scales = linear.scales.astype(np.float16)
    if not np.all(np.isfinite(scales)):
        raise ValueError("a scale does not fit in float16 (largest 65504)")
    return replace(linear, scales=scales.astype(np.float32))


def _check_packable(linear: QuantizedLinear, supported: tuple[int, ...], fmt: str) -> None:
    if linear.bits not in supported:
        raise ValueError(f"{fmt} holds {', '.join(map(str, supported))}-bit weights, not {linear.bits}-bit")
    if linear.in_features != linear.groups * linear.group_size:
        raise ValueError(f"{linear.groups} groups of {linear.group_size} do not cover {linear.in_features} inputs")


def pack_gptq_v1(linear: QuantizedLinear) -> dict[str, np.ndarray]:
    """AutoGPTQ v1 tensors for one Linear: qweight, qzeros, scales, g_idx.

    v1 stores zero - 1; a zero point of 0 wraps to 2^bits - 1, which readers that mask after adding
    the 1 back (the ONNX GenAI builder, unpack_gptq_v1) restore exactly.
    """
    _check_packable(linear, GPTQ_BITS, "AutoGPTQ v1")
    mask = (1 << linear.bits) - 1
    scales = fp16_scales(linear).scales
    return {
        "qweight": pack_int32(linear.codes, linear.bits).T.copy(),  # [in*bits/32, out] int32
        "qzeros": pack_int32((linear.zeros.T.astype(np.int32) - 1) & mask, linear.bits),  # [groups, out*bits/32]
        "scales": scales.T.astype(np.float16).copy(),  # [groups, out] float16
        "g_idx": (np.arange(linear.in_features) // linear.group_size).astype(np.int32),  # [in] int32
    }


def unpack_gptq_v1(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int) -> QuantizedLinear:
    """The Linear held by AutoGPTQ v1 tensors; act-order (a permuted g_idx) is refused."""
    in_features, out_features = len(g_idx), scales.shape[1]
    groups = scales.shape[0]  # scales: [groups, out]
    if in_features % groups:
        raise ValueError(f"{groups} groups do not divide {in_features} input features")
    group_size = in_features // groups
    if not np.array_equal(g_idx, np.arange(in_features) // group_size):
        raise ValueError("g_idx is not input // group_size: act-order checkpoints are not supported")
    codes = unpack_int32(np.asarray(qweight).T, bits, in_features)  # [out, in]
    stored = unpack_int32(qzeros, bits, out_features).astype(np.int32)  # [groups, out], zero - 1
    zeros = ((stored + 1) & ((1 << bits) - 1)).astype(np.uint8).T
    return QuantizedLinear(codes, scales.astype(np.float32).T.copy(), zeros.copy(), bits, group_size)


def _awq_interleave(values: np.ndarray) -> np.ndarray:
    """Reorder the last axis (output columns) so that packing it plainly gives AutoAWQ's word order."""
    columns = values.shape[-1]
    order = (np.arange(0, columns, 8)[:, None] + np.array(AWQ_ORDER)).reshape(-1)
    return values[..., order]


def pack_awq_gemm(linear: QuantizedLinear) -> dict[str, np.ndarray]:
    """AutoAWQ GEMM tensors for one Linear: qweight, qzeros, scales. 4-bit only."""
    if linear.bits not in AWQ_BITS:
        raise ValueError(f"AutoAWQ GEMM holds 4-bit weights only; this layer has {linear.bits}-bit weights")
    _check_packable(linear, AWQ_BITS, "AutoAWQ GEMM")
    if linear.out_features % 8:
        raise ValueError(f"AutoAWQ GEMM needs output features in multiples of 8, not {linear.out_features}")
    return {
        "qweight": pack_int32(_awq_interleave(linear.codes.T), linear.bits),  # [in, out/8] int32
        "qzeros": pack_int32(_awq_interleave(linear.zeros.T), linear.bits),  # [groups, out/8] int32
        "scales": fp16_scales(linear).scales.T.astype(np.float16).copy(),  # [groups, out] float16
    }


def unpack_awq_gemm(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int = 4) -> QuantizedLinear:
    """The Linear held by AutoAWQ GEMM tensors."""
    if bits not in AWQ_BITS:
        raise ValueError(f"AutoAWQ GEMM holds 4-bit weights only, not {bits}-bit")
    in_features, out_features = qweight.shape[0], scales.shape[1]
    groups = scales.shape[0]  # scales: [groups, out]
    if in_features % groups:
        raise ValueError(f"{groups} groups do not divide {in_features} input features")
    inverse = np.argsort(AWQ_ORDER)
    undo = (np.arange(0, out_features, 8)[:, None] + inverse).reshape(-1)
    codes = unpack_int32(qweight, bits, out_features)[:, undo].T  # [out, in]
    zeros = unpack_int32(qzeros, bits, out_features)[:, undo].T  # [out, groups]
    return QuantizedLinear(codes.copy(), scales.astype(np.float32).T.copy(), zeros.copy(), bits, in_features // groups)
