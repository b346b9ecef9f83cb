"""GGUF: exact blocks against ggml's own decoder, llama.cpp's converter and runtime against transformers, recipes,
and `compress run` / `compress verify` with gguf variants end to end in the real llama.cpp."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, entry, run_cli, run_recipe, verify_settings

from compress.export.gguf_blocks import block_type, pack_blocks, unpack_blocks, why_not_exact
from compress.export.repack import QuantizedLinear, dequantize, fp16_scales
from compress.recipe import RecipeError, parse_recipe

TINY = ROOT / "compress" / "assets" / "tiny-phi4-mini"


def _linear(bits: int, group: int, symmetric: bool, rows: int = 8, columns: int = 256, seed: int = 0) -> QuantizedLinear:
    rng = np.random.default_rng(seed)
    groups = columns // group
    codes = rng.integers(0, 2**bits, (rows, columns)).astype(np.uint8)
    scales = rng.uniform(1e-3, 0.1, (rows, groups)).astype(np.float32)
    zeros = (np.full((rows, groups), 2 ** (bits - 1)) if symmetric else rng.integers(0, 2**bits, (rows, groups))).astype(np.uint8)
    return QuantizedLinear(codes, scales, zeros, bits, group)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 128, True), (4, 256, True), (4, 64, False), (8, 32, True), (8, 128, True)])
def test_blocks_hold_integer_weights_exactly_as_ggml_decodes_them(bits, group, symmetric):
    from compress.export.gguf import gguf_module

    gguf = gguf_module()
    linear = _linear(bits, group, symmetric)
    kind, data = pack_blocks(linear)
    assert kind == block_type(bits, symmetric)
    expected = dequantize(fp16_scales(linear))  # what the compressed-tensors folder means, scales at fp16
    ggml = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(expected.shape)  # llama.cpp's reference
    ours = unpack_blocks(kind, data, linear.in_features)
    if symmetric:
        assert np.array_equal(ggml, expected) and np.array_equal(ours, expected)
    else:  # Q4_1's minimum m = -zero * s is stored in fp16: exact up to that rounding
        tolerance = np.abs(linear.zeros * fp16_scales(linear).scales).max() * 2**-10
        np.testing.assert_allclose(ggml, expected, atol=tolerance, rtol=0)
        assert np.array_equal(ours, ggml)


def test_a_q4_0_block_laid_out_by_hand():
    codes = (np.arange(32) % 16).astype(np.uint8)[None]  # elements j and j+16 are equal: byte j = j | j << 4
    linear = QuantizedLinear(codes, np.array([[0.5]], np.float32), np.array([[8]], np.uint8), 4, 32)
    kind, data = pack_blocks(linear)
    assert kind == "Q4_0"
    assert data.tobytes() == b"\x00\x38" + bytes(j | j << 4 for j in range(16))  # 0.5 in fp16 is 0x3800


def test_schemes_without_an_exact_block_are_named():
    assert "3-bit" in why_not_exact(3, 128, True)
    assert "multiple of GGUF's 32" in why_not_exact(4, 16, True)
    assert "asymmetric 8-bit" in why_not_exact(8, 128, False)
    assert why_not_exact(4, -1, False) is None and why_not_exact(8, 64, True) is None


BASE = "name: r\nmodel: builtin:tiny-phi4-mini\nvariants:\n  - {name: src, method: gptq, %s}\n  - %s\n"


@pytest.mark.parametrize("source,variant,message", [
    ("bits: 3", "{name: g, method: gguf, from: src}", "symmetric 3-bit weights have no exact GGUF block"),
    ("group_size: 16", "{name: g, method: gguf, from: src}", "group size 16 is not a multiple of GGUF's 32-weight blocks"),
    ("bits: 8, symmetric: false", "{name: g, method: gguf, from: src}", "asymmetric 8-bit"),
    ("symmetric: false, overrides: [{match: down_proj, bits: 8}]", "{name: g, method: gguf, from: src}", "Q8_0 has no zero point"),
    ("bits: 4", "{name: g, method: gguf, from: src, quant: Q4_0}", "takes no quant"),
    ("bits: 4", "{name: g, method: gguf, quant: Q4_K_XL}", "not a llama-quantize type"),
    ("bits: 4", "{name: g, method: gguf, bits: 4}", "its quant:"),
    ("bits: 4", "{name: g, method: gguf, quant: IQ2_XS, imatrix: false}", "refuses IQ2_XS without an importance matrix"),
    ("bits: 4, quant: Q4_0", "{name: g, method: gguf}", "only gguf variants take this option"),
])
def test_gguf_recipes_that_cannot_work_are_refused_when_read(source, variant, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(BASE % (source, variant))


def test_imatrix_defaults_to_k_and_iq_quants():
    recipe = parse_recipe(BASE % ("bits: 4", "{name: a, method: gguf, quant: Q4_K_M}\n  - {name: b, method: gguf, quant: Q4_0}\n"
                                  "  - {name: c, method: gguf, quant: IQ4_XS}\n  - {name: d, method: gguf, from: src}"))
    assert [v.uses_imatrix for v in recipe.variants] == [False, True, False, True, False]
    assert all(v.formats == ["gguf"] for v in recipe.variants[1:])


def _windows(count: int = 4, length: int = 128) -> np.ndarray:
    from transformers import AutoTokenizer

    from compress.data import load_documents

    tokenizer = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    ids = tokenizer("\n\n".join(load_documents("builtin:pydoc-eval")), add_special_tokens=False)["input_ids"]
    return np.array(ids[: count * length]).reshape(count, length)


def test_f32_gguf_of_the_embedded_model_matches_transformers(tmp_path):
    """llama.cpp's converter and runtime against transformers on the same windows: KLD < 1e-5, same argmax."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.export.gguf import convert
    from compress.runtimes.llama_cpp import LlamaCppRuntime

    file = convert(TINY, tmp_path / "f32.gguf", "f32", tmp_path / "convert.log")
    windows = _windows()
    runtime = LlamaCppRuntime(file, "cpu", 2, windows.shape[1])
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    klds, agree = [], []
    for window, blocks in zip(windows, runtime.window_logprobs(windows), strict=True):
        ours = np.concatenate(list(blocks))
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor(window[None])).logits[0, :-1], -1).numpy()
        klds.append((np.exp(reference) * (reference - ours)).sum(-1).mean())
        agree.append((ours.argmax(-1) == reference.argmax(-1)).mean())
    assert max(klds) < 1e-5, klds
    assert min(agree) == 1.0
    greedy = model.generate(torch.tensor(windows[:1, :32]), max_new_tokens=8, do_sample=False)[0, 32:].tolist()
    assert runtime.generate(windows[0, :32].tolist(), 8, set()) == greedy


def test_converter_refuses_a_tokenizer_it_cannot_reproduce(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "NFKC"}  # another pre-processing than GPT-2's: llama.cpp would tokenize differently
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = subprocess.run([sys.executable, "-m", "compress.export.gguf_convert", str(folder), str(tmp_path / "x.gguf"),
                             "--outtype", "f32"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "llama.cpp does not know this tokenizer's pre-tokenizer" in result.stderr.splitlines()[-1]


RECIPE = """\
name: gguf-e2e
model: builtin:tiny-phi4-mini
calibration: {samples: 8, seq_len: 128}
evaluation: {seq_len: 128, windows: 8, new_tokens: 8, prompts: [Hello]}
gates: {max_kld: 0.2, min_top1: 0.7}
variants:
  - {name: rtn-sym, method: rtn, bits: 4, group_size: 64, overrides: [{match: down_proj, bits: 8}]}
  - {name: rtn-asym, method: rtn, bits: 4, group_size: 128, symmetric: false}
  - {name: from-sym, method: gguf, from: rtn-sym}
  - {name: from-asym, method: gguf, from: rtn-asym}
  - {name: q4km, method: gguf, quant: Q4_K_M, overrides: [{match: o_proj, bits: 8}]}
"""


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    return run_recipe(tmp_path_factory, "gguf", RECIPE)


def _released_gguf(out, name):
    return out / "release" / name / "gguf" / f"{name}.gguf"


@pytest.mark.slow
@pytest.mark.parametrize("name,source,types", [("from-sym", "rtn-sym", {"Q4_0", "Q8_0"}), ("from-asym", "rtn-asym", {"Q4_1"})])
def test_carried_gguf_holds_the_calibrated_integers(gguf_run, name, source, types):
    """Every quantized layer of the released file, decoded by gguf-py (ggml's reference), equals the saved
    calibration's weights (fp16 scales; Q4_1's minimum to fp16)."""
    from compress.export.gguf import gguf_module, gguf_name_map, tensor_name
    from compress.tensors import TensorFolder
    from compress.verify.layers import stored_linear

    out, report = gguf_run
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(_released_gguf(out, name)))
    calibrated = out / "work" / source / "calibrated"
    names = gguf_name_map(json.loads((calibrated / "config.json").read_text()))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    with TensorFolder(calibrated) as folder:
        modules = [key.removesuffix(".weight_packed") for key in folder.keys() if key.endswith(".weight_packed")]
        assert len(modules) == 16
        for module in modules:
            tensor = tensors[tensor_name(names, module + ".weight")]
            linear = stored_linear(folder, module)
            expected = dequantize(fp16_scales(linear))
            decoded = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(expected.shape)
            assert tensor.tensor_type.name in types
            if tensor.tensor_type.name == "Q4_1":
                np.testing.assert_allclose(decoded, expected, atol=np.abs(expected).max() * 2**-9, rtol=0)
            else:
                assert np.array_equal(decoded, expected), module
    assert entry(report, name, "gguf")["gguf"]["tensor_types"].keys() >= types


@pytest.mark.slow
def test_gguf_variants_are_verified_in_llama_cpp_and_released_with_a_modelfile(gguf_run):
    out, report = gguf_run
    source = entry(report, "rtn-sym", "compressed-tensors")["targets"]["cpu"]["metrics"]
    for name in ("from-sym", "from-asym", "q4km"):
        variant = entry(report, name, "gguf")
        cpu = variant["targets"]["cpu"]
        assert variant["released"], variant["not_released_because"]
        assert variant["runtime"] == "llama.cpp" and cpu["environment"]["runtime"] == "llama.cpp"
        assert "omp_wait_policy" in cpu["environment"]
        assert {"ppl", "kld", "kld_se", "top1", "decode_tps", "prefill_tps"} <= cpu["metrics"].keys()
        folder = out / "release" / name / "gguf"
        assert {"tokenizer.json", "Modelfile", "manifest.json"} <= {p.name for p in folder.iterdir()}
        assert not list(folder.glob("*.txt"))  # llama-quantize's tensor-type list stays with the logs
        modelfile = (folder / "Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./{name}.gguf\n") and '<|user|>{{ .Content }}<|end|>' in modelfile
        assert 'PARAMETER stop "<|end|>"' in modelfile
    # The same integers in llama.cpp (its activations rounded to 8 bits) and in transformers: close, not equal.
    carried = entry(report, "from-sym", "gguf")["targets"]["cpu"]["metrics"]
    assert abs(carried["kld"] - source["kld"]) < 0.25 * source["kld"] + 3 * (carried["kld_se"] + source["kld_se"])
    q4km = entry(report, "q4km", "gguf")
    assert q4km["gguf"]["tensor_types"]["Q8_0"] >= 4  # the four o_proj overrides
    assert "not a multiple of 256" in next(iter(q4km["gguf"]["fell_back"].values()))  # hidden size 128
    assert "exactly our tokenizer's" in q4km["gguf"]["imatrix"]
    assert abs(q4km["bits_per_weight"] - 8 * _quantized_bytes(_released_gguf(out, "q4km"))) < 1e-9


def _quantized_bytes(file) -> float:
    """Bytes per weight of the file's block-typed tensors, from ggml's own block sizes."""
    from compress.export.gguf import gguf_module

    gguf = gguf_module()
    reader = gguf.GGUFReader(str(file))
    sizes = [(int(t.n_elements), int(t.n_elements) // gguf.GGML_QUANT_SIZES[t.tensor_type][0] * gguf.GGML_QUANT_SIZES[t.tensor_type][1])
             for t in reader.tensors if t.tensor_type.name not in ("F32", "F16", "BF16")]
    return sum(b for _, b in sizes) / sum(n for n, _ in sizes)


@pytest.mark.slow
def test_compress_verify_takes_a_gguf_file_and_names_damage_in_a_sentence(gguf_run, tmp_path):
    out, _ = gguf_run
    settings = tmp_path / "settings.yaml"
    settings.write_text(verify_settings("{max_kld: 0.2, min_top1: 0.7}"))
    good = _released_gguf(out, "from-sym")

    def verify(file, name):
        result = run_cli("verify", str(file), "--baseline", "builtin:tiny-phi4-mini", "--recipe", str(settings), "--out", str(tmp_path / name))
        report = json.loads((tmp_path / name / "report.json").read_text()) if (tmp_path / name / "report.json").is_file() else None
        return result, report

    result, report = verify(good, "good")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["variants"][0]["format"] == "gguf" and report["variants"][0]["targets"]["cpu"]["failures"] == []

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    result, report = verify(truncated, "truncated")
    assert result.returncode == 1
    assert any("truncated" in failure for failure in report["variants"][0]["targets"]["cpu"]["failures"])

    other = tmp_path / "other-model"  # the same weights with two vocabulary entries swapped: another tokenizer
    shutil.copytree(TINY, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300], sorted(vocab, key=vocab.get)[301]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    from compress.export.gguf import convert

    swapped = convert(other, tmp_path / "swapped.gguf", "f32", tmp_path / "convert.log")
    result, report = verify(swapped, "swapped")
    assert result.returncode == 1
    assert any("encodes the evaluation text differently" in f for f in report["variants"][0]["targets"]["cpu"]["failures"])


def test_without_llama_cpp_a_gguf_recipe_stops_in_preflight_with_a_sentence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: builtin:tiny-phi4-mini\nvariants: [{name: g, method: gguf}]\n")
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "out"), env={"COMPRESS_LLAMA_CPP": str(tmp_path / "none")})
    assert result.returncode == 2
    assert "gguf variants need llama.cpp" in result.stderr + result.stdout and "make llama-cpp" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_tokenizer_llama_cpp_cannot_reproduce_fails_its_variant_and_the_run_goes_on(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nfkc") / "model"
    shutil.copytree(TINY, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "NFKC"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    recipe = (f"name: nfkc\nmodel: {folder}\ncalibration: {{samples: 4, seq_len: 64}}\n"
              "evaluation: {seq_len: 64, windows: 4, new_tokens: 4, prompts: [Hello]}\n"
              "variants:\n  - {name: rtn, method: rtn}\n  - {name: g, method: gguf, quant: Q8_0}\n")
    path = folder.parent / "recipe.yaml"
    path.write_text(recipe)
    result = run_cli("run", str(path), "--out", str(folder.parent / "run"))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((folder.parent / "run" / "report.json").read_text())
    assert entry(report, "rtn", "compressed-tensors")["released"]
    failed = entry(report, "g", "gguf")
    assert not failed["released"] and "does not know this tokenizer's pre-tokenizer" in failed["not_released_because"][0]
