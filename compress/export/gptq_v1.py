"""AutoGPTQ v1 folders, converted from a compressed-tensors `pack-quantized` folder.

This is the layout the ONNX GenAI model builder reads as a pre-quantized input (`quant_method: gptq`), so
GPTQ weights reach ONNX without being rounded again. The folder walking here is shared with awq_gemm.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.export.repack import GPTQ_BITS, QuantizedLinear, pack_gptq_v1, unpack_compressed_tensors
from compress.tensors import TensorFolder

# Files a runnable folder needs besides weights and config.json.
CARRIED_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template*", "*.jinja",
)
INDEX_FILE = "model.safetensors.index.json"
# compressed-tensors tensors that make up one quantized Linear, by suffix after the module name.
LAYER_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
QUANTIZATION_PREFIXES = ("weight", "input_", "output_")  # any other such tensor (weight_g_idx, ...) is refused


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int  # -1: one group per row (compressed-tensors' channel strategy)
    symmetric: bool


def read_scheme(ct_folder: Path) -> Scheme:
    """The one integer weight-only scheme a compressed-tensors folder uses; refuses anything else."""
    config = json.loads((ct_folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{ct_folder} is not a compressed-tensors checkpoint (quant_method {quantization.get('quant_method')!r})")
    schemes = set()
    for name, group in (quantization.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if group.get("format", quantization.get("format")) != "pack-quantized" or weights.get("type") != "int":
            raise ValueError(f"config group {name} is not pack-quantized integer weights")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"config group {name} quantizes activations, which GPTQ and AWQ files cannot hold")
        if weights.get("actorder") == "group":
            raise ValueError(f"config group {name} uses act-order groups (g_idx), which this export does not support")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"config group {name} uses the {strategy!r} strategy; only group and channel can be repacked")
        group_size = -1 if strategy == "channel" else int(weights["group_size"])
        schemes.add(Scheme(int(weights["num_bits"]), group_size, bool(weights["symmetric"])))
    if len(schemes) != 1:
        raise ValueError(f"{ct_folder} uses {len(schemes)} weight schemes; GPTQ and AWQ folders hold exactly one")
    return schemes.pop()


def _layer(folder: TensorFolder, module: str, scheme: Scheme) -> QuantizedLinear:
    def read(part: str):
        name = f"{module}.{part}"
        return folder.tensor(name) if name in folder else None

    scale = read("weight_scale").float().numpy()
    zero_point = read("weight_zero_point")
    return unpack_compressed_tensors(
        read("weight_packed").numpy(), scale, None if zero_point is None else zero_point.numpy(),
        tuple(read("weight_shape").tolist()), scheme.bits, scheme.group_size, scheme.symmetric,
    )


def repack_folder(ct_folder: Path, out: Path, pack: Callable[[QuantizedLinear], dict[str, np.ndarray]],
                  quantization_config: dict, scheme: Scheme) -> Path:
    """Write `out`: every quantized Linear as `pack` lays it out, every other tensor unchanged, config.json
    with `quantization_config`, and the tokenizer and generation files. Shards keep their names."""
    import torch
    from safetensors.torch import save_file

    ct_folder, out = Path(ct_folder), Path(out)
    if out.resolve() == ct_folder.resolve():
        raise ValueError("the output folder must differ from the compressed-tensors folder")
    # Plain reads (TensorFolder), not safetensors' memory map: mapped pages stay resident once touched, and a
    # map held over the whole folder grew the writer by the folder's size (2.7 GB at Phi-4-mini's shape).
    folder = TensorFolder(ct_folder)
    if not folder.files:
        raise ValueError(f"{ct_folder} has no .safetensors files")
    files = [path.name for path in folder.files]
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total_bytes = {}, 0
    modules = {name.removesuffix(".weight_packed") for name in folder.keys() if name.endswith(".weight_packed")}
    for name in folder.keys():
        module, _, part = name.rpartition(".")
        if module in modules and part.startswith(QUANTIZATION_PREFIXES) and part not in LAYER_PARTS:
            raise ValueError(f"{name}: a quantized Linear with a {part} tensor cannot be repacked (act-order or an unsupported scheme)")
    for file in files:
        tensors = {}
        for name in [name for name in folder.keys() if folder.file_of(name).name == file]:
            module, _, part = name.rpartition(".")
            if module not in modules or part not in LAYER_PARTS:  # bias and unquantized tensors
                tensors[name] = folder.tensor(name)
            elif part == "weight_packed":
                packed = pack(_layer(folder, module, scheme))
                tensors.update({f"{module}.{key}": torch.from_numpy(value) for key, value in packed.items()})
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        del tensors
    if (ct_folder / INDEX_FILE).is_file():
        index = json.loads((ct_folder / INDEX_FILE).read_text())
        metadata = {**index.get("metadata", {}), "total_size": total_bytes}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((ct_folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for pattern in CARRIED_PATTERNS:
        for path in ct_folder.glob(pattern):
            if path.is_file():
                shutil.copy2(path, out / path.name)
    return out


def require_groups(scheme: Scheme, fmt: str) -> None:
    if scheme.group_size == -1:
        raise ValueError(
            f"one group per row (channel strategy) is not exported to {fmt}: the ONNX GenAI builder turns it into "
            "MatMulNBits blocks of the whole input width, which must be a power of two; use a group size"
        )


def write_gptq_v1(ct_folder: Path, out: Path) -> Path:
    """Convert a compressed-tensors folder into an AutoGPTQ v1 folder (`quant_method: gptq`)."""
    scheme = read_scheme(Path(ct_folder))
    if scheme.bits not in GPTQ_BITS:
        raise ValueError(f"AutoGPTQ v1 folders hold {', '.join(map(str, GPTQ_BITS))}-bit weights, not {scheme.bits}-bit")
    require_groups(scheme, "AutoGPTQ v1")
    config = {
        "quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
        "desc_act": False, "sym": scheme.symmetric, "checkpoint_format": "gptq",
    }
    return repack_folder(ct_folder, out, pack_gptq_v1, config, scheme)

