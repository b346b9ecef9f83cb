"""`compress run` end to end on the embedded model, through the real CLI and the real libraries."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import entry, run_cli
from transformers import AutoModelForCausalLM

from compress.release import file_hashes

pytestmark = pytest.mark.slow
HAS_CUDA = torch.cuda.is_available()


def test_demo_releases_a_verified_gptq_artifact(demo_run):
    out, result = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"recipe", "model", "baseline", "variants"}
    variant = entry(report, "gptq-w4g128", "compressed-tensors")
    assert variant["released"] and variant["method"] == "gptq" and variant["format"] == "compressed-tensors"
    cpu = variant["targets"]["cpu"]
    assert cpu["status"] == "pass" and cpu["failures"] == []
    for key in ("ppl", "ppl_ratio", "kld", "kld_se", "top1", "delta_p_rms", "decode_tps", "prefill_tps",
                "decode_speedup", "peak_rss_mb"):
        assert math.isfinite(cpu["metrics"][key]), key
    assert 0 < cpu["metrics"]["kld"] < 0.02 and cpu["metrics"]["top1"] > 0.9
    assert 4.0 < variant["bits_per_weight"] < 4.6
    assert variant["size_bytes"] < 0.6 * report["baseline"]["size_bytes"]
    cuda = variant["targets"]["cuda"]
    assert cuda["status"] == ("pass" if HAS_CUDA else "not-verified")
    assert "gptq-w4g128" in result.stdout and "pass, released" in result.stdout
    assert (out / "report.md").read_text().count("gptq-w4g128") >= 2
    assert all(v["released"] for v in report["variants"]), [v["not_released_because"] for v in report["variants"]]


def test_released_folder_matches_its_manifest_and_staging_is_empty(demo_run):
    out, _ = demo_run
    folder = out / "release" / "gptq-w4g128" / "compressed-tensors"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] == file_hashes(folder)
    assert manifest["verdicts"]["cpu"]["status"] == "pass"
    assert "gptq-w4g128" in [v["name"] for v in manifest["recipe"]["variants"]]
    assert {"torch", "transformers", "llmcompressor", "compressed-tensors"} <= set(manifest["versions"])
    assert len(manifest["data"]["calibration_tokens"]) == 64
    assert not (out / "staging" / "gptq-w4g128" / "compressed-tensors").exists()


def test_released_artifact_reloads_in_plain_transformers_and_its_perplexity_is_true(demo_run):
    """Recompute perplexity independently: plain from_pretrained and torch's cross-entropy."""
    out, _ = demo_run
    folder = out / "release" / "gptq-w4g128" / "compressed-tensors"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = torch.from_numpy(np.load(out / "data" / "windows.npz")["windows"])
    with torch.inference_mode():
        logits = torch.cat([model(chunk).logits for chunk in windows.split(8)])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    report = json.loads((out / "report.json").read_text())
    reported = entry(report, "gptq-w4g128", "compressed-tensors")["targets"]["cpu"]["metrics"]["ppl"]
    assert math.exp(nll.item()) == pytest.approx(reported, rel=0.01)
    baseline = report["baseline"]["targets"]["cpu"]["ppl"]
    assert reported != baseline  # the quantized model really differs from the original


FAILING = """\
name: failing
model: builtin:tiny-phi4-mini
calibration: {samples: 8, seq_len: 128}
evaluation: {seq_len: 128, windows: 8, new_tokens: 8}
targets:
  cpu: {required: true}
  cuda: {required: true}
gates: {max_kld: 0.05}
variants:
  - name: impossible
    method: gptq
    bits: 4
    group_size: 128
    gates: {max_kld: 0}
  - name: fine-but-needs-cuda
    method: gptq
    bits: 8
    group_size: 64
"""


@pytest.mark.skipif(HAS_CUDA, reason="checks what happens when a required CUDA target is absent")
def test_failed_gates_and_missing_required_cuda_release_nothing(tmp_path, write_recipe):
    out = tmp_path / "run"
    result = run_cli("run", str(write_recipe(FAILING)), "--out", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    assert not (out / "release").exists() or not any((out / "release").rglob("*"))
    impossible = json.loads((out / "staging" / "impossible" / "compressed-tensors" / "manifest.json").read_text())
    assert impossible["released"] is False
    assert impossible["verdicts"]["cpu"]["status"] == "fail"
    assert any(f.startswith("KLD ") and f.endswith("> max_kld 0") for f in impossible["verdicts"]["cpu"]["failures"])
    fine = json.loads((out / "staging" / "fine-but-needs-cuda" / "compressed-tensors" / "manifest.json").read_text())
    assert fine["verdicts"]["cpu"]["status"] == "pass"
    assert fine["verdicts"]["cuda"]["status"] == "not-verified"
    assert fine["not_released_because"] == ["cuda is required but was not verified: no CUDA device on this machine"]
    report = json.loads((out / "report.json").read_text())
    assert [v["released"] for v in report["variants"]] == [False, False]
    assert "max_kld 0" in (out / "report.md").read_text()


SWEEP = """\
name: sweep
model: builtin:tiny-phi4-mini
evaluation: {seq_len: 128, windows: 4, new_tokens: 8, prompts: [Hello]}
gates: {max_kld: 1.0, min_top1: 0.5}
variants:
  - {name: rtn, method: rtn, matrix: {bits: [4, 8]}}
"""


def test_sweep_runs_every_expansion_and_reruns_reuse_the_cached_baseline(tmp_path, write_recipe):
    recipe = write_recipe(SWEEP)
    first = run_cli("run", str(recipe), "--out", str(tmp_path / "a"))
    second = run_cli("run", str(recipe), "--out", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    assert "(cached)" not in first.stdout and "(cached)" in second.stdout
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("a", "b")]
    assert [v["name"] for v in reports[1]["variants"]] == ["rtn-w4", "rtn-w8"]
    assert reports[0]["baseline"]["targets"]["cpu"]["ppl"] == reports[1]["baseline"]["targets"]["cpu"]["ppl"]
    assert reports[1]["baseline"]["targets"]["cpu"]["accuracy_cached"] is True
    w4, w8 = (v["targets"]["cpu"]["metrics"]["kld"] for v in reports[1]["variants"])
    assert w8 < w4
