"""The builder run one layer at a time (compress.export.builder_stream) writes what the builder itself writes.

Each case builds the same folder of integer weights twice, with onnxruntime-genai's builder as released and
through compress's layer-by-layer wrapper, and compares the graphs node by node and every tensor byte by byte.
"""

import hashlib
import json
import shutil

import onnx_ir as ir
import pytest
import torch
from safetensors.torch import save_file

from compress.export.gptq_v1 import write_gptq_v1
from compress.export.onnx_genai import PLAIN_BUILDER, STREAMING_BUILDER, run_builder
from compress.model import BUILTIN_MODELS
from compress.quantize.streaming import calibrate_streaming
from compress.recipe import Variant

HEAD_FLOAT = {"block_size": "32", "accuracy_level": "4", "nodes_to_exclude": "/lm_head/MatMul,/model/embed_tokens/Gather"}
HEAD_INT8 = {"block_size": "32", "accuracy_level": "4", "algo_config": "rtn", "matmul_mixed_precision": "last_matmul:int8"}
CASES = [  # (bits of the folder, builder precision, builder options, tied head)
    pytest.param(4, "int4", HEAD_FLOAT, True, id="int4-head-float"),
    pytest.param(4, "int4", HEAD_INT8, False, id="int4-head-int8-untied"),
    pytest.param(4, "int4", HEAD_INT8, True, id="int4-head-int8-tied-quantized-embedding"),
    pytest.param(8, "int8", {"block_size": "32", "accuracy_level": "4"}, True, id="int8-head-rounded-by-builder"),
]


def untied_copy(folder, out):
    """The embedded model with a head of its own (lm_head.weight), as Phi-4 14B has."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(config["vocab_size"], config["hidden_size"], generator=generator) * 0.02
    save_file({"lm_head.weight": head}, str(out / "head.safetensors"))
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"]["lm_head.weight"] = "head.safetensors"
        index.write_text(json.dumps(data))
    return out


def graph_and_tensors(folder):
    model = ir.load(folder / "model.onnx")
    nodes = {node.name: (node.op_type, node.domain, [v.name if v is not None else None for v in node.inputs],
                         [v.name for v in node.outputs], sorted((k, str(v)) for k, v in node.attributes.items()))
             for node in model.graph}
    tensors = {name: (value.const_value.dtype, tuple(value.const_value.shape),
                      hashlib.sha256(value.const_value.tobytes()).hexdigest())
               for name, value in model.graph.initializers.items()}
    io = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs], dict(model.opset_imports))
    return nodes, tensors, io


@pytest.mark.parametrize("bits, precision, options, tied", CASES)
def test_layer_by_layer_builder_writes_the_builders_own_graph(tmp_path, monkeypatch, bits, precision, options, tied):
    monkeypatch.setenv("COMPRESS_BUILDER_SLICE_BYTES", str(64 << 10))  # the 2 MiB head rounded in 32 slices
    source = BUILTIN_MODELS["tiny-phi4-mini"] if tied else untied_copy(BUILTIN_MODELS["tiny-phi4-mini"], tmp_path / "untied")
    variant = Variant(name="r", method="rtn", bits=bits, group_size=32, ignore=["lm_head"])
    calibrate_streaming(source, variant, None, tmp_path / "ct", tmp_path / "work")
    folder = write_gptq_v1(tmp_path / "ct", tmp_path / "gptq")
    plain = assert_both_builders_write_the_same(folder, precision, options, tmp_path)
    assert any(node[0] == "MatMulNBits" for node in plain[0].values())
    # A tied table at 8 bits stays out of the rounding pass (which would leave it as it is after copying it).
    assert ("Not rounding /model/embed_tokens/Gather" in (tmp_path / "builder_stream.log").read_text()) == (tied and bits == 8)


def assert_both_builders_write_the_same(folder, precision, options, tmp_path):
    """Build `folder` with the builder as released and through builder_stream: the same nodes and bytes."""
    options = {**options, "hf_token": "false"}
    built = {}
    for builder in (PLAIN_BUILDER, STREAMING_BUILDER):
        out = tmp_path / builder.rsplit(".", 1)[-1]
        run_builder(folder, out, precision, "cpu", options, tmp_path / "cache", tmp_path / f"{out.name}.log", builder=builder)
        built[builder] = graph_and_tensors(out)
        assert json.loads((out / "genai_config.json").read_text())
    plain, streamed = built[PLAIN_BUILDER], built[STREAMING_BUILDER]
    assert streamed[0] == plain[0]  # nodes: type, inputs, outputs, attributes
    assert streamed[1] == plain[1]  # initializers: dtype, shape, bytes
    assert streamed[2] == plain[2]
    assert not list((tmp_path / "cache").glob("initializers-*.bin"))  # the spill file is gone
    return plain


def test_a_carried_head_repacked_in_blocks_of_columns_is_the_builders_own(tmp_path, monkeypatch):
    """A GPTQ-quantized 8-bit head carried into the graph (and serving as the tied table) is repacked 1024 of its
    4096 outputs at a time by builder_stream: the same MatMulNBits bytes as the builder's whole-matrix repack."""
    from compress.export.onnx_genai import tie_table_to_head

    monkeypatch.setenv("COMPRESS_BUILDER_REPACK_COLUMNS", "1024")
    variant = Variant(name="r", method="rtn", bits=4, group_size=32, ignore=[], overrides=[{"match": "lm_head", "bits": 8}])
    calibrate_streaming(BUILTIN_MODELS["tiny-phi4-mini"], variant, None, tmp_path / "ct", tmp_path / "work")
    folder = write_gptq_v1(tmp_path / "ct", tmp_path / "gptq", mixed=True)
    tie_table_to_head(folder)
    plain = assert_both_builders_write_the_same(folder, "int4", {"accuracy_level": "4", "shared_embeddings": "true"}, tmp_path)
    assert plain[1]["lm_head.MatMulNBits.qweight"][1] == (4096, 4, 32)  # 8-bit, 4 blocks of 32 bytes per row
    assert "Repacking 4096 outputs 1024 at a time" in (tmp_path / "builder_stream.log").read_text()
    assert plain[0]["/model/embed_tokens/GatherBlockQuantized"][0] == "GatherBlockQuantized"


def test_spill_reads_back_what_it_kept(tmp_path, monkeypatch):
    """A spilled tensor comes back whole, saved a chunk at a time and read a column range at a time, equal to
    the tensor it was kept for (chunks smaller than the tensor, so every read loop turns more than once)."""
    import io

    import numpy as np

    from compress.export.builder_stream import _Spill

    monkeypatch.setattr(_Spill, "CHUNK", 1000)
    spill = _Spill(tmp_path / "spill.bin")
    try:
        source = torch.randn(37, 29, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
        first = spill.keep(ir.Tensor(np.arange(300, dtype=np.float32), name="before"))
        cast = source.to(torch.float32)
        kept = spill.keep(ir.Tensor(cast.numpy(), name="cast"), source=source, cast=torch.float32)
        assert np.array_equal(first.numpy(), np.arange(300, dtype=np.float32))
        assert np.array_equal(kept.numpy(), cast.numpy())
        saved = io.BytesIO()
        kept.tofile(saved)
        assert saved.getvalue() == cast.numpy().tobytes()
        assert np.array_equal(spill.columns(kept, 5, 17), cast.numpy()[:, 5:17])
    finally:
        spill.close()
    assert not (tmp_path / "spill.bin").exists()
