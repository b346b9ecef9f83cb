"""Repacking compressed-tensors int weights into AutoGPTQ v1 and AutoAWQ GEMM layouts.

The reference is independent of compress/export/repack.py: layers are quantized and packed with
compressed-tensors' own compressor and dequantized with its own `decompress`; written folders are read
back with the ONNX GenAI builder's own loaders. The slow tests build ONNX from the tiny model and compare
logits with the compressed-tensors model in transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import load_file, save_file

from compress.export.awq_gemm import write_awq_gemm
from compress.export.gptq_v1 import repack_folder, write_gptq_v1
from compress.export.repack import (
    QuantizedLinear,
    dequantize,
    fp16_scales,
    pack_awq_gemm,
    pack_gptq_v1,
    unpack_awq_gemm,
    unpack_compressed_tensors,
    unpack_gptq_v1,
    unpack_int32,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "compress" / "assets" / "tiny-phi4-mini"
# A one-layer Phi-3-shaped checkpoint: fused qkv_proj and gate_up_proj, as the builder splits them.
HIDDEN, INTERMEDIATE, Q_SIZE, KV_SIZE = 128, 256, 128, 64
SHAPES = {  # module -> (out, in)
    "self_attn.qkv_proj": (Q_SIZE + 2 * KV_SIZE, HIDDEN),
    "self_attn.o_proj": (HIDDEN, Q_SIZE),
    "mlp.gate_up_proj": (2 * INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


# ---- compressed-tensors reference ---------------------------------------------------------------

def ct_scheme(bits: int, group_size: int, symmetric: bool) -> QuantizationScheme:
    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, **strategy)
    return QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")


def random_weight(out_features: int, in_features: int, group_size: int, seed: int) -> torch.Tensor:
    """Gaussian weights, with one all-positive and one all-negative group so zero points hit both ends."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    group = in_features if group_size == -1 else group_size
    weight[0, :group] = weight[0, :group].abs()
    weight[1, -group:] = -weight[1, -group:].abs()
    return weight


def ct_compress(weight: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """What compressed-tensors stores for `weight`: weight_packed, weight_scale, weight_shape (+ zero point)."""
    args = scheme.weights
    group = weight.shape[1] if args.group_size is None else args.group_size
    grouped = weight.reshape(weight.shape[0], -1, group)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    return PackedQuantizationCompressor.compress(state, scheme)


def ct_decompress(state: dict[str, torch.Tensor], scheme: QuantizationScheme, fp16: bool = False) -> np.ndarray:
    if fp16:  # GPTQ and AWQ files hold float16 scales; that rounding is the one allowed difference
        state = {**state, "weight_scale": state["weight_scale"].half().float()}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()


def ct_layer(bits: int, group_size: int, symmetric: bool, shape=(64, 256), seed: int = 0):
    scheme = ct_scheme(bits, group_size, symmetric)
    state = ct_compress(random_weight(*shape, group_size, seed), scheme)
    zero_point = state.get("weight_zero_point")
    linear = unpack_compressed_tensors(
        state["weight_packed"].numpy(), state["weight_scale"].numpy(), None if zero_point is None else zero_point.numpy(),
        tuple(state["weight_shape"].tolist()), bits, group_size, symmetric,
    )
    return linear, state, scheme


def assert_same_layer(actual: QuantizedLinear, expected: QuantizedLinear) -> None:
    np.testing.assert_array_equal(actual.codes, expected.codes)
    np.testing.assert_array_equal(actual.zeros, expected.zeros)
    np.testing.assert_array_equal(actual.scales, expected.scales)
    assert (actual.bits, actual.group_size) == (expected.bits, expected.group_size)


# ---- pure repacking -----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compressed_tensors_unpack_matches_its_decompress(bits, group_size, symmetric):
    linear, state, scheme = ct_layer(bits, group_size, symmetric)
    np.testing.assert_array_equal(dequantize(linear), ct_decompress(state, scheme))
    if not symmetric:  # the all-positive / all-negative groups reach both ends of the zero-point range
        assert linear.zeros.min() == 0 and linear.zeros.max() == (1 << bits) - 1


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_v1_round_trip(bits, group_size, symmetric):
    linear, state, scheme = ct_layer(bits, group_size, symmetric, seed=bits)
    tensors = pack_gptq_v1(linear)
    in_features, out_features = linear.in_features, linear.out_features
    assert tensors["qweight"].shape == (in_features * bits // 32, out_features) and tensors["qweight"].dtype == np.int32
    assert tensors["qzeros"].shape == (linear.groups, out_features * bits // 32) and tensors["qzeros"].dtype == np.int32
    assert tensors["scales"].shape == (linear.groups, out_features) and tensors["scales"].dtype == np.float16
    assert tensors["g_idx"].dtype == np.int32
    back = unpack_gptq_v1(**tensors, bits=bits)
    assert_same_layer(back, fp16_scales(linear))
    np.testing.assert_array_equal(dequantize(back), ct_decompress(state, scheme, fp16=True))
    for name, value in pack_gptq_v1(back).items():
        np.testing.assert_array_equal(value, tensors[name])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_gemm_round_trip(group_size, symmetric):
    linear, state, scheme = ct_layer(4, group_size, symmetric, seed=7)
    tensors = pack_awq_gemm(linear)
    assert tensors["qweight"].shape == (linear.in_features, linear.out_features // 8)
    assert tensors["qzeros"].shape == (linear.groups, linear.out_features // 8)
    assert tensors["scales"].shape == (linear.groups, linear.out_features) and tensors["scales"].dtype == np.float16
    back = unpack_awq_gemm(**tensors)
    assert_same_layer(back, fp16_scales(linear))
    np.testing.assert_array_equal(dequantize(back), ct_decompress(state, scheme, fp16=True))
    for name, value in pack_awq_gemm(back).items():
        np.testing.assert_array_equal(value, tensors[name])


def test_awq_gemm_refuses_8_bit():
    linear, _, _ = ct_layer(8, 32, True)
    with pytest.raises(ValueError, match="4-bit weights only"):
        pack_awq_gemm(linear)


def test_repack_refuses_a_folder_without_tensors(tmp_path):
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no .safetensors files"):
        repack_folder(tmp_path / "ct", tmp_path / "out", pack_gptq_v1, {}, None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def hand_layer(codes: list[list[int]], zeros: list[list[int]]) -> QuantizedLinear:
    codes, zeros = np.array(codes, dtype=np.uint8), np.array(zeros, dtype=np.uint8)
    scales = np.ones(zeros.shape, dtype=np.float32)
    return QuantizedLinear(codes, scales, zeros, 4, codes.shape[1] // zeros.shape[1])


def test_compressed_tensors_signed_codes_by_hand():
    # symmetric 4-bit: signed code c is stored as c + 8 and means (c + 8 - 8) * scale
    signed = torch.tensor([[-8, -7, -1, 0, 1, 5, 6, 7]], dtype=torch.int8)
    packed = pack_to_int32(signed, 4).numpy()
    assert packed.view(np.uint32)[0, 0] == 0xFED98710  # first value in the lowest nibble
    linear = unpack_compressed_tensors(packed, np.ones((1, 1), np.float32), None, (1, 8), 4, -1, True)
    assert linear.codes.tolist() == [[0, 1, 7, 8, 9, 13, 14, 15]] and linear.zeros.tolist() == [[8]]
    assert dequantize(linear).tolist() == [[-8, -7, -1, 0, 1, 5, 6, 7]]


def test_gptq_v1_by_hand():
    # 8 outputs x 8 inputs, one group; output o has codes o+1 .. o+8 (mod 16)
    codes = [[(o + i + 1) % 16 for i in range(8)] for o in range(8)]
    zeros = [[8], [0], [1], [2], [3], [4], [5], [15]]
    tensors = pack_gptq_v1(hand_layer(codes, zeros))
    assert tensors["qweight"].shape == (1, 8)
    assert tensors["qweight"].view(np.uint32)[0, 0] == 0x87654321  # inputs of output 0, first input lowest
    assert tensors["qweight"].view(np.uint32)[0, 7] == 0xFEDCBA98
    # v1 stores zero - 1 along the outputs: 7, (0 - 1) & 15 = 15, 0, 1, 2, 3, 4, 14
    assert tensors["qzeros"].view(np.uint32).tolist() == [[0xE43210F7]]
    assert tensors["g_idx"].tolist() == [0] * 8
    assert unpack_gptq_v1(**tensors, bits=4).zeros[:, 0].tolist() == [8, 0, 1, 2, 3, 4, 5, 15]


def test_awq_gemm_interleave_by_hand():
    # one input, 8 outputs with codes 0..7 and zeros 8..15: word k holds output AWQ_ORDER[k]
    tensors = pack_awq_gemm(hand_layer([[o] for o in range(8)], [[o + 8] for o in range(8)]))
    assert tensors["qweight"].view(np.uint32).tolist() == [[0x75316420]]
    assert tensors["qzeros"].view(np.uint32).tolist() == [[0xFDB9ECA8]]


def test_gptq_v1_refuses_act_order_g_idx():
    linear, _, _ = ct_layer(4, 32, True)
    tensors = pack_gptq_v1(linear)
    tensors["g_idx"] = tensors["g_idx"][::-1].copy()
    with pytest.raises(ValueError, match="act-order"):
        unpack_gptq_v1(**tensors, bits=4)


# ---- folders ------------------------------------------------------------------------------------

def write_ct_folder(folder: Path, bits: int, group_size: int, symmetric: bool, shards: int = 1) -> dict:
    """A one-layer compressed-tensors checkpoint as save_pretrained(save_compressed=True) lays it out."""
    scheme = ct_scheme(bits, group_size, symmetric)
    tensors = {
        "model.embed_tokens.weight": torch.randn(256, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN),
        "model.layers.0.input_layernorm.weight": torch.ones(HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(HIDDEN),
        "model.layers.0.self_attn.qkv_proj.bias": torch.randn(Q_SIZE + 2 * KV_SIZE),
    }
    for index, (module, shape) in enumerate(SHAPES.items()):
        state = ct_compress(random_weight(*shape, group_size, seed=index), scheme)
        tensors.update({f"model.layers.0.{module}.{part}": value for part, value in state.items()})
    folder.mkdir(parents=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:  # alternate names between shards, so a layer's packed weight and scale sit in different files
        files = [f"model-0000{i + 1}-of-0000{shards}.safetensors" for i in range(shards)]
        weight_map = {name: files[index % shards] for index, name in enumerate(names)}
        for file in files:
            save_file({n: tensors[n] for n in names if weight_map[n] == file}, folder / file, metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme.model_dump(mode="json")}, "ignore": ["lm_head"],
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "generation_config.json").write_text("{}")
    (folder / "manifest.json").write_text("{}")  # not carried: it describes the source folder
    return tensors


def ct_module(tensors: dict, module: str, bits: int, group_size: int, symmetric: bool) -> QuantizedLinear:
    def part(name):
        return tensors.get(f"model.layers.0.{module}.{name}")

    zero_point = part("weight_zero_point")
    return unpack_compressed_tensors(
        part("weight_packed").numpy(), part("weight_scale").numpy(), None if zero_point is None else zero_point.numpy(),
        tuple(part("weight_shape").tolist()), bits, group_size, symmetric,
    )


def ort_values(packed: torch.Tensor, bits: int, rows: int) -> np.ndarray:
    """Unsigned values from onnxruntime's uint8 packing (first value in the low bits), one row per output."""
    data = packed.numpy().reshape(rows, -1)
    values = np.stack([(data >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits)], axis=-1)
    return values.reshape(rows, -1)


def builder_modules(loader, folder: Path) -> dict:
    """Run the ONNX GenAI builder's own reader on `folder`; -> {module: split projection in ORT format}."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = loader(config["quant_method"], input_path=str(folder), quant_attrs={"config": config, "use_g_idx": False},
                   q_size=Q_SIZE, kv_size=KV_SIZE, intermediate_size=INTERMEDIATE, num_layers=1)
    layer = model.layers[0]
    return {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
            "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}


# builder projection -> (fused compressed-tensors module, its output rows)
SPLITS = {
    "q": ("self_attn.qkv_proj", slice(0, Q_SIZE)), "k": ("self_attn.qkv_proj", slice(Q_SIZE, Q_SIZE + KV_SIZE)),
    "v": ("self_attn.qkv_proj", slice(Q_SIZE + KV_SIZE, None)), "o": ("self_attn.o_proj", slice(None)),
    "gate": ("mlp.gate_up_proj", slice(0, INTERMEDIATE)), "up": ("mlp.gate_up_proj", slice(INTERMEDIATE, None)),
    "down": ("mlp.down_proj", slice(None)),
}


def assert_builder_reads(tmp_path, writer, loader, bits, group_size, symmetric):
    tensors = write_ct_folder(tmp_path / "ct", bits, group_size, symmetric)
    modules = builder_modules(loader, writer(tmp_path / "ct", tmp_path / "out"))
    for name, (fused, rows) in SPLITS.items():
        expected = fp16_scales(ct_module(tensors, fused, bits, group_size, symmetric))
        module = modules[name]
        out_features = module.out_features
        assert out_features == expected.codes[rows].shape[0]
        np.testing.assert_array_equal(ort_values(module.qweight, bits, out_features), expected.codes[rows], err_msg=name)
        zeros = ort_values(module.qzeros, bits, out_features)[:, : expected.groups]
        np.testing.assert_array_equal(zeros, expected.zeros[rows], err_msg=name)
        scales = module.scales.float().numpy().reshape(out_features, -1)
        np.testing.assert_array_equal(scales, expected.scales[rows], err_msg=name)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 32), (8, 128)])
def test_builder_reads_gptq_v1_folder(tmp_path, bits, group_size, symmetric):
    from onnxruntime_genai.models.loaders.gptq import GPTQModel

    assert_builder_reads(tmp_path, write_gptq_v1, GPTQModel, bits, group_size, symmetric)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 128])
def test_builder_reads_awq_gemm_folder(tmp_path, group_size, symmetric):
    from onnxruntime_genai.models.loaders.awq import AWQModel

    assert_builder_reads(tmp_path, write_awq_gemm, AWQModel, 4, group_size, symmetric)


@pytest.mark.parametrize("writer,config", [
    (write_gptq_v1, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False, "checkpoint_format": "gptq"}),
    (write_awq_gemm, {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
])
def test_writer_folder(tmp_path, writer, config):
    tensors = write_ct_folder(tmp_path / "ct", 4, 32, symmetric=False, shards=2)
    out = writer(tmp_path / "ct", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["quantization_config"] == config
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "tokenizer.json", "generation_config.json",
    }
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    written = {}
    for file in set(weight_map.values()):
        shard = load_file(out / file)
        assert all(weight_map[name] == file for name in shard)
        written.update(shard)
    assert set(written) == set(weight_map)
    suffixes = ("qweight", "qzeros", "scales") + (("g_idx",) if writer is write_gptq_v1 else ())
    expected_names = {name for name in tensors if ".weight_" not in name}
    expected_names |= {f"model.layers.0.{module}.{suffix}" for module in SHAPES for suffix in suffixes}
    assert set(written) == expected_names
    for name in tensors.keys() & written.keys():  # unquantized tensors and the bias, unchanged
        assert torch.equal(written[name], tensors[name]), name


def test_writers_refuse_what_the_formats_cannot_hold(tmp_path):
    write_ct_folder(tmp_path / "w8", 8, 32, symmetric=True)
    with pytest.raises(ValueError, match="4-bit weights only"):
        write_awq_gemm(tmp_path / "w8", tmp_path / "out")
    write_ct_folder(tmp_path / "channel", 4, -1, symmetric=True)
    for writer in (write_gptq_v1, write_awq_gemm):
        with pytest.raises(ValueError, match="channel strategy"):
            writer(tmp_path / "channel", tmp_path / "out")
    tensors = write_ct_folder(tmp_path / "act", 4, 32, symmetric=True)
    tensors["model.layers.0.mlp.down_proj.weight_g_idx"] = torch.zeros(INTERMEDIATE, dtype=torch.int32)
    save_file(tensors, tmp_path / "act" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weight_g_idx"):
        write_gptq_v1(tmp_path / "act", tmp_path / "out")
    config_file = tmp_path / "w8" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantizes activations"):
        write_gptq_v1(tmp_path / "w8", tmp_path / "out")


# ---- end to end: tiny model -> compressed-tensors -> GPTQ / AWQ folder -> ONNX ---------------------

def tiny_tokens(dataset: str, tokens: int, count: int, seed: int | None = None) -> np.ndarray:
    from transformers import AutoTokenizer

    from compress.data import calibration_samples, evaluation_windows, load_documents, token_stream

    tokenizer = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    tokenizer.model_max_length = 1 << 30
    stream = token_stream(load_documents(dataset), tokenizer)
    if seed is None:
        return evaluation_windows(stream, tokens, count, dataset)
    return calibration_samples(stream, tokens, count, seed, dataset)


def fp16_scale_copy(ct_folder: Path, out: Path) -> Path:
    """The compressed-tensors folder with its scales rounded to float16: what GPTQ/AWQ files must reproduce."""
    import shutil

    shutil.copytree(ct_folder, out)
    for shard in ct_folder.glob("*.safetensors"):
        tensors = load_file(shard)
        rounded = {k: v.half().to(v.dtype) if k.endswith(".weight_scale") else v for k, v in tensors.items()}
        save_file(rounded, out / shard.name, metadata={"format": "pt"})
    return out


def build_onnx(folder: Path, out: Path, exclude: str = "/lm_head/MatMul,/model/embed_tokens/Gather") -> Path:
    # exclude: keep the tied embedding and head in float: -p int4 would round them with the builder's own RTN
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
        "-p", "int4", "-e", "cpu", "-c", str(out.parent / "builder-cache"),
        "--extra_options", "accuracy_level=1", *([f"nodes_to_exclude={exclude}"] if exclude else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=out.parent, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def onnx_logits_and_tokens(onnx_folder: Path, window: np.ndarray, prompt: np.ndarray, new_tokens: int):
    import onnxruntime_genai as og

    model = og.Model(str(onnx_folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(window) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(window.astype(np.int32)[None])
    logits = np.asarray(generator.get_output("logits"))[0]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32)[None])
    while not generator.is_done():
        generator.generate_next_token()
    return logits, list(generator.get_sequence(0))[len(prompt):]


def torch_logits_and_tokens(ct_folder: Path, window: np.ndarray, prompt: np.ndarray, new_tokens: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ct_folder, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(window)[None]).logits[0].numpy()
        sequence = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=new_tokens, do_sample=False)
    return logits, sequence[0, len(prompt):].tolist()


def assert_onnx_matches(ct_folder: Path, converted: Path, tmp_path: Path, built: bool = False) -> None:
    """`converted`'s ONNX build (`built`: `converted` is one already) against `ct_folder` in transformers."""
    window = tiny_tokens("builtin:pydoc-eval", 128, 2)[0]
    prompt = window[:16]
    onnx_folder = converted if built else build_onnx(converted, tmp_path / "onnx")
    onnx_logits, onnx_tokens = onnx_logits_and_tokens(onnx_folder, window, prompt, 8)
    exact_logits, exact_tokens = torch_logits_and_tokens(fp16_scale_copy(ct_folder, tmp_path / "ct16"), window, prompt, 8)
    original_logits, _ = torch_logits_and_tokens(ct_folder, window, prompt, 8)
    scale = np.abs(exact_logits).max()
    exact_diff = np.abs(onnx_logits - exact_logits).max() / scale
    original_diff = np.abs(onnx_logits - original_logits).max() / scale
    print(f"max |logit diff| / max |logit|: vs fp16-scale compressed-tensors {exact_diff:.2e}, vs original {original_diff:.2e}")
    assert exact_diff < 1e-5  # measured ~1e-6: fp32 summation order only
    assert original_diff < 2e-3  # measured ~2e-4 to 4e-4: float16 scales
    n = min(len(onnx_tokens), len(exact_tokens))  # both stop at an end-of-sequence token
    assert n >= 1 and onnx_tokens[:n] == exact_tokens[:n]


@pytest.mark.slow
def test_gptq_v1_folder_builds_onnx_with_the_same_logits(tmp_path):
    from compress.export.compressed_tensors import write_compressed_tensors
    from compress.quantize.llmc import quantize_gptq
    from compress.recipe import Variant

    variant = Variant(name="g", method="gptq", bits=4, group_size=32)
    samples = tiny_tokens("builtin:pydoc-calib", 128, 8, seed=0)
    model, tokenizer, _ = quantize_gptq(TINY, variant, samples)
    ct_folder = write_compressed_tensors(model, tokenizer, TINY, tmp_path / "ct")
    assert_onnx_matches(ct_folder, write_gptq_v1(ct_folder, tmp_path / "gptq"), tmp_path)


@pytest.mark.slow
def test_awq_gemm_folder_builds_onnx_with_the_same_logits(tmp_path):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.export.compressed_tensors import write_compressed_tensors
    from compress.quantize.llmc import weight_scheme

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype="auto", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    oneshot(model=model, recipe=QuantizationModifier(config_groups=weight_scheme(4, 32, False), ignore=["lm_head"]))
    ct_folder = write_compressed_tensors(model, tokenizer, TINY, tmp_path / "ct")
    assert_onnx_matches(ct_folder, write_awq_gemm(ct_folder, tmp_path / "awq"), tmp_path)


def test_fp16_scales_refuses_overflow():
    linear, _, _ = ct_layer(4, 32, True)
    with pytest.raises(ValueError, match="float16"):
        fp16_scales(replace(linear, scales=linear.scales * 1e8))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_reads_compressed_tensors_dense_packing(bits):
    """3- and 5-bit values straddle int32 words in compressed-tensors' packing; every width reads back."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    unpacked = unpack_int32(pack_to_int32(values, bits).numpy(), bits, 96).astype(np.int32) - (1 << (bits - 1))
    assert np.array_equal(unpacked, values.numpy())


@pytest.mark.slow
def test_mixed_gptq_v1_folder_builds_onnx_with_the_same_logits(tmp_path):
    """An auto variant's plan in ONNX: layers at 4 bits g32 and 8 bits g128, the head at 8 bits, in one GPTQ
    folder (`dynamic` overrides), built by the builder into MatMulNBits of each layer's own width and block."""
    import onnx

    from compress.produce_auto import write_mixed
    from compress.quantize.streaming import calibrate_streaming
    from compress.recipe import Variant

    candidates = {}
    for name, bits, group_size in (("4g32", 4, 32), ("8g128", 8, 128)):
        variant = Variant(name=name, method="rtn", bits=bits, group_size=group_size, ignore=[])
        calibrate_streaming(TINY, variant, None, tmp_path / name, tmp_path / "activations")
        candidates[name] = tmp_path / name
    plan = {layer: "8g128" if layer.endswith(("down_proj", "layers.1.self_attn.o_proj")) else "4g32"
            for layer in _linear_modules(tmp_path / "4g32")}
    plan["lm_head"] = "8g128"
    auto = Variant(name="auto", method="auto", budget={"max_kld": 1.0}, base="rtn", candidates=["4g32", "8g128"])
    write_mixed(TINY, plan, candidates, auto, tmp_path / "ct")
    gptq = write_gptq_v1(tmp_path / "ct", tmp_path / "gptq", mixed=True)
    config = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"]) == (4, 32)
    assert config["dynamic"]["+:lm_head\\."] == {"bits": 8, "group_size": 128}
    assert len(config["dynamic"]) == 1 + sum(choice == "8g128" for layer, choice in plan.items() if layer != "lm_head")
    onnx_folder = build_onnx(gptq, tmp_path / "onnx", exclude="")
    model = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False)
    widths = {node.name: {a.name: a.i for a in node.attribute if a.name in ("bits", "block_size")}
              for node in model.graph.node if node.op_type == "MatMulNBits"}
    assert widths["/lm_head/MatMulNBits"] == {"bits": 8, "block_size": 128}
    assert widths["/model/layers.0/mlp/down_proj/MatMulNBits"] == {"bits": 8, "block_size": 128}
    assert widths["/model/layers.0/attn/o_proj/MatMulNBits"] == {"bits": 4, "block_size": 32}
    assert_onnx_matches(tmp_path / "ct", onnx_folder, tmp_path, built=True)
    assert_tied_table_gathers_the_heads_integers(gptq, tmp_path)


def assert_tied_table_gathers_the_heads_integers(gptq: Path, tmp_path: Path) -> None:
    """The embedded model is tied: tied again, the graph gathers embedding rows from the head's 8-bit integers
    (no float32 table of its own), exactly the dequantized head's rows."""
    import shutil

    import onnx
    from transformers import AutoModelForCausalLM

    from compress.export.onnx_genai import run_builder, tie_table_to_head
    from compress.quantize.sensitivity import PackedRows
    from compress.tensors import TensorFolder

    tied = shutil.copytree(gptq, tmp_path / "gptq-tied")
    tie_table_to_head(tied)
    onnx_folder = run_builder(tied, tmp_path / "onnx-tied", "int4", "cpu", {"accuracy_level": "1", "shared_embeddings": "true"},
                              tmp_path / "cache", tmp_path / "tied.log")
    graph = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False).graph
    gather = next(node for node in graph.node if node.op_type == "GatherBlockQuantized")
    assert "lm_head.MatMulNBits.scales" in gather.input[2] and not any("embed_tokens.weight" in i.name for i in graph.initializer)
    window = tiny_tokens("builtin:pydoc-eval", 128, 2)[0]
    onnx_logits, _ = onnx_logits_and_tokens(onnx_folder, window, window[:4], 1)
    model = AutoModelForCausalLM.from_pretrained(fp16_scale_copy(tmp_path / "ct", tmp_path / "ct16-tied"), dtype=torch.float32,
                                                 local_files_only=True)
    with torch.no_grad():
        with TensorFolder(tmp_path / "ct16-tied") as tensors:  # the dequantized head (fp16 scales)
            rows = PackedRows(tensors, "lm_head")
            model.model.embed_tokens.weight.copy_(rows[0:rows.shape[0]])
        exact = model(torch.from_numpy(window)[None]).logits[0].numpy()
    difference = np.abs(onnx_logits - exact).max() / np.abs(exact).max()
    print(f"tied table: max |logit diff| / max |logit| {difference:.2e}")
    assert difference < 1e-5


def _linear_modules(folder: Path) -> list[str]:
    from compress.tensors import TensorFolder

    with TensorFolder(folder) as tensors:
        return [name.removesuffix(".weight_packed") for name in tensors.keys()
                if name.endswith(".weight_packed") and name.startswith("model.layers.")]
