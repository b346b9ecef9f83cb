"""The pure parts of benchmarks/: bytes per token, fits, targets, the Markdown table. No benchmark runs here."""

import sys
from pathlib import Path

# benchmarks/ sits beside compress/ and is not installed: make it importable under a bare `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks.maths import (  # noqa: E402
    TokenBytes,
    bandwidth_use,
    checkpoint_token_bytes,
    dequantized_linear_bytes,
    extrapolate,
    gptq_work,
    kv_cache_bytes,
    linear_fit,
    max_residual,
    mean_decode_context,
    onnx_token_bytes,
    predicted_seconds,
    target,
)
from benchmarks.run import _plan, parse  # noqa: E402
from benchmarks.table import render, targets  # noqa: E402

HIDDEN, VOCAB, INTERMEDIATE = 64, 1000, 128


def float_checkpoint(tied: bool) -> dict:
    """One layer of fp32 tensors, {name: (numel, nbytes)}, as compress.verify.size.read_tensors lists them."""
    shapes = {
        "model.embed_tokens.weight": VOCAB * HIDDEN,
        "model.layers.0.self_attn.qkv_proj.weight": 3 * HIDDEN * HIDDEN,
        "model.layers.0.self_attn.o_proj.weight": HIDDEN * HIDDEN,
        "model.layers.0.mlp.gate_up_proj.weight": 2 * INTERMEDIATE * HIDDEN,
        "model.layers.0.mlp.down_proj.weight": INTERMEDIATE * HIDDEN,
        "model.layers.0.input_layernorm.weight": HIDDEN,
        "model.norm.weight": HIDDEN,
    }
    if not tied:
        shapes["lm_head.weight"] = VOCAB * HIDDEN
    return {name: (numel, 4 * numel) for name, numel in shapes.items()}


LAYER_WEIGHTS = 4 * HIDDEN * HIDDEN + 3 * INTERMEDIATE * HIDDEN


def test_tied_float_checkpoint_reads_its_embedding_table_as_the_head_and_one_row():
    linear, head, row = checkpoint_token_bytes(float_checkpoint(tied=True), VOCAB, tied=True)
    assert linear == 4 * LAYER_WEIGHTS  # norms are not linear layers
    assert head == 4 * VOCAB * HIDDEN
    assert row == 4 * HIDDEN


def test_compressed_tensors_layers_count_packed_weights_scales_and_shape():
    tensors = {
        "model.embed_tokens.weight": (VOCAB * HIDDEN, 4 * VOCAB * HIDDEN),
        "lm_head.weight": (VOCAB * HIDDEN, 4 * VOCAB * HIDDEN),
        "model.layers.0.mlp.down_proj.weight_packed": (HIDDEN * INTERMEDIATE // 8, HIDDEN * INTERMEDIATE // 2),
        "model.layers.0.mlp.down_proj.weight_scale": (HIDDEN * INTERMEDIATE // 32, HIDDEN * INTERMEDIATE // 16),
        "model.layers.0.mlp.down_proj.weight_shape": np.array([HIDDEN, INTERMEDIATE], dtype=np.int64),
    }
    linear, head, row = checkpoint_token_bytes(tensors, VOCAB, tied=False)
    assert linear == HIDDEN * INTERMEDIATE // 2 + HIDDEN * INTERMEDIATE // 16 + 16  # 4.5 bits/weight + the shape
    assert head == 4 * VOCAB * HIDDEN and row == 4 * HIDDEN
    assert dequantized_linear_bytes(tensors, 4) == 4 * HIDDEN * INTERMEDIATE


def int4_graph() -> tuple[dict, list]:
    """A builder-style int4 graph: one MatMulNBits layer, an int4 head, the embedding gathered from the head."""
    initializers = {
        "qkv.weight_Q4": (HIDDEN * 3 * HIDDEN // 2, HIDDEN * 3 * HIDDEN // 2),
        "qkv.weight_scales": (HIDDEN * 3 * HIDDEN // 32, 4 * HIDDEN * 3 * HIDDEN // 32),
        "lm_head.weight_Q4": (HIDDEN * VOCAB // 2, HIDDEN * VOCAB // 2),
        "lm_head.weight_scales": (HIDDEN * VOCAB // 32, 4 * HIDDEN * VOCAB // 32),
        "norm.weight": (HIDDEN, 4 * HIDDEN),
    }
    nodes = [
        ("GatherBlockQuantized", ["/embed/Reshape/output_0", "input_ids", "lm_head.weight_scales"], {"bits": 4}),
        ("Gather", ["/mask/Shape/output_0", "/constants/1"], {}),
        ("MatMulNBits", ["x", "qkv.weight_Q4", "qkv.weight_scales"], {"K": HIDDEN, "N": 3 * HIDDEN}),
        ("SimplifiedLayerNormalization", ["y", "norm.weight"], {}),
        ("MatMulNBits", ["z", "lm_head.weight_Q4", "lm_head.weight_scales"], {"K": HIDDEN, "N": VOCAB}),
    ]
    return initializers, nodes


def test_int4_graph_bytes_with_an_embedding_shared_with_the_head():
    linear, head, row = onnx_token_bytes(*int4_graph(), VOCAB, HIDDEN)
    assert linear == 3 * HIDDEN * HIDDEN * 5 // 8  # 4 bits + an fp32 scale per 32 weights = 5 bits
    assert head == VOCAB * HIDDEN * 5 // 8
    assert row == HIDDEN * 5 // 8  # one row of the shared table, its scales counted once


def test_fp32_graph_finds_the_head_by_its_shape_and_a_gather_table_of_its_own():
    initializers = {"layer.weight": (HIDDEN * HIDDEN, 4 * HIDDEN * HIDDEN), "lm_head.weight": (HIDDEN * VOCAB, 4 * HIDDEN * VOCAB),
                    "embed.weight": (VOCAB * HIDDEN, 4 * VOCAB * HIDDEN)}
    nodes = [("Gather", ["embed.weight", "input_ids"], {}), ("MatMul", ["x", "layer.weight"], {}),
             ("MatMul", ["y", "lm_head.weight"], {})]
    assert onnx_token_bytes(initializers, nodes, VOCAB, HIDDEN) == (4 * HIDDEN * HIDDEN, 4 * HIDDEN * VOCAB, 4 * HIDDEN)


def test_kv_cache_and_decode_context_by_hand():
    # 2 layers × K and V × 8 heads × 128 dims × 160 positions × 4 bytes
    assert kv_cache_bytes(2, 8, 128, 160, 4) == 2 * 2 * 8 * 128 * 160 * 4
    assert mean_decode_context(128, 64) == 160  # steps see 129..191 positions: mean 160
    assert TokenBytes(10, 20, 1, 5).total == 36


def test_bandwidth_use_by_hand():
    use = bandwidth_use(bytes_per_token=10**9, decode_tps=10.0, bound_bytes_per_s=20e9)
    assert use == pytest.approx({"achieved_gb_per_s": 10.0, "share_of_bound": 0.5, "bound_tps": 20.0})


def test_linear_fit_recovers_a_line_and_extrapolates():
    fit = linear_fit([1, 2, 4], [3 + 2 * x for x in (1, 2, 4)])
    assert fit == pytest.approx((3.0, 2.0))
    assert extrapolate(fit, 40) == pytest.approx(83.0)
    assert max_residual(fit, [1, 2, 4], [5, 7, 11]) == pytest.approx(0.0, abs=1e-12)


def test_linear_fit_is_least_squares_and_refuses_one_point():
    intercept, slope = linear_fit([1, 2, 3], [1, 3, 2])
    assert (intercept, slope) == pytest.approx((1.0, 0.5))
    assert max_residual((intercept, slope), [1, 2, 3], [1, 3, 2]) == pytest.approx(0.5 / 1)
    with pytest.raises(ValueError):
        linear_fit([2, 2], [1, 2])


def test_gptq_work_and_predicted_time():
    square = {"hidden_size": 4, "intermediate_size": 4, "num_attention_heads": 1, "num_key_value_heads": 1}
    # (out, in): qkv (12, 4), o (4, 4), gate_up (8, 4), down (4, 4) -> out·in² + in³ each
    assert gptq_work(square) == (12 + 4 + 8 + 4) * 16 + 4 * 64
    assert predicted_seconds(4, [(1, 30.0), (2, 50.0)]) == 100.0  # from the deepest slice, by depth
    assert predicted_seconds(1, [(2, 50.0)], scale=8.0) == 200.0
    assert predicted_seconds(1, []) is None


def test_targets_are_met_missed_or_not_measured():
    assert target("t", 3.2, 3.0, at_least=True)["met"] is True
    assert target("t", 1.2, 1.15, at_least=False)["met"] is False
    assert target("t", None, 1.3, at_least=False)["met"] is None


def results_by_hand() -> dict:
    env = {"host": "box", "cpu": "Test CPU", "cores": 2, "threads": 2, "memory_gib": 24.0, "python": "3.11",
           "load_average_at_start": [0.1, 0.1, 0.1], "versions": {"torch": "2.13.0"}}
    artifact = {"runtime": "onnxruntime-genai", "size_bytes": 5 * 10**8, "prefill_128": {"tps": 70.0, "min": 60.0, "max": 75.0},
                "prefill_512": {"tps": 69.0, "min": 68.0, "max": 70.0}, "decode": {"tps": 16.0, "min": 15.0, "max": 17.0},
                "decode_speedup": 4.0, "peak_rss_mb": 900.0}
    baseline = {**artifact, "runtime": "transformers", "decode": {"tps": 4.0, "min": 3.9, "max": 4.1}, "decode_speedup": 1.0}
    results = {
        "meta": {"date": "2026-01-01", "environment": env, "seconds": 100.0, "command": "python -m benchmarks.run"},
        "decode": {"model": {"layers": 2, "parameters": 8e8, "vocab_size": 200064},
                   "settings": {"prompt_lengths": [128, 512], "new_tokens": 64, "runs": 5},
                   "artifacts": {"fp32 PyTorch": baseline, "ONNX int4": artifact}},
        "overhead": {"verification": {"windows": 4, "seq_len": 256, "artifact": "onnx-int4-2L", "raw_forward_seconds": 10.0,
                                      "worker_evaluate_seconds": 14.0, "ratio": 1.4}},
        "errors": {"scaling": "ProbeError: out of time"},
    }
    results["targets"] = targets(results)
    return results


def test_targets_read_from_results():
    found = {item["name"]: item["met"] for item in results_by_hand()["targets"]}
    assert found["ONNX int4 decode ÷ fp32 PyTorch decode"] is True
    assert found["verification pass ÷ raw onnxruntime-genai forward (time)"] is False
    assert found["ONNX int4 achieved bandwidth ÷ measured bound"] is None


def test_table_renders_rows_verdicts_and_errors():
    text = render(results_by_hand())
    assert "| ONNX int4 | onnxruntime-genai | 0.50 GB | 70.0 (60.0–75.0) | 69.0 (68.0–70.0) | 16.00 (15.00–17.00) | 4.00× | 900 MiB |" in text
    assert "| met |" in text and "**missed**" in text and "not measured" in text
    assert "**scaling failed**: ProbeError: out of time" in text
    assert "Test CPU, 2 cores, 2 threads" in text


def test_options_parse_and_refuse_mistakes():
    assert _plan(["phi4:1,2", "phi4-mini:1,2,4"]) == {"phi4": [1, 2], "phi4-mini": [1, 2, 4]}
    assert parse(["--only", "decode,bandwidth"]).only == ["decode", "bandwidth"]
    with pytest.raises(SystemExit):
        parse(["--only", "speed"])
    with pytest.raises(SystemExit):
        parse(["--runs", "3"])


def test_preflight_quantize_estimate_agrees_with_the_measured_scaling():
    """compress.model.estimate_memory against benchmarks/results/2026-11-26-vm-scaling-phi4-1-2-4: GPTQ on
    Phi-4-width bf16 slices (8×128 tokens) peaked at 6,528 / 7,213 / 8,530 MiB for 1 / 2 / 4 layers, 666 MiB
    per layer, 31.8 GiB extrapolated to Phi-4's 40 layers. The estimate stays above each, by at most 25%."""
    from compress.model import ModelInfo, estimate_memory

    config = {"hidden_size": 5120, "intermediate_size": 17920, "vocab_size": 100352, "num_attention_heads": 40,
              "num_key_value_heads": 10}
    per_layer = 5120 * ((40 + 2 * 10) * 128 + 5120 + 3 * 17920) + 2 * 5120  # qkv (GQA), o, gate_up, down, norms
    fixed = 2 * 100352 * 5120 + 5120  # embedding, untied head, final norm
    for layers, measured_mib in [(1, 6528), (2, 7213), (4, 8530), (40, 32519)]:
        parameters = fixed + layers * per_layer
        info = ModelInfo("phi4-slice", Path("."), {**config, "num_hidden_layers": layers}, parameters, 2 * parameters, "bf16")
        ratio = estimate_memory(info, 8, 128, 256).quantize / 2**20 / measured_mib
        assert 1.0 < ratio < 1.25, (layers, ratio)


def test_fullsize_attributes_memory_to_stages_and_reads_stage_times():
    from benchmarks.fullsize import STAGES, _stage_of, _stage_seconds, markdown

    assert _stage_of([]) == STAGES[0]
    assert _stage_of([["python", "-m", "onnxruntime_genai.models.builder", "-i", "x"]]) == STAGES[2]
    assert _stage_of([["python", "-m", "compress.verify.worker", "/run/baseline/cpu.job.json"]]) == STAGES[1]
    assert _stage_of([["python", "-m", "compress.verify.worker", "/run/work/gptq/onnx/cpu.job.json"]]) == STAGES[3]
    output = "✓ 2. Data  4×256 evaluation tokens  (7.0 s)\n✓ 4. Quantize, export, verify  2 artifact(s)  (834.7 s)\n"
    assert _stage_seconds(output) == {"Data": 7.0, "Quantize, export, verify": 834.7}
    row = {"layers": 1, "stored_bytes": 2**30, "seconds": 10.0, "peak_tree_rss_mb": 2048, "others_cpu": 0.0,
           "peak_by_stage_mb": dict.fromkeys(STAGES, 1024), "calibration": {"gptq": {"layers_seconds": [5.0]}}}
    text = "\n".join(markdown({"budget_gib": 16, "depth": {"rows": [row, {"layers": 8, "skipped": "time budget"}], "fits": {}}}))
    assert "| 1 | 1.00 | 2.00 | 1.00 | 1.00 | 1.00 | 1.00 | 10 | 5 | 0.00 |" in text and "skipped: time budget" in text


def test_fullsize_sets_each_stage_estimate_beside_the_peak_measured_for_it(tmp_path):
    from benchmarks.fullsize import STAGES, estimates_vs_measured

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""
name: pairs
model: builtin:tiny-phi4-mini
calibration: {dataset: builtin:pydoc-calib, samples: 8, seq_len: 128, seed: 0}
evaluation: {dataset: builtin:pydoc-eval, seq_len: 128, windows: 4}
targets: {cpu: {required: true}}
variants:
  - {name: gptq, method: gptq, bits: 4, group_size: 128, formats: [compressed-tensors, gptq]}
  - {name: onnx, method: onnx-int4, from: gptq, group_size: 128}
""")
    measured = {"peak_by_stage_mb": {STAGES[0]: 3072, STAGES[1]: 2500, STAGES[2]: 5120, STAGES[3]: 4000},
                "main_process_at_stage_peak_mb": {STAGES[1]: 500, STAGES[2]: 1024}, "baseline_layerwise_rss_mb": 2048,
                "report": [{"name": "onnx", "format": "onnx", "peak_rss_mb": 1536}, {"name": "gptq", "format": "gptq", "peak_rss_mb": 1024},
                           {"name": "gptq", "format": "compressed-tensors", "peak_rss_mb": 2560}]}
    rows = {row["stage"]: row["measured_gib"] for row in estimates_vs_measured(measured, recipe, "builtin:tiny-phi4-mini", 12)}
    # the builder's and the baseline's peaks less the main process beside them; each worker by its artifact
    assert rows == {"baseline accuracy (layer by layer)": 2.0, "baseline speed and generations (whole model in transformers)": 1.95,
                    "calibration, gptq (layer by layer)": 3.0, "compressed-tensors checks (whole model in transformers)": 2.5,
                    "ONNX build, onnx-int4": 4.0, "onnx in onnxruntime-genai": 1.5, "gptq (gptq) in onnxruntime-genai": 1.0}


def test_awq_benchmark_pairs_each_size_and_reports_the_ratio():
    from benchmarks.awq import markdown, ratios, recipe_variants

    variants = recipe_variants()
    assert variants["awq"]["n_grid"] == 20 and variants["gptq"]["method"] == "gptq" and "formats" not in variants["gptq"]
    rows = [{"width": "phi4-mini", "tokens": "8x128", "method": "gptq", "layer_seconds": 30.0, "search_seconds": None,
             "peak_rss_mb": 2000.0, "others_cpu": 0.01, "estimate_s": 27.0},
            {"width": "phi4-mini", "tokens": "8x128", "method": "awq", "layer_seconds": 12.0, "search_seconds": 9.5,
             "peak_rss_mb": 2100.0, "others_cpu": 0.05, "estimate_s": 15.0, "estimate_method_s": 9.5},
            {"width": "phi4", "tokens": "8x128", "method": "gptq", "layer_seconds": 100.0, "search_seconds": None,
             "peak_rss_mb": 6000.0, "others_cpu": 0.0}]  # its awq run missing: no ratio
    found = ratios(rows)
    assert found == [{"width": "phi4-mini", "tokens": "8x128", "awq_s": 12.0, "gptq_s": 30.0, "ratio": 0.4, "awq_search_s": 9.5,
                      "awq_peak_mib": 2100.0, "gptq_peak_mib": 2000.0, "others_cpu": 0.05,
                      "estimates": {"awq_s": 15.0, "awq_search_s": 9.5, "gptq_s": 27.0}}]
    table = markdown({"ratios": found, "machine_rate": 4e11})
    assert "| phi4-mini | 8x128 | 12.0 | 9.5 | 30.0 | 0.40 | 2100 | 2000 | 0.05 |" in table
    assert "| phi4-mini | 8x128 | 15.0 (1.25) | 9.5 (1.00) | 27.0 (0.90) |" in table
    met = {item["name"]: item["met"] for item in targets({"awq": {"ratios": found}})}
    assert met["AWQ ÷ GPTQ seconds per layer, phi4-mini width, 8x128 tokens"] is True
    assert parse(["--only", "awq", "--awq-sizes", "8x128"]).awq_sizes == "8x128"


def test_llama_cpp_table_gives_each_runtime_its_ratios():
    from benchmarks.llama_cpp import markdown

    def row(runtime, decode, prefill, size):
        return {"runtime": runtime, "size_bytes": size,
                **{f"prompt_{n}": {"decode_tps": decode, "prefill_tps": prefill * n / 128, "others_cpu": 0.01} for n in (128, 512)}}

    artifacts = {"fp32 PyTorch": row("transformers", 5.0, 100.0, 4e9), "ONNX int4": row("onnxruntime-genai", 20.0, 200.0, 1e9),
                 "GGUF Q4_0 pure": row("llama.cpp", 23.0, 300.0, 0.9e9)}
    for entry in artifacts.values():
        entry["decode_vs_baseline"] = entry["prompt_128"]["decode_tps"] / 5.0
        entry["decode_vs_onnx_int4"] = entry["prompt_128"]["decode_tps"] / 20.0
        for n in (128, 512):
            entry[f"prefill_{n}_vs_onnx_int4"] = entry[f"prompt_{n}"]["prefill_tps"] / artifacts["ONNX int4"][f"prompt_{n}"]["prefill_tps"]
    text = "\n".join(markdown({"layers": 2, "threads": 2, "runs": 5, "new_tokens": 64, "prompts": [128, 512],
                               "omp_wait_policy": "unset", "artifacts": artifacts}))
    assert "| GGUF Q4_0 pure | llama.cpp | 900 | 23.00 | 4.60 | 1.15 | 300.0 | 1.50 | 1200.0 | 1.50 | 0.01 |" in text
    assert "OMP_WAIT_POLICY unset" in text
