"""Integer weights as compressed-tensors defines them: min-max scales per group, codes, packing.

Thin, pure wrappers over compressed-tensors' own functions (the ones llm-compressor's observers and
compressors call), so that a layer quantized here is stored exactly as llm-compressor would store it.
Shapes: weight [out, in]; scale and zero [out, groups]; codes [out, in] int8 (signed, zero-centred).
"""

from __future__ import annotations

import torch


def weight_args(bits: int, group_size: int, symmetric: bool, actorder: str | None = None):
    """compressed-tensors QuantizationArgs for integer weights (group_size -1: one group per output row)."""
    from compressed_tensors.quantization import QuantizationArgs

    strategy = "channel" if group_size == -1 else "group"
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=None if group_size == -1 else group_size, actorder=actorder,
                            observer="memoryless_minmax")


def minmax_qparams(weight: torch.Tensor, args, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group from its min and max, as llm-compressor's memoryless min-max
    observer computes them; the scale rounded to `scale_dtype` (the stored dtype it is saved in)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    out, columns = weight.shape
    group = columns if args.group_size is None else args.group_size
    grouped = weight.reshape(out, columns // group, group)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    return scale.to(scale_dtype).float(), zero.float()


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args) -> torch.Tensor:
    """Round to the grid and back: what the quantized layer computes with. [out, in] float32."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    return ct_fake_quantize(weight, scale, zero, args)


CODES_CHUNK = 64 << 20  # bytes of float32 rows rounded at a time


def integer_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args) -> torch.Tensor:
    """The signed integer codes of `weight` on the grid (exact for weights already on it). int8 [out, in].

    Rows go through compressed-tensors' quantize CODES_CHUNK at a time (each row's groups are its own): whole,
    its float32 temporaries of a Phi-4 gate_up_proj (0.7 GB each) were one of layer-by-layer GPTQ's high points."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    if scale.dim() != 2 or scale.shape[0] != weight.shape[0]:
        return quantize(weight, scale, zero, args, dtype=torch.int8)
    codes = torch.empty(weight.shape, dtype=torch.int8)
    rows = max(1, CODES_CHUNK // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        stop = start + rows
        codes[start:stop] = quantize(weight[start:stop], scale[start:stop], None if zero is None else zero[start:stop],
                                     args, dtype=torch.int8)
    return codes


def packed_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args,
                   scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A `pack-quantized` Linear's tensors: weight_packed, weight_scale, weight_shape (+ weight_zero_point
    for asymmetric schemes, packed along the output dimension)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    tensors = {
        "weight_packed": pack_to_int32(codes, args.num_bits),
        "weight_scale": scale.to(scale_dtype),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if not args.symmetric:
        tensors["weight_zero_point"] = packed_zero_points(zero, args)
    return tensors


def packed_zero_points(zero: torch.Tensor, args) -> torch.Tensor:
    """Asymmetric zero points [out, groups] packed along the output dimension, as pack-quantized stores them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(zero.to(torch.int8), args.num_bits, packed_dim=0)
