"""The memory budget: estimates that do not grow with depth, checks that do not fit reported "not verified"
(never a crash, never a pass) while the artifacts that fit are verified and released, and --max-memory."""

import json
from dataclasses import replace

import pytest
from conftest import entry, run_cli
from rich.console import Console

from compress import memory
from compress.model import inspect_model
from compress.recipe import load_recipe

PHI4 = {"hidden_size": 5120, "intermediate_size": 17920, "num_attention_heads": 40, "num_key_value_heads": 10,
        "vocab_size": 100352, "tie_word_embeddings": False}


def phi4_shapes(layers: int) -> memory.Shapes:
    layer = memory.Shapes(5120, 17920, 40, 10, 128, 100352, 1, False, 0, 0, 2).layer_parameters
    parameters = 2 * 100352 * 5120 + 5120 + layers * layer
    return memory.Shapes(5120, 17920, 40, 10, 128, 100352, layers, False, parameters, 2 * parameters, 2)


def test_layer_by_layer_estimates_do_not_grow_with_depth_and_whole_model_ones_do():
    budget = 15 * memory.GIB
    shallow, deep = phi4_shapes(1), phi4_shapes(40)
    assert memory.calibration(shallow, "gptq", 256, 2048, budget) == memory.calibration(deep, "gptq", 256, 2048, budget)
    assert memory.baseline_accuracy(shallow, 8, 2048, budget) == memory.baseline_accuracy(deep, 8, 2048, budget)
    assert memory.calibration(deep, "gptq", 256, 2048, budget) < budget  # Phi-4 14B calibrates on a 16 GB machine
    assert memory.whole_model_cpu(deep, 2048) > 50 * memory.GIB  # 14B parameters in float32
    # The builder from a folder of integer weights holds one decoder layer (builder_stream), from the float
    # checkpoint the whole model.
    for head_rounded in (False, True):
        assert memory.onnx_build(shallow, "onnx-int4", False, head_rounded) == memory.onnx_build(deep, "onnx-int4", False, head_rounded)
        assert memory.onnx_build(deep, "onnx-int4", False, head_rounded) < 8 * memory.GIB
    assert memory.onnx_build(deep, "onnx-int4", True) > 50 * memory.GIB
    # A quantized head carried in the folder is repacked a block of outputs at a time (2.3 GiB measured at
    # Phi-4-mini's width, 10.2 whole): independent of depth, and within a 16 GB machine at Phi-4's width.
    carried = memory.onnx_build(deep, "onnx-int4", False, False, head_carried=True)
    assert carried == memory.onnx_build(shallow, "onnx-int4", False, False, head_carried=True) < 8 * memory.GIB
    # 256 × 2048 calibration tokens of hidden 5120 are 10 GiB per store: spilled, so only chunks count.
    assert memory.calibration(deep, "gptq", 256, 2048, budget) < memory.calibration(deep, "gptq", 256, 2048, 100 * memory.GIB)


RECIPE = """
name: budget
model: builtin:tiny-phi4-mini
calibration: {dataset: builtin:pydoc-calib, samples: 8, seq_len: 128, seed: 0}
evaluation: {dataset: builtin:pydoc-eval, seq_len: 128, windows: 4, new_tokens: 8, generation_tokens: 8, sensitivity_samples: 0}
targets: {cpu: {required: true}}
variants:
  - {name: gptq, method: gptq, bits: 4, group_size: 128, formats: [compressed-tensors, gptq]}
  - {name: onnx, method: onnx-int4, from: gptq, group_size: 128, gates: {max_size_ratio: 1.0}}
"""


@pytest.mark.slow
def test_checks_that_do_not_fit_are_not_verified_and_what_fits_is_released(tmp_path, monkeypatch):
    """As on a 16 GB machine with Phi-4: transformers cannot hold the whole model (here: it is told it needs
    100 GiB), so the baseline's speed and the compressed-tensors check are not verified, with both figures;
    nor is the GPTQ v1 folder, whose check graph is then not even built; the ONNX artifact is verified
    against the layer-by-layer baseline and released."""
    from compress import pipeline

    monkeypatch.setattr(memory, "whole_model_cpu", lambda shapes, seq_len: 100 * memory.GIB)
    monkeypatch.setattr(memory, "folder_check", lambda info, variant, seq_len: 90 * memory.GIB)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    report = pipeline.run(recipe, str(tmp_path / "recipe.yaml"), tmp_path / "run", console=Console(width=200),
                          max_memory_gib=8)
    baseline = report["baseline"]["targets"]["cpu"]
    assert "ppl" in baseline and "decode_tps" not in baseline
    ct = entry(report, "gptq", "compressed-tensors")
    assert ct["targets"]["cpu"]["status"] == "not-verified"
    assert "needs 100.0 GiB, 8.0 GiB available" in " ".join(ct["targets"]["cpu"]["failures"])
    assert not ct["released"]
    v1 = entry(report, "gptq", "gptq")
    assert v1["targets"]["cpu"]["status"] == "not-verified" and not v1["released"]
    assert "checking the gptq folder (through an ONNX build, in onnxruntime-genai) needs 90.0 GiB, 8.0 GiB available" in \
        " ".join(v1["targets"]["cpu"]["failures"])
    assert not (tmp_path / "run" / "work" / "gptq" / "gptq-onnx-cpu").exists()
    onnx = entry(report, "onnx", "onnx")
    assert onnx["released"], onnx["not_released_because"]
    metrics = onnx["targets"]["cpu"]["metrics"]
    assert metrics["kld"] < 0.05 and "decode_speedup" not in metrics and metrics["decode_tps"] > 0


def test_max_memory_must_be_positive_and_a_layer_that_cannot_fit_stops_preflight(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    bad = run_cli("run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "a"), "--max-memory", "0")
    assert bad.returncode == 2 and "--max-memory must be a positive number" in bad.stdout, bad.stdout + bad.stderr
    short = run_cli("run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "b"), "--max-memory", "0.1")
    assert short.returncode == 2, short.stdout + short.stderr
    assert "needs about" in short.stdout and "raise --max-memory" in short.stdout and "Traceback" not in short.stdout + short.stderr


def test_preflight_prints_each_stage_against_the_budget(tmp_path):
    info = inspect_model("builtin:tiny-phi4-mini")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    stages = memory.run_estimates(info, recipe, 4 * memory.GIB)
    assert stages["baseline accuracy (layer by layer)"][1] is True
    assert stages["compressed-tensors checks (whole model in transformers)"][1] is False
    assert any(name.startswith("ONNX build") for name in stages)
    big = replace(info, parameters=14_700_000_000, weight_bytes=29_400_000_000, config={**info.config, **PHI4, "num_hidden_layers": 40})
    assert memory.run_estimates(big, recipe, 15 * memory.GIB)["compressed-tensors checks (whole model in transformers)"][0] > 15 * memory.GIB
    assert json.dumps(stages)  # plain data for the report
