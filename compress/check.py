"""What `compress verify` checks in any artifact folder before measuring it: which format it is, whether its
files are whole, whether its config agrees with its tensors, whether its tokenizer is the baseline's, and
whether each quantized layer still resembles the baseline's weights. Every problem is one sentence.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np

FORMATS = ("compressed-tensors", "gptq", "awq", "onnx")
# A quantized layer whose weights are this far from the baseline's is broken, not merely rounded: 2-bit
# RTN still keeps about 8 dB, while a layer with its scales ×4 falls to about −9 dB and a zeroed one to 0.
MIN_WEIGHT_SQNR_DB = 5.0


class FormatError(ValueError):
    """A folder compress cannot verify; the message is one sentence for the user."""


def detect_format(folder: Path) -> str:
    """The artifact format, from the folder's own files."""
    if folder.is_file() and folder.suffix == ".gguf" or folder.is_dir() and len(list(folder.glob("*.gguf"))) == 1:
        return "gguf"
    if not folder.is_dir():
        raise FormatError(f"artifact folder {folder} does not exist" if not folder.exists() else
                          f"{folder} is a file; compress verify takes an artifact folder or a .gguf file")
    if (folder / "genai_config.json").is_file() and any(folder.glob("*.onnx")):
        return "onnx"
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            method = (json.loads(config_file.read_text()).get("quantization_config") or {}).get("quant_method")
        except json.JSONDecodeError:
            raise FormatError(f"{config_file} is not valid JSON") from None
        if method in ("compressed-tensors", "gptq", "awq"):
            return method
        raise FormatError(f"{folder} is not a quantized checkpoint compress can verify: its quantization_config "
                          f"names {method!r}; supported: compressed-tensors, gptq, awq, or an ONNX GenAI folder")
    raise FormatError(f"cannot tell the format of {folder}: it has neither config.json with a quantization_config "
                      "nor genai_config.json with an .onnx model")


def truncation_problems(folder: Path) -> list[str]:
    """Weight files shorter than their own headers say (safetensors) or than their graph needs (ONNX data)."""
    problems = []
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as handle:
            raw = handle.read(8)
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            header = handle.read(length) if length and length < size else b""
        try:
            entries = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"{file.name} is damaged or truncated: its safetensors header cannot be read")
            continue
        end = 8 + length + max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
        if end > size:
            problems.append(f"{file.name} is truncated: its header promises {end} bytes but the file has {size}")
    for graph in sorted(folder.glob("*.onnx")):
        problems += _onnx_external_data_problems(graph)
    return problems


def gguf_problems(file: Path) -> list[str]:
    """A GGUF file that cannot be read, or is shorter than its tensor table says."""
    from compress.export.gguf import gguf_module

    size = file.stat().st_size
    try:
        reader = gguf_module().GGUFReader(str(file))
    except Exception as error:  # gguf-py raises ValueError, struct.error, IndexError on damaged headers
        return [f"{file.name} cannot be read as GGUF ({type(error).__name__}: {str(error)[:80]}): it is damaged or truncated"]
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        return [f"{file.name} is truncated: its tensor table needs {end} bytes but the file has {size}"]
    return []


def gguf_tokenizer_problems(file: Path, baseline_tokenizer, text: str, work: Path) -> list[str]:
    """The GGUF's own vocabulary, as llama.cpp tokenizes with it, must encode the evaluation text exactly as the
    baseline's tokenizer does."""
    from compress.export.gguf import GgufError, llama_tokens

    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "tokenizer-check.txt"
    text_file.write_text(text, encoding="utf-8")
    try:
        ours = llama_tokens(file, text_file, work / "tokenizer-check.log").tolist()
    except GgufError as error:
        return [f"llama.cpp cannot tokenize with {file.name}'s vocabulary ({error})"]
    return _encoding_difference(ours, baseline_tokenizer(text, add_special_tokens=False)["input_ids"],
                                f"{file.name}'s vocabulary encodes the evaluation text differently from the baseline's "
                                "tokenizer in llama.cpp")


def _encoding_difference(ours: list[int], theirs: list[int], what: str) -> list[str]:
    """[] when the two encodings agree, else one sentence: `what`, where they part and their lengths."""
    if ours == theirs:
        return []
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    return [f"{what} (first difference at token {first}; {len(ours)} vs {len(theirs)} tokens): it belongs to another model"]


def _onnx_external_data_problems(graph: Path) -> list[str]:
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others for a damaged protobuf
        return [f"{graph.name} cannot be read as an ONNX model ({type(error).__name__})"]
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            needed[info["location"]] = max(needed.get(info["location"], 0), end)
    problems = []
    for location, end in needed.items():
        data = graph.parent / location
        size = data.stat().st_size if data.is_file() else 0
        if size < end:
            problems.append(f"{location} is truncated or missing: {graph.name} needs {end} bytes of it, the file has {size}")
    return problems


def _read_tensors(folder: Path, suffixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    from compress.tensors import read_arrays

    return read_arrays(folder, lambda name: name.endswith(suffixes))


def _ct_schemes(quantization: dict, layers: list[str]) -> dict[str, dict]:
    """Each quantized layer's weight scheme from compressed-tensors config_groups (targets: Linear or re:)."""
    schemes = {}
    for layer in layers:
        for group in (quantization.get("config_groups") or {}).values():
            targets = group.get("targets") or []
            if "Linear" in targets or any(t.startswith("re:") and re.search(t[3:], layer) for t in targets) or layer in targets:
                schemes[layer] = group["weights"]
                break
    return schemes


def quantized_layers(folder: Path, fmt: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """{layer: dequantized weight [out, in]} of a safetensors artifact, and config/tensor disagreements."""
    from compress.export import repack

    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    weights, problems = {}, []
    if fmt == "compressed-tensors":
        tensors = _read_tensors(folder, (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape"))
        layers = sorted(name.removesuffix(".weight_packed") for name in tensors if name.endswith(".weight_packed"))
        for layer, scheme in _ct_schemes(quantization, layers).items():
            out_features, in_features = (int(v) for v in tensors[f"{layer}.weight_shape"])
            group = in_features if scheme.get("strategy") == "channel" else int(scheme["group_size"])
            stored = in_features // max(1, tensors[f"{layer}.weight_scale"].reshape(out_features, -1).shape[1])
            if stored != group:
                problems.append(f"config.json says group_size {group}, but {layer} stores scales for groups of {stored}")
                continue
            linear = repack.unpack_compressed_tensors(
                tensors[f"{layer}.weight_packed"], tensors[f"{layer}.weight_scale"], tensors.get(f"{layer}.weight_zero_point"),
                (out_features, in_features), int(scheme["num_bits"]), group, bool(scheme["symmetric"]))
            weights[layer] = repack.dequantize(linear)
    else:
        tensors = _read_tensors(folder, (".qweight", ".qzeros", ".scales", ".g_idx"))
        bits, group = int(quantization.get("bits", 4)), int(quantization.get("group_size", 128))
        for layer in sorted(name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")):
            scales = tensors[f"{layer}.scales"]
            in_features = tensors[f"{layer}.qweight"].shape[0] * (32 // bits if fmt == "gptq" else 1)
            if in_features // scales.shape[0] != group:
                problems.append(f"config.json says group_size {group}, but {layer} stores scales for groups of "
                                f"{in_features // scales.shape[0]}")
                continue
            if fmt == "gptq":
                linear = repack.unpack_gptq_v1(tensors[f"{layer}.qweight"], tensors[f"{layer}.qzeros"], scales,
                                               tensors[f"{layer}.g_idx"], bits)
            else:
                linear = repack.unpack_awq_gemm(tensors[f"{layer}.qweight"], tensors[f"{layer}.qzeros"], scales, bits)
            weights[layer] = repack.dequantize(linear)
    return weights, problems


def weight_problems(weights: dict[str, np.ndarray], baseline_folder: Path) -> tuple[list[str], list[dict]]:
    """Layers whose dequantized weights are far from the baseline's, and every layer's weight SQNR."""
    from compress.verify.layers import sqnr_db

    originals = _read_tensors(baseline_folder, (".weight",))
    rows, problems = [], []
    for layer, weight in weights.items():
        original = originals.get(f"{layer}.weight")
        if original is None:
            continue
        original = original.astype(np.float32)
        if original.shape != weight.shape:
            problems.append(f"{layer} has shape {list(weight.shape)} but the baseline's is {list(original.shape)}")
            continue
        value = sqnr_db(float(np.sum(original**2)), float(np.sum((original - weight) ** 2)))
        rows.append({"layer": layer, "weight_sqnr_db": value})
        if value < MIN_WEIGHT_SQNR_DB:
            problems.append(f"{layer}: its weights are far from the baseline's (weight SQNR {value:.1f} dB, below "
                            f"{MIN_WEIGHT_SQNR_DB:g}); its scales or integer weights are wrong")
    return problems, sorted(rows, key=lambda row: row["weight_sqnr_db"] if math.isfinite(row["weight_sqnr_db"]) else 1e9)


def tokenizer_problems(folder: Path, baseline_tokenizer, text: str) -> list[str]:
    """The artifact's tokenizer must encode the evaluation text exactly as the baseline's does."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        return [f"the artifact's tokenizer cannot be loaded ({type(error).__name__})"]
    return _encoding_difference(tokenizer(text, add_special_tokens=False)["input_ids"],
                                baseline_tokenizer(text, add_special_tokens=False)["input_ids"],
                                "the artifact's tokenizer encodes the evaluation text differently from the baseline's")
