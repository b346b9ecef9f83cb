"""Bad input gets one sentence and exit 2; a killed run never leaves a partial release; runs resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli

from compress.model import BUILTIN_MODELS
from compress.release import file_hashes

TINY = BUILTIN_MODELS["tiny-phi4-mini"]
RECIPE = """\
name: r
model: {model}
calibration: {{dataset: {calib}, samples: 4, seq_len: 64}}
evaluation: {{dataset: {eval}, seq_len: 64, windows: {windows}, new_tokens: 4, prompts: [Hi]}}
gates: {{max_kld: 1.0}}
variants:
  - {{name: a, method: rtn, group_size: {group}}}
"""


def recipe_text(model="builtin:tiny-phi4-mini", calib="builtin:pydoc-calib", eval_set="builtin:pydoc-eval", windows=2, group=32):
    return RECIPE.format(model=model, calib=calib, eval=eval_set, windows=windows, group=group)


def model_copy(tmp_path, edit=None):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    if edit:
        edit(folder)
    return folder


def _edit_json(folder, name, change):
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _garbage_header(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 100)


def _pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _bigger_tokenizer(folder):
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(8)])
    tokenizer.save(str(folder / "tokenizer.json"))


def _folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("not a model")
    return str(path)


def _write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# (id, how to build the recipe text from tmp_path, expected words in the one sentence)
CASES = [
    ("malformed yaml", lambda t: "name: r\nvariants: [\n", "not valid YAML"),
    ("unknown key", lambda t: recipe_text() + "colour: red\n", "colour: unknown key"),
    ("wrong type", lambda t: recipe_text().replace("windows: 2", "windows: many"), "evaluation.windows: input should be a valid integer"),
    ("bits out of range", lambda t: recipe_text().replace("method: rtn", "method: rtn, bits: 7"), "bits: must be one of 2, 3, 4, 5, 6, 8"),
    ("group size not a power of two", lambda t: recipe_text(group=48), "group_size: must be a power of two"),
    ("group size does not divide", lambda t: recipe_text(group=256), "group_size: 256 does not divide the model's hidden_size 128"),
    ("duplicate names", lambda t: recipe_text() + "  - {name: a, method: gptq}\n", "variant name 'a' is used twice"),
    ("from a missing variant", lambda t: recipe_text() + "  - {name: o, method: onnx-int4, from: zz}\n", "no earlier variant is named 'zz'"),
    ("empty variant list", lambda t: recipe_text().split("variants:")[0] + "variants: []\n", "list at least one variant"),
    ("unsupported format", lambda t: recipe_text().replace("method: rtn", "method: rtn, formats: [onnx]"), "cannot write 'onnx'"),
    ("unknown target", lambda t: recipe_text() + "targets: {cpu: {required: true}, tpu: {required: true}}\n", "tpu: say which device it is, device: cpu or device: cuda"),
    ("missing model path", lambda t: recipe_text(model=str(t / "nowhere")), "does not exist"),
    ("folder that is not a model", lambda t: recipe_text(model=_folder(t / "empty")), "is not a model folder: config.json is missing"),
    ("non-Phi-3 architecture", lambda t: recipe_text(model=str(model_copy(t, lambda f: _edit_json(
        f, "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))))), "is a LlamaForCausalLM model"),
    ("config and weights disagree", lambda t: recipe_text(model=str(model_copy(t, lambda f: _edit_json(
        f, "config.json", lambda c: c.update(intermediate_size=1024))))), "config.json does not match the weights"),
    ("layer count disagrees", lambda t: recipe_text(model=str(model_copy(t, lambda f: _edit_json(
        f, "config.json", lambda c: c.update(num_hidden_layers=6))))), "it says 6 layers but the weights hold 4"),
    ("truncated safetensors", lambda t: recipe_text(model=str(model_copy(t, _truncate))), "model.safetensors is truncated"),
    ("corrupted safetensors", lambda t: recipe_text(model=str(model_copy(t, _garbage_header))), "model.safetensors is damaged or truncated"),
    ("pickle weights only", lambda t: recipe_text(model=str(model_copy(t, _pickle_only))), "holds only pickle weights"),
    ("tokenizer of another size", lambda t: recipe_text(model=str(model_copy(t, _bigger_tokenizer))), "the tokenizer has 4104 tokens but the model's vocabulary has 4096"),
    ("empty calibration file", lambda t: recipe_text(calib=_write(t, "c.txt", b"\n\n")), "holds no text"),
    ("calibration not UTF-8", lambda t: recipe_text(calib=_write(t, "c.txt", "caf\xe9 ".encode("latin-1") * 50)), "is not UTF-8 text"),
    ("calibration shorter than a window", lambda t: recipe_text(calib=_write(t, "c.txt", b"tiny text")), "shorter than one window of 64"),
    ("evaluation shorter than its windows", lambda t: recipe_text(eval_set=_write(t, "e.txt", b"def f(): pass\n" * 20), windows=50), "fewer than the 50 asked for"),
    ("jsonl without text", lambda t: recipe_text(calib=_write(t, "c.jsonl", b'{"body": "x"}\n')), "c.jsonl:1: each line must be a JSON object with a 'text' field"),
    ("unknown built-in data set", lambda t: recipe_text(calib="builtin:wikitext"), "unknown built-in data set 'builtin:wikitext'"),
    ("hub id while offline", lambda t: recipe_text(model="nobody/no-such-model"), "cannot download nobody/no-such-model: no network"),
]


@pytest.mark.parametrize("description, make, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, description, make, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make(tmp_path))
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1"}
    result = run_cli("run", str(recipe), "--out", str(out), env=env)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output
    last = output.splitlines()[-1]
    assert last.startswith("error: ") and expected in last, output
    assert not (out / "release").exists() or not any((out / "release").iterdir())


def test_more_cli_mistakes(tmp_path):
    assert run_cli("run", str(tmp_path / "missing.yaml")).returncode == 2
    (tmp_path / "a-file").write_text("x")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text())
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "a-file" / "out"))
    assert result.returncode == 2 and "is not writable" in result.stdout
    model = model_copy(tmp_path)
    recipe.write_text(recipe_text(model=str(model)))
    result = run_cli("run", str(recipe), "--out", str(model / "out"))
    assert result.returncode == 2 and "is inside the model folder" in result.stdout


def test_low_disk_is_refused_before_anything_is_written(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(recipe_text())
        result = run_cli("run", str(recipe), "--out", str(mount / "out"))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "of disk in" in result.stdout and "MiB is free" in result.stdout
        assert not (mount / "out" / "release").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


KILL_RECIPE = """\
name: kill
model: builtin:tiny-phi4-mini
calibration: {samples: 8, seq_len: 128}
evaluation: {seq_len: 128, windows: 8, new_tokens: 8, prompts: [Hi]}
gates: {max_kld: 1.0, min_top1: 0.5}
variants:
  - {name: rtn, method: rtn}
  - {name: gptq, method: gptq, formats: [compressed-tensors, gptq]}
  - {name: onnx, method: onnx-int4, from: gptq}
"""


def release_is_consistent(out):
    """Every released folder has its manifest, and its files match the manifest's hashes."""
    release = out / "release"
    if not release.exists():
        return 0
    count = 0
    for variant in release.iterdir():
        for folder in variant.iterdir():
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["files"] == file_hashes(folder), folder
            assert manifest["verdicts"]["cpu"]["status"] == "pass"
            count += 1
    return count


def start(recipe, out):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(process, path, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigkill_at_any_point_leaves_release_consistent_and_the_next_run_resumes(tmp_path):
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(KILL_RECIPE)
    out = tmp_path / "run"
    kill_points = [out / "baseline" / "cpu.job.json", out / "work" / "rtn" / "calibration.json",
                   out / "release" / "rtn" / "compressed-tensors", out / "staging" / "gptq" / "gptq",
                   out / "release" / "gptq" / "compressed-tensors", out / "work" / "onnx"]
    killed = 0
    for point in kill_points:
        process = start(recipe, out)
        if wait_for(process, point):
            os.killpg(process.pid, signal.SIGKILL)
            killed += 1
        process.wait()
        release_is_consistent(out)
    assert killed >= 4
    final = start(recipe, out)
    output, _ = final.communicate(timeout=600)
    assert final.returncode == 0, output
    assert release_is_consistent(out) == 4  # rtn, gptq (2 formats), onnx
    again = start(recipe, out)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "unchanged since their release, skipped: rtn, gptq, onnx" in output, output


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(KILL_RECIPE)
    out = tmp_path / "run"
    process = start(recipe, out)
    assert wait_for(process, out / "work" / "rtn" / "calibration.json")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("error: interrupted")
    release_is_consistent(out)


@pytest.mark.slow
def test_local_models_never_touch_the_network(tmp_path):
    """With every proxy and the hub endpoint pointing at a closed port, a local run still completes."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(model=str(model_copy(tmp_path))))
    nowhere = "http://127.0.0.1:9"
    env = {"HTTP_PROXY": nowhere, "HTTPS_PROXY": nowhere, "http_proxy": nowhere, "https_proxy": nowhere,
           "HF_ENDPOINT": nowhere, "HF_HUB_OFFLINE": "0"}
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "release" / "a" / "compressed-tensors" / "manifest.json").is_file()
