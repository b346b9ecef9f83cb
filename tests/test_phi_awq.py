"""Phi-aware AWQ: every rescaling leaves the float model unchanged; the error formula and the fake quantizer
agree with independent computations; the search never does worse than RTN on its own objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.model import BUILTIN_MODELS
from compress.quantize.awq_search import collect_statistics, phi_awq, replay
from compress.quantize.phi_awq import (
    KINDS,
    NORM_QKV,
    UP_DOWN,
    V_O,
    Mapping,
    Shape,
    apply_scale,
    consumer_columns,
    fake_quantize,
    output_error,
    phi3_mappings,
    search_clip,
)

TINY = BUILTIN_MODELS["tiny-phi4-mini"]


def embedded():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()


def random_gqa_3():
    """A Phi-3 config with another GQA ratio (6 query heads on 2 KV heads), untied head, random weights."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.75,
                        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so dividing them is visible
        for name, parameter in model.named_parameters():
            if "layernorm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


MODELS = {"embedded": embedded, "random-gqa-3": random_gqa_3}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_scale(mapping: Mapping, shape: Shape, generator) -> torch.Tensor:
    channels = int(consumer_columns(mapping, shape).max()) + 1
    return torch.exp(torch.randn(channels, generator=generator) * 0.7)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kinds", [[kind] for kind in KINDS] + [list(KINDS)], ids=[*KINDS, "all"])
def test_rescaling_is_exact(name, kinds):
    model = MODELS[name]()
    shape = Shape.from_config(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    generator = torch.Generator().manual_seed(2)
    changed = 0.0
    for layer in range(model.config.num_hidden_layers):
        for kind in kinds:
            mapping = Mapping(kind, layer)
            weight = model.get_submodule(mapping.consumer).weight.detach().clone()
            apply_scale(model, mapping, random_scale(mapping, shape, generator), shape)
            changed = max(changed, float((model.get_submodule(mapping.consumer).weight.detach() - weight).abs().max()))
    assert changed > 1e-2  # the weights really moved
    assert float((logits(model, ids) - before).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_searched_scales_are_exact_and_replayable(name):
    model = MODELS[name]()
    plan = {name: 4 for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name}
    samples = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 64))
    ids = torch.as_tensor(samples[:2])
    before = logits(model, ids)
    scales, details = phi_awq(model, plan, 32, True, 10, samples, clip=False)
    assert len(details["applied"]) == 4 * model.config.num_hidden_layers and not details["skipped"]
    assert float((logits(model, ids) - before).abs().max()) <= 1e-4
    fresh = MODELS[name]()
    replay(fresh, scales)
    for (key, ours), theirs in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), key


def test_error_formula_matches_explicit_outputs():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=generator)
    x = torch.randn(300, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    scale = torch.exp(torch.randn(64, generator=generator) * 0.5)
    explicit = float(((x @ weight.T - (x / scale) @ fake_quantize(weight * scale, 4, 32, True).T) ** 2).sum())
    assert output_error(weight, x.T @ x, scale, 4, 32, True) == pytest.approx(explicit, rel=1e-3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_llm_compressors_rtn(symmetric):
    """Our fake quantizer, on the original weights, equals compressed-tensors' with llm-compressor's RTN scales."""
    from types import SimpleNamespace

    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as reference

    from compress.quantize.llmc import quantize_rtn

    variant = SimpleNamespace(name="rtn", bits=4, group_size=32, symmetric=symmetric, ignore=["lm_head"],
                              layer_overrides=lambda: [])
    quantized, _tokenizer, _details = quantize_rtn(TINY, variant, None)
    original = embedded()
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.3.mlp.down_proj"):
        module, weight = quantized.get_submodule(name), original.get_submodule(name).weight.detach()
        theirs = reference(weight, module.weight_scale, module.weight_zero_point, module.quantization_scheme.weights)
        assert float((theirs - weight).abs().max()) > 1e-3  # it did round
        assert torch.equal(fake_quantize(weight, 4, 32, symmetric), theirs)


def down_proj_inputs_and_statistics(windows: int):
    """Layer 1 down_proj's inputs over `windows` random windows of 40 tokens, and collect_statistics' of them."""
    model = embedded()
    samples = np.random.default_rng(3).integers(0, model.config.vocab_size, (windows, 40))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    logits(model, torch.as_tensor(samples))
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    return x, collect_statistics(model, samples, ["model.layers.1.mlp.down_proj"])["model.layers.1.mlp.down_proj"]


def test_statistics_match_the_consumer_inputs():
    x, stats = down_proj_inputs_and_statistics(3)
    assert stats.tokens == 120
    gram = x.T @ x  # in bfloat16 products where the CPU has AMX (fast_dtype): within 0.5% of float32's
    assert float((stats.gram - gram).norm() / gram.norm()) < 5e-3
    assert float(((stats.gram.diagonal() - gram.diagonal()) / gram.diagonal()).abs().max()) < 1e-2
    assert torch.allclose(stats.mean_abs, x.abs().mean(0), rtol=1e-5)


def test_statistics_in_float32_are_exact(monkeypatch):
    import compress.quantize.phi_awq as phi_awq

    monkeypatch.setattr(phi_awq, "BFLOAT16_SEARCH", False)
    x, stats = down_proj_inputs_and_statistics(2)
    assert torch.allclose(stats.gram, x.T @ x, rtol=1e-4, atol=1e-3)


def test_mappings_skip_consumers_kept_in_float():
    plan = {f"model.layers.{i}.{part}": 4 for i in range(2)
            for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    plan["model.layers.1.mlp.down_proj"] = 16
    applied, skipped = phi3_mappings(2, plan)
    assert len(applied) == 7 and Mapping(UP_DOWN, 1) not in applied
    assert skipped == ["layers.1 gate_up_proj[up]→down_proj: model.layers.1.mlp.down_proj stays in floating point, nothing to protect"]
    assert {m.kind for m in applied} == {NORM_QKV, V_O, UP_DOWN, "post_attention_layernorm→gate_up_proj"}


def test_gqa_columns_follow_their_kv_head():
    shape = Shape(hidden=96, intermediate=160, heads=6, kv_heads=2, head_dim=16)
    columns = shape.o_columns_to_v()
    assert columns[0] == 0 and columns[3 * 16] == 16 and columns[2 * 16 + 5] == 5 and columns[5 * 16 + 15] == 31
    assert shape.v_rows == slice(8 * 16, 10 * 16)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_an_outlier_lowers_the_groups_output_error(symmetric):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 64, generator=generator) * 0.1
    weight[3, 5] = 2.0  # one outlier stretches its group's range
    x = torch.randn(500, 64, generator=generator)
    gram = x.T @ x
    clipped, ratio = search_clip(weight, gram, 3, 32, symmetric)
    assert ratio < 1
    assert output_error(clipped, gram, torch.ones(64), 3, 32, symmetric) > 0
    before = output_error(weight, gram, torch.ones(64), 3, 32, symmetric)
    # error of the clipped weights' quantization against the original weights
    after = float((((weight - fake_quantize(clipped, 3, 32, symmetric)) @ gram) * (weight - fake_quantize(clipped, 3, 32, symmetric))).sum())
    assert after < before
    frozen, _ = search_clip(weight, gram, 3, 32, symmetric, frozen_rows=slice(0, 8))
    assert torch.equal(frozen[:8], weight[:8])
    scale = torch.exp(torch.randn(64, generator=generator) * 0.5)  # inputs x / s for weight columns x s
    scaled_gram = (x / scale).T @ (x / scale)
    by_blocks, by_blocks_ratio = search_clip(weight * scale, gram, 3, 32, symmetric, input_scale=scale)
    whole, whole_ratio = search_clip(weight * scale, scaled_gram, 3, 32, symmetric)
    assert torch.equal(by_blocks, whole) and by_blocks_ratio == whole_ratio


def test_layer_by_layer_statistics_choose_what_one_pass_chooses(monkeypatch):
    """With a Gram budget of one layer, each chunk sees the already scaled earlier layers; the scaling is
    exact, so the search finds the same errors (near-ties may pick a neighbouring alpha)."""
    import compress.quantize.awq_search as awq_search

    samples = np.random.default_rng(5).integers(0, 4096, (4, 64))
    plan = {name: 4 for name, module in embedded().named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name}
    _, whole = phi_awq(embedded(), plan, 32, True, 10, samples, clip=False)
    monkeypatch.setattr(awq_search, "STATISTICS_BUDGET", 1)
    assert awq_search._layer_chunks(embedded(), [Mapping(kind, layer) for layer in range(4) for kind in KINDS]) == [[0], [1], [2], [3]]
    _, chunked = phi_awq(embedded(), plan, 32, True, 10, samples, clip=False)
    assert [a["mapping"] for a in chunked["applied"]] == [a["mapping"] for a in whole["applied"]]
    for a, b in zip(chunked["applied"], whole["applied"], strict=True):
        assert a["error_vs_rtn"] == pytest.approx(b["error_vs_rtn"], abs=0.01), (a, b)


def test_gram_factor_is_exact_up_to_its_rank():
    from compress.quantize.phi_awq import gram_factor

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(400, 48, generator=generator) * torch.linspace(0.1, 4, 48)
    gram = x.T @ x
    small = gram_factor(gram, 64)  # 48 <= 64: the whole matrix
    assert torch.allclose(small @ small.T, gram, rtol=1e-4, atol=1e-3 * float(gram.abs().max()))
    low = torch.randn(200, 5, generator=generator)  # rank 5 in 200 dimensions: 8 directions hold all of it
    low_gram = low @ low.T
    factor = gram_factor(low_gram, 8)
    assert factor.shape == (200, 8)
    assert torch.allclose(factor @ factor.T, low_gram, atol=1e-4 * float(low_gram.abs().max()))


def test_sketched_error_is_exact_within_its_rank_and_close_beyond(monkeypatch):
    import compress.quantize.phi_awq as phi_awq
    from compress.quantize.phi_awq import Sketch, sketched_errors

    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(40, 96, generator=generator)
    spread = torch.exp(torch.randn(96, generator=generator))  # channels of very different magnitude, as in LLMs
    x = torch.randn(2000, 96, generator=generator) * spread
    gram = x.T @ x
    scales = [torch.ones(96), spread.sqrt(), spread.pow(0.25)]
    exact = [output_error(weight, gram, scale, 3, 32, True) for scale in scales]
    fast = sketched_errors(weight, Sketch.of(gram, 128), scales, 3, 32, True)  # bfloat16 where the CPU has AMX
    assert fast == pytest.approx(exact, rel=3e-3)
    monkeypatch.setattr(phi_awq, "BFLOAT16_SEARCH", False)
    whole = sketched_errors(weight, Sketch.of(gram, 128), scales, 3, 32, True)
    assert whole == pytest.approx(exact, rel=1e-4)
    monkeypatch.setattr(phi_awq, "SEARCH_ELEMENTS", 1)  # one row at a time
    rows_at_a_time = sketched_errors(weight, Sketch.of(gram, 128), scales, 3, 32, True)
    assert rows_at_a_time == pytest.approx(whole, rel=1e-6)
    sketch = Sketch.of(gram, 8)  # 8 of 96 directions, the rest by their diagonal
    assert 0.5 < sketch.kept < 1
    assert sketched_errors(weight, sketch, scales, 3, 32, True) == pytest.approx(exact, rel=0.05)


def test_the_output_error_in_bfloat16_is_within_a_thousandth_of_float32():
    """fast_dtype's bfloat16 (on a CPU with AMX; float32 elsewhere, then equal) on a Gram matrix with a few
    massive channels, as the search's exact check sees it."""
    from compress.quantize.phi_awq import fast_dtype

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1000, 512, generator=generator) * torch.exp(torch.randn(512, generator=generator))
    x[:, :4] *= 30
    gram = x.T @ x
    weight = torch.randn(256, 512, generator=generator) * 0.02
    scale = x.abs().mean(0).pow(0.3)
    precise = output_error(weight, gram, scale, 4, 128, False)
    assert output_error(weight, gram.to(fast_dtype(gram)), scale, 4, 128, False) == pytest.approx(precise, rel=1e-3)


def test_screening_keeps_the_best_candidates_and_scores_them_on_every_row(monkeypatch):
    """A weight in 64 pieces of 2 rows: every candidate is tried on 16 of them, and the 2 best are scored on
    all 64 exactly as the whole grid scores them; the grid's best is among them."""
    import compress.quantize.phi_awq as phi_awq
    from compress.quantize.phi_awq import Sketch, screened_errors, sketched_errors

    monkeypatch.setattr(phi_awq, "BFLOAT16_SEARCH", False)
    monkeypatch.setattr(phi_awq, "SEARCH_ELEMENTS", 2 * 96)
    monkeypatch.setattr(phi_awq, "FINALISTS", 2)
    generator = torch.Generator().manual_seed(9)
    spread = torch.exp(torch.randn(96, generator=generator))
    x = torch.randn(2000, 96, generator=generator) * spread
    weight = torch.randn(128, 96, generator=generator) * torch.exp(0.5 * torch.randn(96, generator=generator))
    sketch = Sketch.of(x.T @ x)
    candidates = [spread.pow(alpha / 10) for alpha in range(10)]
    grid = sketched_errors(weight, sketch, candidates, 3, 32, True)
    found = screened_errors(weight, sketch, candidates, 3, 32, True)
    assert len(found) == 2
    assert min(range(10), key=grid.__getitem__) in found
    assert [found[i] for i in found] == pytest.approx([grid[i] for i in found], rel=1e-6)


def test_the_sketched_search_chooses_what_the_exhaustive_search_chooses(monkeypatch):
    """On each mapping of one embedded-model layer (its own statistics), the default sketch finds the output
    error the exhaustive search finds; a sketch of 2 directions (fewer, as a share of the inputs, than Phi-4's
    down_proj gets) costs at most 3% (measured over all 16 mappings: 1.003 on average, 1.017 at most)."""
    import compress.quantize.phi_awq as phi_awq

    model = embedded()
    shape = Shape.from_config(model.config)
    plan = {name: 4 for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name}
    mappings = [mapping for mapping in phi3_mappings(4, plan)[0] if mapping.layer == 1]
    samples = np.random.default_rng(8).integers(0, 4096, (8, 128))
    stats = collect_statistics(model, samples, [mapping.consumer for mapping in mappings])
    ranks = (10**6, phi_awq.SEARCH_RANK, 2)
    for mapping in mappings:
        weight = model.get_submodule(mapping.consumer).weight.detach().float()
        found = {}
        for rank in ranks:
            monkeypatch.setattr(phi_awq, "SEARCH_RANK", rank)
            found[rank] = phi_awq.search_scale(weight, stats[mapping.consumer], consumer_columns(mapping, shape), 4, 128, False, 20)
        exhaustive, default, two = (found[rank][1] for rank in ranks)
        assert default["error"] <= 1.002 * exhaustive["error"], mapping.label
        assert two["error"] <= 1.03 * exhaustive["error"], mapping.label
        assert two["error"] <= two["rtn_error"]
