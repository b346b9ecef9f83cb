"""Every method and format of the demo recipe, end to end through the CLI, compared with margins."""

import json
import math

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from conftest import entry, run_recipe
from transformers import AutoModelForCausalLM

from compress.export.onnx_genai import run_builder
from compress.model import BUILTIN_MODELS

pytestmark = pytest.mark.slow
ROWS = [
    ("rtn-w4g128", "compressed-tensors", "transformers"),
    ("awq-w4g128", "compressed-tensors", "transformers"),
    ("gptq-w4g128", "compressed-tensors", "transformers"),
    ("gptq-w4g128", "gptq", "onnxruntime-genai"),
    ("onnx-int4-rtn", "onnx", "onnxruntime-genai"),
    ("onnx-int4-gptq", "onnx", "onnxruntime-genai"),
    ("onnx-int8", "onnx", "onnxruntime-genai"),
]


@pytest.fixture(scope="module")
def report(demo_run):
    out, result = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "report.json").read_text())


def cpu(report, name, fmt):
    return entry(report, name, fmt)["targets"]["cpu"]["metrics"]


def clearly_below(low: dict, high: dict) -> bool:
    """low's KLD is below high's by more than twice their combined standard error."""
    return high["kld"] - low["kld"] > 2 * math.hypot(low["kld_se"], high["kld_se"])


@pytest.mark.parametrize("name, fmt, runtime", ROWS, ids=[f"{n}/{f}" for n, f, _ in ROWS])
def test_every_row_is_measured_in_its_runtime_and_released(report, name, fmt, runtime):
    variant = entry(report, name, fmt)
    assert variant["released"], variant["not_released_because"]
    assert variant["runtime"].startswith(runtime)
    metrics = variant["targets"]["cpu"]["metrics"]
    for key in ("ppl", "kld", "kld_se", "top1", "delta_p_rms", "decode_tps", "prefill_tps", "peak_rss_mb", "decode_speedup"):
        assert math.isfinite(metrics[key]), key
    assert variant["targets"]["cuda"]["status"] in ("pass", "not-verified")
    assert variant["bits_per_weight"] >= 4.0  # scales and zero points count


def test_gptq_beats_rtn_at_the_same_group_size(report):
    assert clearly_below(cpu(report, "gptq-w4g128", "compressed-tensors"), cpu(report, "rtn-w4g128", "compressed-tensors"))


def test_awq_beats_rtn_at_the_same_group_size(report):
    """Phi-aware AWQ (issue 7); tests/test_awq.py compares it with llm-compressor's stock AWQ as well."""
    assert clearly_below(cpu(report, "awq-w4g128", "compressed-tensors"), cpu(report, "rtn-w4g128", "compressed-tensors"))
    assert len(entry(report, "awq-w4g128", "compressed-tensors")["awq"]["applied"]) == 16


def test_gptq_weights_carried_into_onnx_beat_the_builders_rounding(report):
    assert clearly_below(cpu(report, "onnx-int4-gptq", "onnx"), cpu(report, "onnx-int4-rtn", "onnx"))
    assert "gptq-w4g128" in entry(report, "onnx-int4-gptq", "onnx")["from"]


def test_gptq_v1_repack_is_lossless_through_the_builder(report):
    """The GPTQ v1 folder, built with `-i` at fp32 compute, scores what the compressed-tensors folder scores."""
    ct, v1 = cpu(report, "gptq-w4g128", "compressed-tensors"), cpu(report, "gptq-w4g128", "gptq")
    assert v1["kld"] == pytest.approx(ct["kld"], rel=0.02)
    assert v1["top1"] == pytest.approx(ct["top1"], abs=0.005)


def test_each_artifact_peak_memory_is_its_own(report):
    """ONNX workers import no torch: far below the transformers baseline, not the parent's peak."""
    baseline = report["baseline"]["targets"]["cpu"]["peak_rss_mb"]
    assert cpu(report, "onnx-int4-rtn", "onnx")["peak_rss_mb"] < 0.6 * baseline


def test_generation_sanity_is_measured_against_the_baseline(report):
    for name, fmt, _ in ROWS:
        metrics = cpu(report, name, fmt)
        assert 0 <= metrics["repetition"] < 0.5 and 0 <= metrics["eos_rate"] <= 1
        assert 0 < metrics["generation_agreement"] <= 1
    assert cpu(report, "onnx-int8", "onnx")["generation_agreement"] > cpu(report, "rtn-w4g128", "compressed-tensors")["generation_agreement"]


def test_int8_is_closer_than_int4_and_bits_count_scales(report):
    assert cpu(report, "onnx-int8", "onnx")["kld"] < cpu(report, "onnx-int4-gptq", "onnx")["kld"] / 5
    assert entry(report, "onnx-int8", "onnx")["bits_per_weight"] > 8.0  # scales are stored too
    assert 4.25 <= entry(report, "gptq-w4g128", "gptq")["bits_per_weight"] < 4.5


def test_released_gptq_v1_folder_builds_with_the_builder_and_generates(demo_run, tmp_path):
    out, _ = demo_run
    folder = out / "release" / "gptq-w4g128" / "gptq"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    built = run_builder(folder, tmp_path / "onnx", "int4", "cpu", {"accuracy_level": "4", "hf_token": "false"},
                        tmp_path / "cache", tmp_path / "build.log")
    model = og.Model(str(built))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=48, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("<|user|>What does the assert statement do?<|end|><|assistant|>"))
    while not generator.is_done():
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0))
    assert len(text) > 40


def test_onnx_fp32_logits_equal_the_pytorch_baseline(tmp_path):
    source = BUILTIN_MODELS["tiny-phi4-mini"]
    built = run_builder(source, tmp_path / "fp32", "fp32", "cpu", {"hf_token": "false"}, tmp_path / "cache", tmp_path / "log")
    window = np.arange(5, 205, dtype=np.int32)
    model = og.Model(str(built))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=256)
    generator = og.Generator(model, params)
    generator.append_tokens(window[None])
    onnx_logits = np.asarray(generator.get_output("logits"))[0]
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch_logits = reference(torch.as_tensor(window[None], dtype=torch.long)).logits[0].numpy()
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3


MORE_FORMATS = """\
name: more-formats
model: builtin:tiny-phi4-mini
calibration: {samples: 16, seq_len: 128}
evaluation: {seq_len: 128, windows: 8, new_tokens: 8}
gates: {max_kld: 0.1, min_top1: 0.8}
variants:
  - {name: awq-asym, method: awq, symmetric: false, n_grid: 5, formats: [compressed-tensors, awq]}
  - {name: gptq-safe, method: gptq, preset: phi4-safe, ignore: []}
  - {name: onnx-int4-awq, method: onnx-int4, from: awq-asym, symmetric: false}
  - {name: onnx-int4-awq-float-head, method: onnx-int4, from: awq-asym, symmetric: false, ignore: [lm_head]}
  - {name: onnx-int4-safe, method: onnx-int4, from: gptq-safe}
  - {name: onnx-int4-mixed, method: onnx-int4, ignore: [], overrides: [{match: lm_head, bits: 8}, {match: down_proj, bits: skip}]}
  - {name: onnx-int8-dynamic, method: onnx-int8-dynamic}
"""


@pytest.fixture(scope="module")
def more(tmp_path_factory):
    return run_recipe(tmp_path_factory, "more", MORE_FORMATS)


def test_awq_folder_and_awq_weights_in_onnx(more):
    out, report = more
    awq = entry(report, "awq-asym", "awq")
    config = json.loads((out / "release" / "awq-asym" / "awq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq" and config["quantization_config"]["version"] == "gemm"
    assert awq["targets"]["cpu"]["metrics"]["kld"] == pytest.approx(cpu(report, "awq-asym", "compressed-tensors")["kld"], rel=0.02)
    carried = cpu(report, "onnx-int4-awq", "onnx")
    assert carried["kld"] < 0.05 and "awq-asym" in entry(report, "onnx-int4-awq", "onnx")["from"]


def test_carried_weights_with_the_head_rounded_to_int8_by_the_builder(more):
    """A `from:` variant rounds the head its calibrated source left float to int8 unless asked to keep it float:
    a smaller graph (and, at Phi-4-mini's vocabulary, 6 GiB to verify instead of 10.6) with the carried layers'
    KLD kept."""
    import onnx

    out, report = more
    graph = onnx.load(str(out / "release" / "onnx-int4-awq" / "onnx" / "model.onnx"), load_external_data=False).graph
    head = [node for node in graph.node if node.op_type == "MatMulNBits" and "lm_head" in node.name]
    assert [attribute.i for node in head for attribute in node.attribute if attribute.name == "bits"] == [8]
    float_head = entry(report, "onnx-int4-awq-float-head", "onnx")
    int8_head = entry(report, "onnx-int4-awq", "onnx")
    assert int8_head["size_bytes"] < float_head["size_bytes"]
    assert int8_head["layer_plan"]["lm_head"] == 8 and float_head["layer_plan"]["lm_head"] == 16
    kld, carried = cpu(report, "onnx-int4-awq", "onnx")["kld"], cpu(report, "onnx-int4-awq-float-head", "onnx")["kld"]
    assert abs(kld - carried) < 0.005  # int8 rounding of the head moves KLD by little


def test_carried_8bit_layers_and_calibrated_head_keep_their_widths_in_onnx(more):
    """`from:` a plan of 4- and 8-bit layers with a GPTQ-calibrated 8-bit head: every layer reaches MatMulNBits
    at its own width with the source's integers (the GPTQ folder's `dynamic` overrides), so the graph's KLD is the
    source's own."""
    import onnx

    out, report = more
    graph = onnx.load(str(out / "release" / "onnx-int4-safe" / "onnx" / "model.onnx"), load_external_data=False).graph
    bits = {node.name: next(a.i for a in node.attribute if a.name == "bits") for node in graph.node if node.op_type == "MatMulNBits"}
    assert bits["/lm_head/MatMulNBits"] == 8 and bits["/model/layers.0/mlp/down_proj/MatMulNBits"] == 8
    assert bits["/model/layers.0/attn/qkv_proj/MatMulNBits"] == 4
    carried = entry(report, "onnx-int4-safe", "onnx")
    assert "matmul_mixed_precision" not in carried["builder_options"]  # the head's integers are the source's
    gather = next(node for node in graph.node if "embed_tokens" in node.name and node.op_type.startswith("Gather"))
    assert gather.op_type == "GatherBlockQuantized"  # the tied table: the head's integers, no float32 copy
    assert not any("embed_tokens.weight" in tensor.name for tensor in graph.initializer)
    source_kld = cpu(report, "gptq-safe", "compressed-tensors")["kld"]
    assert cpu(report, "onnx-int4-safe", "onnx")["kld"] == pytest.approx(source_kld, rel=0.1, abs=5e-4)


def test_layer_plans_reach_the_manifest_and_the_report(more):
    out, report = more
    manifest = json.loads((out / "release" / "gptq-safe" / "compressed-tensors" / "manifest.json").read_text())
    plan = manifest["quantization"]["layer_plan"]
    assert plan["model.layers.0.mlp.down_proj"] == 8 and plan["model.layers.0.mlp.gate_up_proj"] == 4
    config = json.loads((out / "release" / "gptq-safe" / "compressed-tensors" / "config.json").read_text())
    bits = {group["weights"]["num_bits"] for group in config["quantization_config"]["config_groups"].values()}
    assert bits == {4, 8}
    mixed = entry(report, "onnx-int4-mixed", "onnx")
    assert mixed["builder_options"]["matmul_mixed_precision"] == "last_matmul:int8"
    assert "/model/layers.0/mlp/down_proj/MatMul" in mixed["builder_options"]["nodes_to_exclude"]
    markdown = (out / "report.md").read_text()
    assert "- gptq-safe (" in markdown and "down_proj 8 bits" in markdown and "model.layers.0.mlp" not in markdown


def test_int8_dynamic_runs_in_onnxruntime_genai(more):
    _, report = more
    dynamic = entry(report, "onnx-int8-dynamic", "onnx")
    assert dynamic["released"] and dynamic["targets"]["cpu"]["metrics"]["kld"] < 0.02
    assert 8.0 < dynamic["bits_per_weight"] < 9.0


def test_per_layer_sensitivity_ranks_layers_and_gptq_beats_rtn_on_its_worst_layer(report):
    rtn = entry(report, "rtn-w4g128", "compressed-tensors")["sensitivity"]
    gptq = entry(report, "gptq-w4g128", "compressed-tensors")["sensitivity"]
    assert len(rtn) == len(gptq) == 16  # every quantized linear of the 4 blocks
    assert [row["sqnr_db"] for row in rtn] == sorted(row["sqnr_db"] for row in rtn)  # worst first
    assert 15 < rtn[0]["sqnr_db"] < gptq[0]["sqnr_db"] < 40  # about 6 dB a bit at 4 bits
    assert entry(report, "onnx-int4-gptq", "onnx")["sensitivity"] == gptq  # the same integer weights
