"""Size on disk and bits per weight (../shared/METRICS.md), read from an artifact's own files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# How checkpoints store a quantized Linear: compressed-tensors (weight_packed + weight_shape) and the
# AutoGPTQ / AutoAWQ layouts (qweight packed 32/bits values per int32, with qzeros, scales, g_idx).
QUANTIZED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "qweight", "qzeros", "scales", "g_idx")
NOT_COUNTED = {"manifest.json", "verdict.json"}


def folder_bytes(folder: Path) -> int:
    """Bytes of every file the artifact folder needs to run (the manifest and verdict are ours, not its)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in NOT_COUNTED)


def bits_per_weight(tensors: dict[str, np.ndarray | tuple[int, int]], packed_bits: int | None = None) -> dict[str, float]:
    """Bits per weight from {name: array} (or {name: (numel, nbytes)}) of a checkpoint's tensors.

    Quantized layers are those with a `weight_packed` tensor (weight count from `weight_shape`) or a
    `qweight` tensor (weight count = its int32 count × 32 / packed_bits).
    -> {"bits_per_weight": quantized layers only, "bits_per_weight_all": whole model, "quantized_layer_bits":
    every layer a plan may change — the linear layers and the head, float ones at their stored width; a tied
    head that is not quantized counted as the embedding table it is (METRICS.md, mixed precision)}.
    """

    def numel_bytes(value) -> tuple[int, int]:
        return (int(value.size), int(value.nbytes)) if isinstance(value, np.ndarray) else value

    layers = {name.rsplit(".", 1)[0] for name in tensors if name.endswith((".weight_packed", ".qweight"))}
    quantized_weights = quantized_bytes = other_params = other_bytes = float_linear_params = float_linear_bytes = 0
    head_stored = any(name.startswith("lm_head.") for name in tensors)
    for name, value in tensors.items():
        prefix, _, part = name.rpartition(".")
        count, size = numel_bytes(value)
        if prefix in layers:
            if part in QUANTIZED_PARTS:
                quantized_bytes += size
            if part == "weight_shape":
                quantized_weights += int(np.prod(value))
            elif part == "qweight":
                if packed_bits is None:
                    raise ValueError("a qweight checkpoint needs its bit width to count its weights")
                quantized_weights += count * 32 // packed_bits
        else:
            other_params += count
            other_bytes += size
            if _float_linear(name, head_stored):
                float_linear_params += count
                float_linear_bytes += size
    total_params = quantized_weights + other_params
    layer_weights = quantized_weights + float_linear_params
    return {
        "bits_per_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else float("nan"),
        "bits_per_weight_all": 8 * (quantized_bytes + other_bytes) / total_params if total_params else float("nan"),
        "quantized_weights": float(quantized_weights),
        "quantized_layer_bits": 8 * (quantized_bytes + float_linear_bytes) / layer_weights if layer_weights else float("nan"),
    }


def _float_linear(name: str, head_stored: bool) -> bool:
    """Whether a float tensor is a linear layer's weight (norms and the embedding are not; a tied head is the
    embedding table, where no lm_head tensor is stored)."""
    if name.endswith("embed_tokens.weight"):
        return not head_stored
    return name.endswith(".weight") and "norm" not in name.rsplit(".", 2)[-2] and (name.startswith(("model.layers.", "lm_head.")))


def checkpoint_bits(folder: Path) -> dict[str, float]:
    """bits_per_weight of a safetensors checkpoint folder, any of the layouts above."""
    import json

    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    return bits_per_weight(read_tensors(folder), config.get("bits"))


def read_tensors(folder: Path) -> dict[str, np.ndarray | tuple[int, int]]:
    """{name: (numel, nbytes)} of every safetensors tensor, with `weight_shape` tensors read as arrays."""
    from compress.tensors import TensorFolder

    tensors: dict[str, np.ndarray | tuple[int, int]] = {}
    with TensorFolder(folder) as stored:
        for name in stored.keys():
            if name.endswith(".weight_shape"):
                tensors[name] = stored.array(name)
            else:
                shape, dtype = stored.shape_and_dtype(name)
                count = int(np.prod(shape)) if shape else 1
                tensors[name] = (count, count * _dtype_bytes(dtype))
    return tensors


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]


def onnx_bits_per_weight(initializers: dict[str, tuple[int, int]], nodes: list[tuple[str, list[str], dict]]) -> dict[str, float]:
    """Bits per weight of an ONNX graph from {initializer: (numel, nbytes)} and [(op_type, inputs, attributes)].

    Quantized layers: MatMulNBits (weights K×N; B, scales, zero points, g_idx stored), MatMulInteger from
    quantize_dynamic (int8 B with its `_scale` / `_zero_point`) and GatherBlockQuantized (embeddings).
    """
    quantized_weights = quantized_bytes = 0
    linear_weights = linear_bytes = 0  # the linear layers and the head, quantized or float (quantized-layer bits)
    counted: set[str] = set()

    def take(names) -> int:
        present = [n for n in dict.fromkeys(names) if n in initializers and n not in counted]
        counted.update(present)
        return sum(initializers[n][1] for n in present)

    for op_type, inputs, attributes in nodes:
        if op_type == "MatMulNBits":
            weights, size = int(attributes["K"]) * int(attributes["N"]), take(inputs[1:5])
            quantized_weights, quantized_bytes = quantized_weights + weights, quantized_bytes + size
            linear_weights, linear_bytes = linear_weights + weights, linear_bytes + size
        elif op_type == "MatMulInteger" and len(inputs) > 1 and inputs[1] in initializers:
            weight = inputs[1]
            base = weight.removesuffix("_quantized")
            weights, size = initializers[weight][0], take([weight, base + "_scale", base + "_zero_point", *inputs[3:4]])
            quantized_weights, quantized_bytes = quantized_weights + weights, quantized_bytes + size
            linear_weights, linear_bytes = linear_weights + weights, linear_bytes + size
        elif op_type == "MatMul" and len(inputs) > 1 and inputs[1] in initializers and inputs[1] not in counted:
            linear_weights += initializers[inputs[1]][0]  # a layer kept float; counted with the other parameters too
            linear_bytes += initializers[inputs[1]][1]
        elif op_type == "GatherBlockQuantized" and inputs[0] in initializers:
            bits = int(attributes.get("bits", 4))
            quantized_weights += initializers[inputs[0]][1] * 8 // bits
            quantized_bytes += take([inputs[0], *inputs[2:4]])
    other_params = sum(numel for name, (numel, _) in initializers.items() if name not in counted)
    other_bytes = sum(size for name, (_, size) in initializers.items() if name not in counted)
    total = quantized_weights + other_params
    return {
        "bits_per_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else float("nan"),
        "bits_per_weight_all": 8 * (quantized_bytes + other_bytes) / total if total else float("nan"),
        "quantized_weights": float(quantized_weights),
        "quantized_layer_bits": 8 * linear_bytes / linear_weights if linear_weights else float("nan"),
    }


PREPACKED_BY = ("MatMul", "MatMulNBits", "Gemm")  # onnxruntime's CPU kernels repack these weights at load


def onnx_weight_bytes(folder: Path):
    """-> compress.memory.OnnxWeights of folder/model.onnx."""
    from compress.memory import OnnxWeights

    initializers, nodes = read_onnx(folder)
    readers: dict[str, set[str]] = {}
    for op, inputs, _ in nodes:
        for name in inputs:
            if name in initializers:
                readers.setdefault(name, set()).add(op)
    packed = {name for name, ops in readers.items() if ops & set(PREPACKED_BY)}
    shared = {name for name in packed if readers[name] - set(PREPACKED_BY)}
    size = {name: nbytes for name, (_, nbytes) in initializers.items()}
    return OnnxWeights(prepacked=sum(size[name] for name in packed - shared), shared=sum(size[name] for name in shared),
                       largest=max((size[name] for name in packed), default=0),
                       other=sum(size.values()) - sum(size[name] for name in packed))


def read_onnx(folder: Path) -> tuple[dict[str, tuple[int, int]], list[tuple[str, list[str], dict]]]:
    """Initializer sizes and node list of folder/model.onnx, without loading its external data."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    initializers = {}
    for tensor in model.graph.initializer:
        numel = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            nbytes = (numel + 1) // 2
        else:
            nbytes = numel * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        initializers[tensor.name] = (numel, nbytes)
    nodes = [(node.op_type, list(node.input), {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
             for node in model.graph.node]
    return initializers, nodes


def gguf_bits(path: Path) -> dict[str, float]:
    """Bits per weight of a GGUF file from the tensor types written in it: quantized tensors are those of a
    block type (not F32/F16/BF16), counted with the bytes their blocks take in the file."""
    from compress.export.gguf import FLOAT_TYPES, gguf_module

    reader = gguf_module().GGUFReader(str(path))
    quantized = [(int(t.n_elements), int(t.n_bytes)) for t in reader.tensors if t.tensor_type.name not in FLOAT_TYPES]
    weights, size = sum(n for n, _ in quantized), sum(b for _, b in quantized)
    total_weights, total_bytes = sum(int(t.n_elements) for t in reader.tensors), sum(int(t.n_bytes) for t in reader.tensors)
    matrices = [(int(t.n_elements), int(t.n_bytes)) for t in reader.tensors if len(t.shape) == 2 or t.tensor_type.name not in FLOAT_TYPES]
    return {
        "quantized_layer_bits": 8 * sum(b for _, b in matrices) / sum(n for n, _ in matrices) if matrices else float("nan"),
        "bits_per_weight": 8 * size / weights if weights else float("nan"),
        "bits_per_weight_all": 8 * total_bytes / total_weights if total_weights else float("nan"),
        "quantized_weights": float(weights),
    }
