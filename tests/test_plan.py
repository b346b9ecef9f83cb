"""Per-layer plans and how they reach llm-compressor and the ONNX builder. Pure: no model is loaded."""

import pytest

from compress.export.onnx_genai import builder_node_names, builder_options, phi3_linear_names
from compress.quantize.llmc import plan_groups
from compress.quantize.plan import plan_runs, plan_summary, resolve_plan
from compress.recipe import Override, Variant

CONFIG = {"num_hidden_layers": 2}
LAYERS = phi3_linear_names(CONFIG)


def test_phi3_layer_names_cover_every_linear():
    assert LAYERS[:4] == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                          "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    assert len(LAYERS) == 9 and LAYERS[-1] == "lm_head"


def test_first_matching_override_wins_and_ignore_keeps_float():
    overrides = [Override(match=r"layers\.0\.mlp", bits="skip"), Override(match=r"mlp\.", bits=8)]
    plan = resolve_plan(LAYERS, 4, ["lm_head"], overrides)
    assert plan["model.layers.0.mlp.down_proj"] == 16  # first rule
    assert plan["model.layers.1.mlp.down_proj"] == 8  # second rule
    assert plan["model.layers.1.self_attn.qkv_proj"] == 4
    assert plan["lm_head"] == 16
    assert plan_summary(plan) == {"4": 4, "8": 2, "16": 3}


def test_phi4_safe_preset_keeps_down_proj_at_8_bits():
    variant = Variant(name="v", method="gptq", preset="phi4-safe")
    plan = resolve_plan(LAYERS, 4, [], variant.layer_overrides())
    assert {layer: bits for layer, bits in plan.items() if bits != 4} == {
        "model.layers.0.mlp.down_proj": 8, "model.layers.1.mlp.down_proj": 8, "lm_head": 8}


def test_plan_becomes_one_config_group_per_bit_width():
    plan = {"a.q": 4, "a.down": 8, "lm_head": 16}
    groups, ignore = plan_groups(plan, 128, True)
    assert ignore == ["lm_head"]
    assert groups["group_4bit"]["targets"] == [r"re:^a\.q$"] and groups["group_4bit"]["weights"]["num_bits"] == 4
    assert groups["group_8bit"]["targets"] == [r"re:^a\.down$"]


def test_builder_options_follow_the_plan():
    variant = Variant(name="v", method="onnx-int4", group_size=32, symmetric=False, accuracy_level=4, algorithm="k_quant")
    plan = resolve_plan(LAYERS, 4, [], [Override(match="lm_head", bits=8), Override(match=r"layers\.1\.mlp\.down", bits=16)])
    options = builder_options(variant, plan)
    assert options["block_size"] == "32" and options["is_symmetric"] == "false" and options["algo_config"] == "k_quant"
    assert options["accuracy_level"] == "4"
    assert options["matmul_mixed_precision"] == "last_matmul:int8"
    assert options["nodes_to_exclude"] == "/model/layers.1/mlp/down_proj/MatMul"
    assert builder_options(variant, plan, exact=True)["accuracy_level"] == "1"
    default = Variant(name="d", method="onnx-int4", group_size=32)
    assert builder_options(default, plan)["algo_config"] == "rtn"  # builder bug: default + int8 head
    assert builder_options(default, {**plan, "lm_head": 4})["algo_config"] == "default"
    float_head = builder_options(variant, {**plan, "lm_head": 16})["nodes_to_exclude"].split(",")
    assert float_head[-2:] == ["/lm_head/MatMul", "/model/embed_tokens/Gather"]  # a tied table stays float too


def test_builder_node_names_for_fused_layers():
    assert "/model/layers.3/mlp/up_proj/MatMul" in builder_node_names("model.layers.3.mlp.gate_up_proj")
    assert builder_node_names("lm_head") == ["/lm_head/MatMul"]
    with pytest.raises(ValueError, match="no ONNX node"):
        builder_node_names("model.layers.0.mlp.experts")


def test_plans_are_written_as_runs_of_layers_not_layer_by_layer():
    phi4 = phi3_linear_names({"num_hidden_layers": 40})
    plan = resolve_plan(phi4, 4, ["lm_head"], [Override(match="down_proj", bits=8)])
    assert plan_runs(plan) == ["layers 0–39: qkv_proj, o_proj, gate_up_proj 4 bits; down_proj 8 bits", "lm_head kept"]
    # a layer that differs splits the run; a single layer is named alone
    plan = resolve_plan(phi4, 4, [], [Override(match=r"layers\.7\.", bits=8)])
    assert plan_runs(plan) == ["layers 0–6: qkv_proj, o_proj, gate_up_proj, down_proj 4 bits",
                               "layer 7: qkv_proj, o_proj, gate_up_proj, down_proj 8 bits",
                               "layers 8–39: qkv_proj, o_proj, gate_up_proj, down_proj 4 bits", "lm_head 4 bits"]
