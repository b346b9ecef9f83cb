"""onnxruntime-genai's model builder with memory independent of depth, for folders of integer weights (`-i`).

Run as `python -m compress.export.builder_stream <the builder's arguments>` in place of
`python -m onnxruntime_genai.models.builder`. The builder (0.18) loads a quantized checkpoint whole, keeps every
tensor it makes until it saves, and before saving serializes the whole graph once more to round whatever float
MatMuls are left (at Phi-4 width +0.6 GiB per decoder layer, and ~9 GiB for four Phi-4-mini layers and their
head). Three changes, each at the builder's own seams, make it hold one layer at a time:

1. its loader reads one decoder layer's tensors when the builder reaches that layer (`_LayerByLayer`);
2. each initializer it registers is written to a spill file at once and read back only when saved (`_Spill`);
3. its rounding pass sees one node at a time (`_round_left_over`), a large head a slice of columns at a time.

The graph and every tensor stay those the builder makes (tests/test_builder_stream.py compares them byte for
byte with the builder's own output).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from compress.memory import give_back_freed_memory
from compress.tensors import TensorFolder

SMALL = 1024  # bytes: initializers below this stay in memory (shape constants and the like), as copies
PACKED = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1}
FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
SLICE_BYTES = int(os.environ.get("COMPRESS_BUILDER_SLICE_BYTES", 128 << 20))  # tests set it small
# Output columns of a pre-quantized GPTQ matrix repacked at a time (a multiple of 32: whole packed zero points).
REPACK_COLUMNS = int(os.environ.get("COMPRESS_BUILDER_REPACK_COLUMNS", 16384))
_open_spills: list[_Spill] = []


class _Spill:
    """One file of initializer bytes; each tensor comes back through a plain read when the saver asks."""

    CHUNK = 64 << 20  # bytes of float32 converted at a time from a torch tensor the builder casts

    def __init__(self, path: Path):
        self.path = path
        self.handle = path.open("w+b")

    def keep(self, tensor: ir.TensorProtocol, source=None, cast=None) -> ir.TensorProtocol:
        """`tensor` written out; `source` and `cast`: the torch tensor and dtype it is the cast of, written
        a slice at a time instead of whole (the builder's float32 copy of a transposed head is 2.5 GB)."""
        if tensor.nbytes < SMALL:
            return _from_bytes(tensor.tobytes(), tensor.dtype, tensor.shape, tensor.name)
        offset = self.handle.seek(0, os.SEEK_END)
        if source is not None and source.dim() >= 1:
            rows = max(1, self.CHUNK // max(1, source[0].numel() * 4))
            for start in range(0, source.shape[0], rows):
                self.handle.write(source[start:start + rows].to(cast).contiguous().numpy().tobytes())
        else:
            tensor.tofile(self.handle)
        length = self.handle.tell() - offset
        if length != tensor.nbytes:
            raise RuntimeError(f"{tensor.name}: {length} bytes written for a {tensor.nbytes}-byte tensor")
        dtype, shape, name = tensor.dtype, tensor.shape, tensor.name

        def read():
            self.handle.flush()
            data = np.empty(length, np.uint8)
            _read_into(self.handle.fileno(), memoryview(data), offset)
            return _from_bytes(data, dtype, shape, name)

        lazy = _Spilled(read, dtype=dtype, shape=shape, name=name)
        lazy.spilled = (self, offset, length)
        return lazy

    def copy_to(self, file, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) of the spill written to `file`, CHUNK at a time."""
        self.handle.flush()
        buffer = memoryview(bytearray(min(self.CHUNK, length)))
        for done in range(0, length, self.CHUNK):
            chunk = buffer[:min(self.CHUNK, length - done)]
            _read_into(self.handle.fileno(), chunk, offset + done)
            file.write(chunk)

    def columns(self, tensor: _Spilled, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of a spilled 2-D tensor, read row by row (the whole tensor never in memory)."""
        _, offset, _ = tensor.spilled
        rows, width = tensor.shape.numpy()
        dtype = np.dtype(tensor.dtype.numpy())
        out = np.empty((rows, stop - start), dtype)
        self.handle.flush()
        for row in range(rows):
            _read_into(self.handle.fileno(), memoryview(out[row]).cast("B"), offset + (row * width + start) * dtype.itemsize)
        return out

    def close(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


def _read_into(fd: int, buffer: memoryview, position: int) -> None:
    """`buffer` filled from `fd` at `position` (one read returns at most 2 GiB)."""
    done = 0
    while done < len(buffer):
        read = os.preadv(fd, [buffer[done:]], position + done)
        if not read:
            raise EOFError(f"spill file ends {len(buffer) - done} bytes short at {position + done}")
        done += read


class _Spilled(ir.LazyTensor):
    """A spilled initializer: read whole where the builder asks for its values, copied from the spill file a
    chunk at a time where it is saved (Phi-4-mini's float32 embedding table is 2.3 GiB)."""

    __slots__ = ("spilled",)

    def tofile(self, file) -> None:
        spill, offset, length = self.spilled
        spill.copy_to(file, offset, length)


def _from_bytes(data, dtype: ir.DataType, shape: ir.Shape, name: str | None) -> ir.TensorProtocol:
    raw = np.frombuffer(data, np.uint8)
    if dtype in PACKED:
        return ir.PackedTensor(raw, dtype, shape=shape, name=name)
    return ir.Tensor(raw.view(dtype.numpy()).reshape(shape.numpy()), dtype=dtype, name=name)


class _LayerByLayer:
    """The builder's quantized-model loader, run on one decoder layer's tensors at a time.

    `modules()` yields what the builder's own loader does (embedding, layers, final norm, head), but loads
    each decoder layer when the builder asks for it and drops it once the builder has made it.
    """

    def __init__(self, builder, input_path: str, load):
        self._load = load  # keep(name) -> the builder's loader on those tensors
        self.num_layers = builder.num_layers
        shared = load(lambda name: ".layers." not in name)
        self.embedding, self.final_norm, self.lm_head = shared.embedding, shared.final_norm, shared.lm_head

    def modules(self):
        yield self.embedding
        for index in range(self.num_layers):
            prefix = f"model.layers.{index}."
            (layer,) = self._load(lambda name, prefix=prefix: name.startswith(prefix)).layers
            yield layer
            del layer
            give_back_freed_memory()
        yield self.final_norm
        yield self.lm_head


def _filtered_load_file(folder: TensorFolder, keep):
    """safetensors' load_file for the builder's loader: only the tensors `keep` selects, by plain reads."""

    def load_file(path):
        return {name: folder.tensor(name) for name in folder.keys()
                if keep(name) and folder.file_of(name).name == Path(path).name}

    return load_file


def _round_left_over(builder, round_all):
    """The builder's rounding pass (`to_nbits`) on one node at a time, each spliced back into the graph.

    A MatMul weight larger than SLICE_BYTES goes through in slices of its output columns, which MatMulNBits
    rounds independently (blocks run along the input dimension), joined afterwards: the pass itself holds
    ~5 float32 copies of what it is given (12 GiB for Phi-4-mini's head at 8 bits, whole). A Gather goes only
    into a 4-bit pass: onnxruntime's quantizer leaves it as it is at other widths ("Gather only supports 4 bits"),
    after a serialized copy of its table (Phi-4-mini's float32 embedding in an int8 build: 5.7 GiB peak, against
    3.3 without). Falls back to the builder's own whole-graph pass where its options reach beyond single nodes."""
    graph = builder.model.graph
    attrs = builder.quant_attrs
    excluded = set(attrs["nodes_to_exclude"])
    targets = [node for node in graph if node.op_type in attrs["op_types_to_quantize"] and node.name not in excluded
               and any(value is not None and value.const_value is not None for value in node.inputs)]
    if attrs["bits"] != 4:
        for node in [node for node in targets if node.op_type == "Gather"]:
            print(f"Not rounding {node.name}: onnxruntime rounds a Gather only at 4 bits", flush=True)
            targets.remove(node)
    if not targets:
        return builder.model
    if getattr(builder, "exact_quant_override_names", None) or attrs["use_qdq"]:
        print("Rounding the whole graph (exact overrides or QDQ asked for)", flush=True)
        return round_all(builder)
    for node in targets:
        rounded = _round_in_slices(builder, node, round_all)
        if rounded is None:
            rounded = _round_with(builder, _subgraph_model(builder.model, [node]), round_all)
        _splice(builder.model, [node], rounded, builder.spill)
        give_back_freed_memory()
    return builder.model


def _round_with(builder, model: ir.Model, round_all) -> ir.Model:
    whole, builder.model = builder.model, model
    try:
        return round_all(builder)
    finally:
        builder.model = whole


def _round_in_slices(builder, node: ir.Node, round_all) -> ir.Model | None:
    """`node` (MatMul, float weight [K, N]) rounded SLICE_BYTES of columns at a time and joined, or None
    where it is small, or where the pieces do not have the one-MatMulNBits shape this joins."""
    weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    tensor = weight.const_value
    if tensor.nbytes <= SLICE_BYTES or tensor.dtype not in FLOATS or not isinstance(tensor, _Spilled):
        return None
    rows, columns = tensor.shape.numpy()
    step = max(1, SLICE_BYTES // (rows * int(tensor.dtype.itemsize)))
    print(f"Rounding {node.name} in {-(-columns // step)} slices of {step} columns", flush=True)
    first, widths, parts = None, [], []
    for start in range(0, columns, step):
        part = ir.Tensor(builder.spill.columns(tensor, start, min(start + step, columns)), dtype=tensor.dtype, name=weight.name)
        rounded = _round_with(builder, _subgraph_model(builder.model, [node], {weight.name: part}), round_all)
        nodes = list(rounded.graph)
        if len(nodes) != 1 or nodes[0].op_type != "MatMulNBits":
            return None
        widths.append(nodes[0].attributes["N"].as_int())
        # copies: the rounded model keeps the serialized graph it came from, float slice included
        parts.append({name: np.array(value.const_value.numpy()) for name, value in rounded.graph.initializers.items()})
        first = rounded if first is None else first
        del part, rounded, nodes
        give_back_freed_memory()  # each rounded slice's graph lives in reference cycles: 0.3 GiB a slice otherwise
    return _joined(first, widths, parts, columns)


def _joined(first: ir.Model, widths: list[int], parts: list[dict[str, np.ndarray]], columns: int) -> ir.Model | None:
    """Column slices of one rounded MatMul joined into `first`: MatMulNBits' B [N, blocks, blob] and its
    per-column scales and zero points (1-D, column-major) concatenated along N."""
    for name, value in first.graph.initializers.items():
        arrays = [part[name] for part in parts]
        per_column = {array.shape[0] / width for array, width in zip(arrays, widths, strict=True)}
        if len(per_column) != 1 or not float(next(iter(per_column))).is_integer():
            return None
        joined = np.concatenate(arrays, axis=0)
        value.const_value = ir.Tensor(joined, dtype=value.const_value.dtype, name=name)
        value.shape = ir.Shape(joined.shape)
    next(iter(first.graph)).attributes["N"] = ir.AttrInt64("N", columns)
    return first


def _subgraph_model(model: ir.Model, nodes: list[ir.Node], constants: dict | None = None) -> ir.Model:
    """A model of copies of `nodes`: their constant inputs as initializers (`constants` overriding some by
    name), the rest as graph inputs."""
    constants = constants or {}
    values: dict[str, ir.Value] = {}

    def value_for(old: ir.Value) -> ir.Value:
        if old.name not in values:
            const = constants.get(old.name, old.const_value)
            shape = ir.Shape(const.shape) if old.name in constants else old.shape
            values[old.name] = ir.Value(name=old.name, type=old.type, shape=shape, const_value=const)
        return values[old.name]

    copies = [ir.Node(node.domain, node.op_type, [value_for(v) if v is not None else None for v in node.inputs],
                      attributes=list(node.attributes.values()), num_outputs=len(node.outputs), name=node.name,
                      version=node.version) for node in nodes]
    for copy, node in zip(copies, nodes, strict=True):
        for new, old in zip(copy.outputs, node.outputs, strict=True):
            new.name, new.type, new.shape = old.name, old.type, old.shape
    initializers = [v for v in values.values() if v.const_value is not None]
    inputs = [v for v in values.values() if v.const_value is None]
    outputs = [out for copy in copies for out in copy.outputs]
    graph = ir.Graph(inputs, outputs, nodes=copies, initializers=initializers, opset_imports=dict(model.opset_imports))
    return ir.Model(graph, ir_version=model.ir_version, producer_name=model.producer_name)


def _splice(whole: ir.Model, targets: list[ir.Node], rounded: ir.Model, spill: _Spill) -> None:
    """Replace `targets` in `whole` by the rounded model's nodes, joined by value names.

    Nodes the builder made ahead for the rounded weights (a tied embedding's GatherBlockQuantized reads the
    head's int4 weights by name) are joined to the new initializers too, as the builder's own pass joins
    them when it re-reads its serialized graph."""
    graph = whole.graph
    by_name = {v.name: v for node in targets for v in node.inputs if v is not None}
    outputs = {v.name: v for node in targets for v in node.outputs}
    for name, value in rounded.graph.initializers.items():
        if name not in graph.initializers:
            fresh = ir.Value(name=name, type=value.type, shape=value.shape, const_value=spill.keep(value.const_value))
            graph.register_initializer(fresh)
        by_name[name] = graph.initializers[name]
    waiting = {id(v): v for node in graph for v in node.inputs
               if v is not None and v.name in rounded.graph.initializers and v.producer() is None
               and v.const_value is None and v is not graph.initializers[v.name]}
    for value in waiting.values():
        ir.convenience.replace_all_uses_with(value, graph.initializers[value.name])
    anchor = targets[0]
    for node in list(rounded.graph):
        inputs = [by_name.get(v.name, v) if v is not None else None for v in node.inputs]
        copy = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                       num_outputs=len(node.outputs), name=node.name, version=node.version)
        for new, old in zip(copy.outputs, node.outputs, strict=True):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            by_name[old.name] = new
            if old.name in outputs:
                replaced = outputs[old.name]
                ir.convenience.replace_all_uses_with(replaced, new, replace_graph_outputs=True)
                replaced.name = None  # the name belongs to `new` now
                new.name = old.name
        graph.insert_before(anchor, copy)
    for node in targets:
        graph.remove(node, safe=True)
    for name in [name for name, value in graph.initializers.items() if not value.uses() and value not in graph.outputs]:
        graph.initializers.pop(name)


def _repack_gptq_in_columns(loader, module, clear_g_idx: bool, repack, module_class) -> None:
    """The builder's repack (unpack to int32, dequantize, requantize, pack for MatMulNBits) of a GPTQ matrix a
    block of output columns at a time: whole, a quantized Phi-4-mini head (200k outputs) took 10.2 GiB. Every step
    works column by column (codes, zero points and scales of one output stay in its column), so the joined blocks
    are the builder's own bytes (tests/test_builder_stream.py)."""
    step = 32 // module.bits
    print(f"Repacking {module.out_features} outputs {REPACK_COLUMNS} at a time", flush=True)
    parts = []
    for start in range(0, module.out_features, REPACK_COLUMNS):
        stop = min(start + REPACK_COLUMNS, module.out_features)
        part = module_class()
        part.bits, part.group_size, part.in_features, part.out_features = module.bits, module.group_size, module.in_features, stop - start
        part.qweight, part.scales, part.g_idx = module.qweight[:, start:stop], module.scales[:, start:stop], module.g_idx
        part.qzeros = None if module.qzeros is None else module.qzeros[:, start // step:(stop + step - 1) // step]
        repack(loader, part, clear_g_idx)
        parts.append((part.qweight, part.scales, part.qzeros))
        del part
    module.qweight = torch.cat([qweight for qweight, _, _ in parts])
    module.scales = torch.cat([scales for _, scales, _ in parts])
    module.qzeros = None if parts[0][2] is None else torch.cat([qzeros for _, _, qzeros in parts])
    if clear_g_idx:
        module.g_idx = None
    give_back_freed_memory()


def _patch() -> None:
    # The builder imports its parts as top-level modules (`builders`, `loaders`) from its own folder, which
    # importing onnxruntime_genai.models puts on sys.path: patch those modules, not the package's copies.
    import onnxruntime_genai.models  # noqa: F401
    from builders import base as builders
    from loaders import base as loaders

    model_class = builders.Model
    to_torch_dtype = builders.to_torch_dtype
    make_initializer, load_weights, to_nbits = (model_class.make_initializer, model_class.load_weights,
                                                model_class.to_nbits)

    def spilling_make_initializer(self, tensor, /, name, **kwargs):
        if not hasattr(self, "spill"):
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            self.spill = _Spill(Path(self.cache_dir) / f"initializers-{os.getpid()}.bin")
            _open_spills.append(self.spill)
        make_initializer(self, tensor, name, **kwargs)
        value = self.model.graph.initializers[name]
        cast = kwargs.get("to") is not None and not kwargs.get("raw") and isinstance(tensor, torch.Tensor)
        value.const_value = self.spill.keep(value.const_value, *((tensor, to_torch_dtype(kwargs["to"])) if cast else ()))

    def layer_by_layer_load_weights(self, input_path):
        if self.quant_type is None or input_path.endswith(".gguf") or "adapter_path" in self.extra_options:
            return load_weights(self, input_path)
        folder = TensorFolder(Path(input_path))
        original = loaders.load_file

        def load(keep):
            loaders.load_file = _filtered_load_file(folder, keep)
            try:
                return load_weights(self, input_path)
            finally:
                loaders.load_file = original

        return _LayerByLayer(self, input_path, load)

    repack = loaders.QuantizedModel.repack_quantized_tensor

    def repack_in_columns(self, module, clear_g_idx):
        if type(self).__name__ != "GPTQModel" or module.qweight is None or module.out_features <= REPACK_COLUMNS:
            return repack(self, module, clear_g_idx)
        _repack_gptq_in_columns(self, module, clear_g_idx, repack, loaders.QuantizedTensorModule)

    model_class.make_initializer = spilling_make_initializer
    model_class.load_weights = layer_by_layer_load_weights
    loaders.QuantizedModel.repack_quantized_tensor = repack_in_columns
    model_class.to_nbits = lambda self: _round_left_over(self, to_nbits)


def main(argv: list[str]) -> None:
    _patch()
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    try:
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    finally:
        for spill in _open_spills:
            spill.close()

if __name__ == "__main__":
    main(sys.argv[1:])
