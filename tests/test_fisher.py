"""The layer-by-layer Fisher against plain autograd through the whole model in transformers."""

import numpy as np
import pytest
import torch

from compress.model import BUILTIN_MODELS
from compress.quantize.fisher import layer_fisher

TINY = BUILTIN_MODELS["tiny-phi4-mini"]


def _reference(windows, labels):
    """F by autograd through the whole model: per window, d(-sum log p(labels))/dW squared, averaged. The tied
    head is untied first so that its gradient is the head's own, as layer_fisher's is."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    fisher = {}
    for window, label in zip(windows, labels, strict=True):
        model.zero_grad(set_to_none=True)
        logprobs = torch.log_softmax(model(torch.as_tensor(window[None])).logits[0], dim=-1)
        (-logprobs[torch.arange(len(label)), torch.as_tensor(label)].sum()).backward()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                fisher[name] = fisher.get(name, 0) + module.weight.grad.pow(2) / len(windows)
    return fisher


def test_layer_by_layer_fisher_equals_autograd_through_the_whole_model(tmp_path):
    rng = np.random.default_rng(0)
    windows = rng.integers(5, 4000, size=(3, 48))
    seen = {}
    labels = layer_fisher(TINY, windows, lambda name, weight, fisher: seen.update({name: (weight, fisher)}),
                          spill_dir=tmp_path, budget_bytes=1)  # every store spilled to disk
    assert labels.shape == windows.shape and labels.min() >= 0
    assert list(seen)[:2] == ["lm_head", "model.layers.3.self_attn.qkv_proj"] and len(seen) == 17
    reference = _reference(windows, labels)
    for name, (_, fisher) in seen.items():
        expected = reference[name]
        assert fisher.shape == expected.shape
        torch.testing.assert_close(fisher, expected, rtol=2e-3, atol=1e-6 * float(expected.max()))
    assert not list(tmp_path.iterdir())  # every spilled store was deleted


def test_labels_are_sampled_from_the_model_and_reproducible():
    windows = np.random.default_rng(1).integers(5, 4000, size=(2, 32))
    first = layer_fisher(TINY, windows, lambda *_: None, seed=3)
    assert np.array_equal(first, layer_fisher(TINY, windows, lambda *_: None, seed=3))
    assert not np.array_equal(first, layer_fisher(TINY, windows, lambda *_: None, seed=4))


@pytest.mark.parametrize("given", [True])
def test_given_labels_are_used(given):
    windows = np.random.default_rng(2).integers(5, 4000, size=(2, 16))
    labels = np.full(windows.shape, 7)
    assert np.array_equal(layer_fisher(TINY, windows, lambda *_: None, labels=labels), labels)


def test_predicted_kld_of_one_layer_tracks_its_measured_kld():
    """Quantize one layer (RTN, 3 bits, groups of 32) and measure the KLD it causes on the windows the Fisher was
    taken on: the second-order prediction is within a factor 1.5 of it."""
    from transformers import AutoModelForCausalLM

    from compress.quantize.fisher import predicted_kld

    windows = np.random.default_rng(3).integers(5, 4000, size=(8, 64))
    name = "model.layers.1.mlp.down_proj"
    found = {}
    layer_fisher(TINY, windows, lambda layer, weight, fisher: found.update({layer: (weight.clone(), fisher)}) if layer == name else None)
    weight, fisher = found[name]
    groups = weight.reshape(weight.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 3
    quantized = (torch.clamp(torch.round(groups / scale), -4, 3) * scale).reshape(weight.shape)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    with torch.no_grad():
        before = torch.log_softmax(model(torch.as_tensor(windows)).logits, -1)
        model.get_submodule(name).weight.copy_(quantized)
        after = torch.log_softmax(model(torch.as_tensor(windows)).logits, -1)
    measured = float((before.exp() * (before - after)).sum(-1).mean())
    predicted = predicted_kld(fisher, weight, quantized, windows.shape[1])
    assert measured > 1e-4 and 1 / 1.5 < predicted / measured < 1.5, (predicted, measured)


def test_without_head_the_head_is_skipped_and_the_layers_are_the_same():
    windows = np.random.default_rng(4).integers(5, 4000, size=(2, 32))
    with_head, without = {}, {}
    labels = layer_fisher(TINY, windows, lambda name, _w, fisher: with_head.update({name: fisher}))
    layer_fisher(TINY, windows, lambda name, _w, fisher: without.update({name: fisher}), labels=labels, head=False)
    assert "lm_head" in with_head and "lm_head" not in without and len(without) == 16
    assert all(torch.equal(without[name], with_head[name]) for name in without)
