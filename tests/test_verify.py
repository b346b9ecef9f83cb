"""`compress verify` on good artifacts and on copies with planted faults: each fault is named in a sentence."""

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli, verify_settings
from safetensors.numpy import load_file, save_file

pytestmark = pytest.mark.slow
SETTINGS = verify_settings()


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "verify.yaml"
    path.write_text(SETTINGS)
    return path


def verify(folder, settings, out):
    result = run_cli("verify", str(folder), "--baseline", "builtin:tiny-phi4-mini", "--recipe", str(settings), "--out", str(out))
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return result, report


def failures(report):
    return report["variants"][0]["targets"]["cpu"]["failures"]


@pytest.fixture
def good(demo_run):
    out, _ = demo_run
    return {fmt: out / "release" / name / fmt for name, fmt in
            [("gptq-w4g128", "compressed-tensors"), ("gptq-w4g128", "gptq"), ("onnx-int4-gptq", "onnx")]}


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "onnx"])
def test_untouched_artifacts_pass(good, settings, tmp_path, fmt):
    result, report = verify(good[fmt], settings, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["variants"][0]["format"] == fmt and failures(report) == []
    assert "passes" in result.stdout


def _copy(folder, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(folder, copy)
    return copy


def _shard_of(folder, tensor: str) -> str:
    """The file holding `tensor`: model.safetensors, or the shard the index names (calibrated folders are
    written a layer per shard)."""
    index = folder / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"][tensor] if index.is_file() else "model.safetensors"


def _edit_tensors(folder, edit, tensor):
    shard = _shard_of(folder, tensor)
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})


def _scales_times_four(folder):
    name = "model.layers.1.mlp.down_proj.weight_scale"
    _edit_tensors(folder, lambda t: t.update({name: t[name] * 4}), name)


def _zero_layer(folder):
    name = "model.layers.2.self_attn.o_proj.weight_scale"
    _edit_tensors(folder, lambda t: t.update({name: np.zeros_like(t[name])}), name)


def _wrong_group_size(folder):
    config = json.loads((folder / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["group_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))


def _foreign_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["a completely different corpus of words"] * 50,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))


def _truncate(folder, name="model.safetensors"):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def _truncate_layer_1(folder):
    """Cut the file holding layer 1's down_proj in half. -> its name."""
    method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    tensor = "model.layers.1.mlp.down_proj." + ("qweight" if method == "gptq" else "weight_packed")
    name = _shard_of(folder, tensor)
    _truncate(folder, name)
    return name


FAULTS = [
    ("scales x4", "compressed-tensors", _scales_times_four, "model.layers.1.mlp.down_proj: its weights are far from the baseline's"),
    ("zeroed layer", "compressed-tensors", _zero_layer, "model.layers.2.self_attn.o_proj: its weights are far from the baseline's"),
    ("wrong group size", "compressed-tensors", _wrong_group_size, "config.json says group_size 64, but model.layers.0.self_attn.qkv_proj stores scales for groups of 128"),
    ("foreign tokenizer", "compressed-tensors", _foreign_tokenizer, "tokenizer encodes the evaluation text differently from the baseline's"),
    ("truncated weights", "compressed-tensors", _truncate_layer_1, "{file} is truncated"),
    ("truncated gptq", "gptq", _truncate_layer_1, "{file} is truncated"),
    ("truncated onnx data", "onnx", lambda f: _truncate(f, "model.onnx.data"), "model.onnx.data is truncated or missing"),
    ("onnx tokenizer", "onnx", _foreign_tokenizer, "tokenizer encodes the evaluation text differently"),
]


@pytest.mark.parametrize("description, fmt, plant, sentence", FAULTS, ids=[f[0] for f in FAULTS])
def test_planted_faults_are_rejected_with_a_sentence_naming_them(good, settings, tmp_path, description, fmt, plant, sentence):
    broken = _copy(good[fmt], tmp_path)
    planted = plant(broken)
    sentence = sentence.format(file=planted)
    result, report = verify(broken, settings, tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert any(sentence in failure for failure in failures(report)), failures(report)
    assert "does not pass" in result.stdout


def test_unknown_folders_are_refused_in_one_sentence(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    result = run_cli("verify", str(tmp_path / "notes"), "--baseline", "builtin:tiny-phi4-mini")
    assert result.returncode == 2
    assert result.stdout.strip().startswith("error: cannot tell the format of")


def test_own_text_without_a_recipe(good, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 40 for i in range(6)))
    out = tmp_path / "out"
    result = run_cli("verify", str(good["onnx"]), "--baseline", "builtin:tiny-phi4-mini", "--dataset", str(text),
                     "--windows", "4", "--out", str(out))
    assert result.stdout.startswith(f"Evaluating on {text} (--dataset): 4 windows × 256 tokens"), result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["dataset"] == str(text) and report["evaluation"]["windows"] == 4
