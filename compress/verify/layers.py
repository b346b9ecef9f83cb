"""Per-layer sensitivity: each quantized layer's output error against the original, on calibration data.

For layer l with original weight W and the artifact's dequantized weight Ŵ, on the original model's own
inputs X to that layer: SQNR = 10·log10(‖XWᵀ‖² / ‖X(W − Ŵ)ᵀ‖²) in dB. Worst layers first. The maths is
`sqnr_db`; `layer_sensitivity` runs the original model once with hooks and reads Ŵ from the artifact.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal / noise); +inf when the layer is reproduced exactly."""
    if noise_power <= 0:
        return math.inf
    return 10 * math.log10(signal_power / noise_power) if signal_power > 0 else -math.inf


def dequantized_weights(folder: Path, plan: dict[str, int], group_size: int, symmetric: bool,
                        layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """{layer: Ŵ [out, in] float32} for every quantized layer of a compressed-tensors folder (or those in
    `layers`), read one layer at a time."""
    from compress.export.repack import dequantize, unpack_compressed_tensors
    from compress.tensors import TensorFolder

    weights = {}
    with TensorFolder(folder) as tensors:
        for layer, bits in plan.items():
            if f"{layer}.weight_packed" not in tensors or (layers is not None and layer not in layers):
                continue
            zero = f"{layer}.weight_zero_point"
            linear = unpack_compressed_tensors(
                tensors.array(f"{layer}.weight_packed"), tensors.array(f"{layer}.weight_scale"),
                tensors.array(zero) if zero in tensors else None,
                tuple(tensors.array(f"{layer}.weight_shape")), bits, group_size, symmetric,
            )
            weights[layer] = dequantize(linear)
    return weights


def stored_linear(tensors, layer: str):
    """The integer weights of one compressed-tensors Linear (compress.export.repack.QuantizedLinear), its scheme
    read from its own tensors: bits from the packed width, group size from the scales, a zero point or none."""
    from compress.export.repack import unpack_compressed_tensors

    packed = tensors.array(f"{layer}.weight_packed")
    shape = tuple(int(size) for size in tensors.array(f"{layer}.weight_shape"))
    scale = tensors.tensor(f"{layer}.weight_scale").float().numpy()
    zero = tensors.array(f"{layer}.weight_zero_point") if f"{layer}.weight_zero_point" in tensors else None
    bits = packed.shape[1] * 32 // shape[1]
    group_size = shape[1] // scale.reshape(shape[0], -1).shape[1]
    return unpack_compressed_tensors(packed, scale, zero, shape, bits, group_size, zero is None)


def layer_sensitivity(model_path: Path, folder: Path, plan: dict[str, int], group_size: int, symmetric: bool,
                      samples: np.ndarray) -> list[dict]:
    """[{layer, bits, sqnr_db}] worst first, from the original model run on `samples` [n, seq_len] one
    decoder layer at a time (compress.layerwise): each layer sees the original model's own inputs."""
    import torch

    from compress.layerwise import LayerwiseModel, run_all_layers

    power: dict[str, list[float]] = {}

    def hook(layer: str, weight: torch.Tensor):
        def record(module, inputs, output):
            error = torch.nn.functional.linear(inputs[0].float(), module.weight.float() - weight)
            power[layer][0] += float(output.float().pow(2).sum())
            power[layer][1] += float(error.pow(2).sum())
        return record

    def watch(index: int, block, _inputs):
        prefix = f"model.layers.{index}."
        names = [name for name in plan if name.startswith(prefix)]
        for name, weight in dequantized_weights(folder, plan, group_size, symmetric, names).items():
            power[name] = [0.0, 0.0]
            block.get_submodule(name.removeprefix(prefix)).register_forward_hook(hook(name, torch.from_numpy(weight)))
        return block

    with LayerwiseModel(model_path) as model:
        run_all_layers(model, samples, each_layer=watch).delete()
    rows = [{"layer": layer, "bits": plan[layer], "sqnr_db": sqnr_db(*power[layer])} for layer in power]
    return sorted(rows, key=lambda row: row["sqnr_db"])
