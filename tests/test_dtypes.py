"""bf16 and fp16 checkpoints, as Microsoft publishes Phi-4: every method and format (an auto variant's plan in
ONNX among them), `compress verify` and resume, through the CLI, on half-precision copies of the embedded model.

Every other test uses the embedded fp32 model; a bf16 checkpoint once crashed the run in the per-layer
sensitivity step (safetensors' numpy reader has no bfloat16).
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import entry, run_cli
from safetensors.torch import load_file, save_file

from compress.model import BUILTIN_MODELS
from compress.tensors import TensorFolder

pytestmark = pytest.mark.slow
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# Every method and every format, on few short windows: this checks that everything runs and keeps the
# stored dtype, not how good each method is (tests/test_methods.py does that on the fp32 model).
RECIPE = """
name: half-{dtype}
model: {model}
calibration: {{dataset: builtin:pydoc-calib, samples: 8, seq_len: 128, seed: 0}}
evaluation: {{dataset: builtin:pydoc-eval, seq_len: 128, windows: 8, new_tokens: 16, speed_runs: 3,
             generation_tokens: 16, sensitivity_samples: 2}}
targets: {{cpu: {{required: true}}}}
gates: {{max_kld: 0.08, min_top1: 0.75, max_ppl_ratio: 1.2, max_size_ratio: 2.0}}
variants:
  - {{name: rtn, method: rtn, bits: 4, group_size: 128, formats: [compressed-tensors, awq]}}
  - {{name: gptq, method: gptq, bits: 4, group_size: 128, formats: [compressed-tensors, gptq]}}
  - {{name: awq, method: awq, bits: 4, group_size: 128, n_grid: 4}}
  - {{name: awq-gptq, method: awq-gptq, bits: 4, group_size: 128, n_grid: 4}}
  - {{name: onnx-int4, method: onnx-int4, group_size: 128, algorithm: rtn}}
  - {{name: onnx-int4-gptq, method: onnx-int4, from: gptq, group_size: 128}}
  - {{name: onnx-int8, method: onnx-int8, group_size: 128}}
  - {{name: onnx-int8-dynamic, method: onnx-int8-dynamic}}
  - {{name: gguf-q4km, method: gguf, quant: Q4_K_M}}
  - {{name: gguf-gptq, method: gguf, from: gptq}}
  - {{name: auto-onnx, method: auto, base: rtn, formats: [onnx], candidates: [4g64, 8g128, keep], budget: {{max_kld: 0.05}}}}
"""
ROWS = [("rtn", "compressed-tensors"), ("rtn", "awq"), ("gptq", "compressed-tensors"), ("gptq", "gptq"),
        ("awq", "compressed-tensors"), ("awq-gptq", "compressed-tensors"), ("onnx-int4", "onnx"),
        ("onnx-int4-gptq", "onnx"), ("onnx-int8", "onnx"), ("onnx-int8-dynamic", "onnx"), ("gguf-q4km", "gguf"),
        ("gguf-gptq", "gguf"), ("auto-onnx", "onnx")]
# fp16 takes the same code paths as bf16 but for the dtype itself: a smaller set keeps `make test` short.
FP16_VARIANTS = ("rtn", "gptq", "onnx-int4-gptq", "gguf-gptq")


def half_copy(folder, dtype: str):
    """The embedded model with every tensor stored in `dtype`, and config.json saying so."""
    source = BUILTIN_MODELS["tiny-phi4-mini"]
    shutil.copytree(source, folder)
    tensors = load_file(source / "model.safetensors")
    save_file({name: tensor.to(TORCH_DTYPES[dtype]) for name, tensor in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = CONFIG_DTYPES[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def half_run(request, tmp_path_factory):
    dtype = request.param
    root = tmp_path_factory.mktemp(f"half-{dtype}")
    model = half_copy(root / "model", dtype)
    recipe = root / "recipe.yaml"
    text = RECIPE.format(dtype=dtype, model=model)
    if dtype == "fp16":
        text = "\n".join(line for line in text.splitlines()
                         if not line.startswith("  - {name: ") or line.split(",")[0].split()[-1] in FP16_VARIANTS)
    recipe.write_text(text)
    result = run_cli("run", str(recipe), "--out", str(root / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    return dtype, model, recipe, root / "run", json.loads((root / "run" / "report.json").read_text())


def variants_of(dtype: str) -> list[str]:
    return [name for name, _ in ROWS if dtype == "bf16" or name in FP16_VARIANTS]


def test_every_method_and_format_runs_and_is_released(half_run):
    dtype, _, _, _, report = half_run
    assert {(v["name"], v["format"]) for v in report["variants"]} == {row for row in ROWS if row[0] in variants_of(dtype)}
    for name, fmt in ROWS:
        if name not in variants_of(dtype):
            continue
        variant = entry(report, name, fmt)
        assert variant["released"], (name, fmt, variant["not_released_because"])
        metrics = variant["targets"]["cpu"]["metrics"]
        assert math.isfinite(metrics["kld"]) and metrics["kld"] < 0.08, (name, fmt, metrics["kld"])
    # The quality ordering survives half precision: int8 is far closer to the baseline than int4.
    if dtype == "bf16":
        assert entry(report, "onnx-int8", "onnx")["targets"]["cpu"]["metrics"]["kld"] < \
            entry(report, "onnx-int4", "onnx")["targets"]["cpu"]["metrics"]["kld"] / 4


def test_stored_dtype_is_kept_in_every_calibrated_folder(half_run):
    """Unquantized tensors (embedding, norms, the head) stay in the checkpoint's dtype; scales too."""
    dtype, _, _, out, _ = half_run
    folder = out / "release" / "gptq" / "compressed-tensors"
    with TensorFolder(folder) as tensors:
        stored = {name: tensors.tensor(name).dtype for name in tensors.keys()}
    assert stored["model.embed_tokens.weight"] == TORCH_DTYPES[dtype]
    assert stored["model.norm.weight"] == TORCH_DTYPES[dtype]
    assert stored["model.layers.0.self_attn.qkv_proj.weight_scale"] == TORCH_DTYPES[dtype]
    assert stored["model.layers.0.self_attn.qkv_proj.weight_packed"] == torch.int32
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == CONFIG_DTYPES[dtype]


def test_gguf_keeps_the_stored_float_type_where_it_does_not_quantize(half_run):
    """llama.cpp's converter writes the checkpoint's own float type; the GPTQ carry-over keeps it for the head and
    norms GPTQ left float (norms are F32 in every GGUF, as llama.cpp wants them)."""
    from compress.export.gguf import tensor_types

    dtype, _, _, out, _ = half_run
    types = tensor_types(out / "release" / "gguf-gptq" / "gguf" / "gguf-gptq.gguf")
    assert types["token_embd.weight"] == {"bf16": "BF16", "fp16": "F16"}[dtype]
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_down.weight"] == "Q4_0"


def test_sensitivity_reads_half_precision_weights(half_run):
    """The step that crashed on bf16: per-layer SQNR of every quantized layer, finite and sensible."""
    _, _, _, _, report = half_run
    rows = entry(report, "gptq", "compressed-tensors")["sensitivity"]
    assert len(rows) == 16  # 4 layers × 4 linear layers; lm_head is ignored
    assert all(5 < row["sqnr_db"] < 40 for row in rows), rows


def test_verify_a_released_folder_against_the_half_precision_baseline(half_run, tmp_path):
    _, model, recipe, out, report = half_run
    folder = out / "release" / "gptq" / "compressed-tensors"
    result = run_cli("verify", str(folder), "--baseline", str(model), "--recipe", str(recipe), "--out", str(tmp_path / "v"))
    assert result.returncode == 0, result.stdout + result.stderr
    verified = json.loads((tmp_path / "v" / "report.json").read_text())
    kld = verified["variants"][0]["targets"]["cpu"]["metrics"]["kld"]
    assert np.isclose(kld, entry(report, "gptq", "compressed-tensors")["targets"]["cpu"]["metrics"]["kld"], rtol=0.02)


def test_a_second_run_resumes_from_the_released_artifacts(half_run):
    dtype, _, recipe, out, _ = half_run
    result = run_cli("run", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    names = ", ".join(dict.fromkeys(variants_of(dtype)))
    assert f"unchanged since their release, skipped: {names}" in " ".join(result.stdout.split()), result.stdout
