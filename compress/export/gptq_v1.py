"""AutoGPTQ v1 folders, converted from a compressed-tensors `pack-quantized` folder.

This is the layout the ONNX GenAI model builder reads as a pre-quantized input (`quant_method: gptq`), so
GPTQ weights reach ONNX without being rounded again. The folder walking here is shared with awq_gemm.py.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
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
    schemes = set(_group_schemes(ct_folder).values())
    if len(schemes) != 1:
        raise ValueError(f"{ct_folder} uses {len(schemes)} weight schemes; GPTQ and AWQ folders hold exactly one")
    return schemes.pop()


def read_layer_schemes(ct_folder: Path) -> dict[str, Scheme]:
    """{module: its scheme} for every quantized Linear of a compressed-tensors folder whose config groups name
    their layers (`re:^<module>$`, as mixed-precision folders here write them); a folder of one scheme for
    every Linear maps each of its modules to that scheme."""
    groups = _group_schemes(ct_folder)
    config = json.loads((Path(ct_folder) / "config.json").read_text())["quantization_config"]["config_groups"]
    with TensorFolder(Path(ct_folder)) as folder:
        modules = [name.removesuffix(".weight_packed") for name in folder.keys() if name.endswith(".weight_packed")]
    found = {}
    for module in modules:
        matching = [name for name, group in config.items()
                    if any(target == "Linear" or (target.startswith("re:") and re.fullmatch(target[3:], module))
                           for target in group.get("targets", []))]
        if len({groups[name] for name in matching}) != 1:
            raise ValueError(f"{module}: {len(matching)} config groups of {ct_folder} target it; it needs exactly one scheme")
        found[module] = groups[matching[0]]
    return found


def _group_schemes(ct_folder: Path) -> dict[str, Scheme]:
    config = json.loads((Path(ct_folder) / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{ct_folder} is not a compressed-tensors checkpoint (quant_method {quantization.get('quant_method')!r})")
    schemes = {}
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
        schemes[name] = Scheme(int(weights["num_bits"]), group_size, bool(weights["symmetric"]))
    return schemes


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
                  quantization_config: dict, scheme: Scheme | dict[str, Scheme]) -> Path:
    """Write `out`: every quantized Linear as `pack` lays it out (`scheme`: the folder's one scheme, or each
    module's), every other tensor unchanged, config.json with `quantization_config`, and the tokenizer and
    generation files. Shards keep their names."""
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
                packed = pack(_layer(folder, module, scheme if isinstance(scheme, Scheme) else scheme[module]))
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


def write_gptq_v1(ct_folder: Path, out: Path, mixed: bool = False) -> Path:
    """Convert a compressed-tensors folder into an AutoGPTQ v1 folder (`quant_method: gptq`).

    mixed: layers of several widths and group sizes (an auto variant's plan, a quantized head among them) go
    into one folder, the most common setting as the folder's and the others under `dynamic` (GPTQModel's
    per-module overrides, `+:<regex>` -> {bits, group_size}), which the ONNX GenAI builder reads per tensor.
    """
    if not mixed:
        scheme = read_scheme(Path(ct_folder))
        _check_gptq(scheme)
        config = {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
                  "desc_act": False, "sym": scheme.symmetric, "checkpoint_format": "gptq"}
        return repack_folder(ct_folder, out, pack_gptq_v1, config, scheme)
    schemes = read_layer_schemes(Path(ct_folder))
    for scheme in set(schemes.values()):
        _check_gptq(scheme)
    if len({scheme.symmetric for scheme in schemes.values()}) != 1:
        raise ValueError(f"{ct_folder} mixes symmetric and asymmetric layers; a GPTQ folder has one `sym`")
    common = Counter(scheme for module, scheme in schemes.items() if module != "lm_head").most_common(1)[0][0]
    dynamic = {f"+:{re.escape(module)}\\.": {"bits": scheme.bits, "group_size": scheme.group_size}
               for module, scheme in sorted(schemes.items()) if scheme != common}
    config = {"quant_method": "gptq", "bits": common.bits, "group_size": common.group_size, "desc_act": False,
              "sym": common.symmetric, "checkpoint_format": "gptq", "dynamic": dynamic}
    return repack_folder(ct_folder, out, pack_gptq_v1, config, schemes)


def _check_gptq(scheme: Scheme) -> None:
    if scheme.bits not in GPTQ_BITS:
        raise ValueError(f"AutoGPTQ v1 folders hold {', '.join(map(str, GPTQ_BITS))}-bit weights, not {scheme.bits}-bit")
    require_groups(scheme, "AutoGPTQ v1")
