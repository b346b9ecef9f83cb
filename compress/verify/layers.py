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


def dequantized_weights(folder: Path, plan: dict[str, int], group_size: int, symmetric: bool) -> dict[str, np.ndarray]:
    """{layer: Ŵ [out, in] float32} for every quantized layer of a compressed-tensors folder."""
    from safetensors import safe_open

    from compress.export.repack import dequantize, unpack_compressed_tensors

    weights = {}
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="np") as handle:
            for name in handle.keys():
                if ".weight_" in name:
                    tensors[name] = handle.get_tensor(name)
    for layer, bits in plan.items():
        if f"{layer}.weight_packed" not in tensors:
            continue
        linear = unpack_compressed_tensors(
            tensors[f"{layer}.weight_packed"], tensors[f"{layer}.weight_scale"], tensors.get(f"{layer}.weight_zero_point"),
            tuple(tensors[f"{layer}.weight_shape"]), bits, group_size, symmetric,
        )
        weights[layer] = dequantize(linear)
    return weights


def layer_sensitivity(model_path: Path, folder: Path, plan: dict[str, int], group_size: int, symmetric: bool,
                      samples: np.ndarray) -> list[dict]:
    """[{layer, bits, sqnr_db}] worst first, from the original model run on `samples` [n, seq_len]."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = dequantized_weights(folder, plan, group_size, symmetric)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True).eval()
    power = {layer: [0.0, 0.0] for layer in quantized}
    modules = dict(model.named_modules())

    def hook(layer: str, weight: torch.Tensor):
        def record(module, inputs, output):
            error = torch.nn.functional.linear(inputs[0].float(), module.weight.float() - weight)
            power[layer][0] += float(output.float().pow(2).sum())
            power[layer][1] += float(error.pow(2).sum())
        return record

    handles = [modules[layer].register_forward_hook(hook(layer, torch.from_numpy(weight)))
               for layer, weight in quantized.items()]
    try:
        with torch.inference_mode():
            for sample in samples:
                model(torch.as_tensor(sample[None], dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    rows = [{"layer": layer, "bits": plan[layer], "sqnr_db": sqnr_db(*power[layer])} for layer in quantized]
    return sorted(rows, key=lambda row: row["sqnr_db"])
