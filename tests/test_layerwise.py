"""Layer-at-a-time execution and calibration against whole-model references.

- compress.layerwise: the layer-sequential forward equals `from_pretrained(...)(ids)` (fp32 and bf16
  checkpoints, hidden states in memory and spilled to disk).
- compress.quantize.streaming: RTN equals llm-compressor's oneshot RTN bit for bit, GPTQ's first layer
  (whose inputs do not pass through attention) equals oneshot GPTQ's, and the folder loads in transformers.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from compress import layerwise
from compress.activations import Activations
from compress.export.shards import ShardWriter
from compress.layerwise import window_logprobs
from compress.model import BUILTIN_MODELS
from compress.quantize.llmc import calibrate_whole_model
from compress.quantize.streaming import calibrate_streaming
from compress.recipe import Variant
from compress.tensors import TensorFolder

TINY = BUILTIN_MODELS["tiny-phi4-mini"]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(TINY, folder)
    tensors = load_file(TINY / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return folder


def windows(count=3, length=96, seed=0):
    return np.random.default_rng(seed).integers(0, 4096, size=(count, length))


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_layer_sequential_forward_equals_a_plain_forward(which, spill, bf16_model, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "BLOCK_ROWS", 40)  # the head in blocks of 40 rows: 95 positions are 40 + 40 + 15
    folder = TINY if which == "fp32" else bf16_model
    ids = windows()
    blocks = [list(window) for window in window_logprobs(folder, ids, budget_bytes=1 if spill else None,
                                                         spill_dir=tmp_path if spill else None)]
    assert [[len(block) for block in window] for window in blocks] == [[40, 40, 15]] * len(ids)
    ours = [np.concatenate(window) for window in blocks]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.as_tensor(ids)).logits[:, :-1].float(), -1).numpy()
    assert len(ours) == len(ids)
    for got, expected in zip(ours, reference, strict=True):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
    assert not list(tmp_path.glob("*.f32")), "spilled hidden states are deleted afterwards"


def test_spilled_activations_round_trip(tmp_path):
    store = Activations(5, 7, 3, tmp_path / "h.f32")
    values = torch.randn(5, 7, 3)
    for start, stop in store.chunks(limit_bytes=2 * 7 * 3 * 4):
        assert stop - start <= 2
        store.write(start, values[start:stop])
    assert torch.equal(store.read(0, 5), values)
    assert (tmp_path / "h.f32").stat().st_size == values.numel() * 4
    store.delete()
    assert not (tmp_path / "h.f32").exists()


def test_shard_writer_writes_an_index_transformers_reads(tmp_path):
    tensors = load_file(TINY / "model.safetensors")
    writer = ShardWriter(tmp_path / "out")
    for index in range(4):
        for name, tensor in tensors.items():
            if name.startswith(f"model.layers.{index}."):
                writer.add(name, tensor)
        writer.flush()
    for name, tensor in tensors.items():
        if not name.startswith("model.layers."):
            writer.add(name, tensor)
    shards = writer.close()
    assert len(shards) == 5 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json"):
        shutil.copy2(TINY / name, tmp_path / "out" / name)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(model.state_dict()["model.layers.2.mlp.down_proj.weight"], tensors["model.layers.2.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="written twice"):
        writer.add("model.norm.weight", tensors["model.norm.weight"])


def _variant(method, **extra):
    return Variant(**{"name": method, "method": method, "bits": 4, "group_size": 128, **extra})


def _read(folder):
    with TensorFolder(folder) as tensors:
        return {name: tensors.tensor(name) for name in tensors.keys()}


@pytest.fixture(scope="module")
def samples():
    return windows(count=8, length=128, seed=1)


@pytest.mark.parametrize("scheme", [{}, {"symmetric": False}, {"group_size": -1}, {"preset": "phi4-safe"},
                                    {"preset": "phi4-safe", "ignore": []}, {"symmetric": False, "ignore": []}],
                         ids=["sym-g128", "asym-g128", "channel", "phi4-safe", "head-8bit", "asym-head-4bit"])
def test_streaming_rtn_equals_llm_compressor_rtn_bit_for_bit(scheme, samples, tmp_path, monkeypatch):
    from compress.quantize import streaming

    monkeypatch.setattr(streaming, "HEAD_ROWS", 1000)  # a quantized head in blocks of rows that do not divide it
    streamed = tmp_path / "streamed"
    whole = tmp_path / "whole"
    calibrate_streaming(TINY, _variant("rtn", **scheme), samples, streamed, tmp_path / "work")
    calibrate_whole_model(TINY, _variant("rtn", **scheme), samples, whole, tmp_path / "work")
    ours, theirs = _read(streamed), _read(whole)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    config = json.loads((streamed / "config.json").read_text())["quantization_config"]
    assert config == json.loads((whole / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def gptq_folders(samples, tmp_path_factory):
    """The same GPTQ variant calibrated layer by layer (ours) and by llm-compressor's oneshot on the whole model."""
    root = tmp_path_factory.mktemp("gptq")
    details = calibrate_streaming(TINY, _variant("gptq"), samples, root / "streamed", root / "work")
    calibrate_whole_model(TINY, _variant("gptq"), samples, root / "whole", root / "work")
    return root / "streamed", root / "whole", details


def test_streaming_gptq_first_layer_equals_llm_compressor_and_loads_in_transformers(gptq_folders):
    streamed, whole, details = gptq_folders
    ours, theirs = _read(streamed), _read(whole)
    assert set(ours) == set(theirs)
    # qkv_proj of layer 0 sees norm(embedding) in both: the same Hessian, the same GPTQ result.
    for part in ("weight_packed", "weight_scale"):
        name = f"model.layers.0.self_attn.qkv_proj.{part}"
        assert torch.equal(ours[name], theirs[name]), name
    assert details["streamed"] and len(details["layers_seconds"]) == 4
    model = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    ids = torch.as_tensor(windows(2, 64, seed=3))
    with torch.inference_mode():
        agree = (model(ids).logits.argmax(-1) == reference(ids).logits.argmax(-1)).float().mean()
    assert agree > 0.8


def test_streaming_gptq_quantizes_the_tied_head_as_gptq_on_the_whole_matrix(samples, tmp_path, monkeypatch):
    """The head (the tied embedding table, untied) by GPTQ in blocks of rows equals GPTQ on the whole matrix with
    the Hessian of lm_head's inputs hooked in transformers running the calibrated folder itself (the quantized
    decoder layers feed the head, as llm-compressor's sequential pipeline has them)."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    from compress.quantize import rounding, streaming

    monkeypatch.setattr(streaming, "HEAD_ROWS", 1000)  # blocks of rows that do not divide the vocabulary
    variant = _variant("gptq", ignore=[], overrides=[{"match": "lm_head", "bits": 8}])
    calibrate_streaming(TINY, variant, samples, tmp_path / "streamed", tmp_path / "work")
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).eval()
    sums = [torch.zeros(model.config.hidden_size, model.config.hidden_size), torch.zeros(())]

    def record(module, inputs, _output):
        sums[0], sums[1] = accumulate_hessian(inputs[0], module, *sums)

    model.lm_head.register_forward_hook(record)
    with torch.inference_mode():
        for window in samples:
            model(torch.as_tensor(window[None]))
    table = _read(TINY)["model.embed_tokens.weight"].float()
    args = rounding.weight_args(8, 128, True, "static")
    scale, zero = rounding.minmax_qparams(table, args, torch.float32)
    quantized, _, _ = quantize_weight(table[None].clone(), (sums[0] / sums[1])[None], scale[None], zero[None], None, args,
                                      blocksize=128, percdamp=variant.dampening)
    expected = rounding.packed_tensors(rounding.integer_codes(quantized[0], scale, zero, args), scale, zero, args, torch.float32)
    ours = _read(tmp_path / "streamed")
    assert "lm_head.weight" not in ours and ours["model.embed_tokens.weight"].shape == table.shape
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        assert torch.equal(ours[f"lm_head.{part}"], expected[part]), part


def _o_proj_codes(samples, causal: bool) -> torch.Tensor:
    """GPTQ of layer 0's o_proj from its inputs under causal or bidirectional attention."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian
    from transformers import masking_utils

    from compress.layerwise import LayerwiseModel
    from compress.quantize import rounding

    args = rounding.weight_args(4, 128, True, "static")
    with LayerwiseModel(TINY) as model:
        block = model.layer(0)
        store = Activations(len(samples), samples.shape[1], model.hidden_size)
        model.embed(samples, store)
        linear = block.self_attn.o_proj
        sums = [make_empty_hessian(linear), torch.zeros(())]

        def record(module, inputs, _output):
            sums[0], sums[1] = accumulate_hessian(inputs[0], module, *sums)

        handle = linear.register_forward_hook(record)
        original = masking_utils.create_causal_mask
        if not causal:  # no mask and is_causal off: every position sees the whole window
            masking_utils.create_causal_mask = lambda **kwargs: None
            block.self_attn.is_causal = False
        try:
            model.forward(block, store, None, 1)
        finally:
            masking_utils.create_causal_mask = original
            handle.remove()
    weight = linear.weight.data.float()
    scale, zero = rounding.minmax_qparams(weight, args, torch.float32)
    quantized, _, _ = quantize_weight(weight[None].clone(), (sums[0] / sums[1])[None], scale[None], zero[None], None, args)
    return rounding.packed_tensors(rounding.integer_codes(quantized[0], scale, zero, args), scale, zero, args,
                                   torch.float32)["weight_packed"]


def test_llm_compressor_calibrates_with_bidirectional_attention_and_streaming_with_causal(gptq_folders, samples):
    """llm-compressor 0.14's traced sequential pipeline runs Phi-3's attention without its causal mask while
    it collects GPTQ Hessians: layer 0's o_proj from oneshot equals GPTQ on bidirectional-attention inputs,
    code for code. Streaming calibration feeds what inference computes (causal), as a plain forward does."""
    streamed, whole, _ = gptq_folders
    name = "model.layers.0.self_attn.o_proj.weight_packed"
    assert torch.equal(_o_proj_codes(samples, causal=False), _read(whole)[name])
    assert torch.equal(_o_proj_codes(samples, causal=True), _read(streamed)[name])
    assert not torch.equal(_read(streamed)[name], _read(whole)[name])


@pytest.mark.parametrize("bits, group, symmetric", [(4, 128, True), (4, 32, False), (8, 128, True), (4, -1, True)])
def test_integer_codes_row_by_row_equal_compressed_tensors_whole(bits, group, symmetric, monkeypatch):
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from compress.quantize import rounding

    monkeypatch.setattr(rounding, "CODES_CHUNK", 4096)  # two rows of 512 float32 at a time: 150 chunks
    weight = torch.randn(300, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    args = rounding.weight_args(bits, group, symmetric)
    scale, zero = rounding.minmax_qparams(weight, args, torch.bfloat16)
    on_grid = rounding.fake_quantize(weight, scale, zero, args)
    codes = rounding.integer_codes(on_grid, scale, zero, args)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, quantize(on_grid, scale, zero, args, dtype=torch.int8))
    assert codes.abs().max() > 0
