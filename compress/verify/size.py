"""Size on disk and bits per weight (../shared/METRICS.md), read from an artifact's own files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# compressed-tensors stores a quantized Linear as these tensors beside each other.
QUANTIZED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")
NOT_COUNTED = {"manifest.json", "verdict.json"}


def folder_bytes(folder: Path) -> int:
    """Bytes of every file the artifact folder needs to run (the manifest and verdict are ours, not its)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in NOT_COUNTED)


def bits_per_weight(tensors: dict[str, np.ndarray | tuple[int, int]]) -> dict[str, float]:
    """Bits per weight from {name: array} (or {name: (numel, nbytes)}) of a checkpoint's tensors.

    Quantized layers are those with a `weight_packed` tensor; their weight count comes from
    `weight_shape`. -> {"bits_per_weight": quantized layers only, "bits_per_weight_all": whole model}.
    """

    def numel_bytes(value) -> tuple[int, int]:
        return (int(value.size), int(value.nbytes)) if isinstance(value, np.ndarray) else value

    layers = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_packed")}
    quantized_weights = quantized_bytes = other_params = other_bytes = 0
    for name, value in tensors.items():
        prefix, _, part = name.rpartition(".")
        count, size = numel_bytes(value)
        if prefix in layers:
            if part in QUANTIZED_PARTS:
                quantized_bytes += size
            if part == "weight_shape":
                quantized_weights += int(np.prod(value))
        else:
            other_params += count
            other_bytes += size
    total_params = quantized_weights + other_params
    return {
        "bits_per_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else float("nan"),
        "bits_per_weight_all": 8 * (quantized_bytes + other_bytes) / total_params if total_params else float("nan"),
        "quantized_weights": float(quantized_weights),
    }


def read_tensors(folder: Path) -> dict[str, np.ndarray | tuple[int, int]]:
    """{name: (numel, nbytes)} of every safetensors tensor, with `weight_shape` tensors read as arrays."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray | tuple[int, int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="np") as handle:
            for name in handle.keys():
                if name.endswith(".weight_shape"):
                    tensors[name] = handle.get_tensor(name)
                else:
                    sliced = handle.get_slice(name)
                    shape = sliced.get_shape()
                    count = int(np.prod(shape)) if shape else 1
                    tensors[name] = (count, count * _dtype_bytes(sliced.get_dtype()))
    return tensors


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]
