"""The layer-by-layer second-order KLD (compress.quantize.fisher) against plain autograd through the whole model
in transformers, and against the KLD a changed layer really causes."""

import numpy as np
import pytest
import torch

from compress.model import BUILTIN_MODELS
from compress.quantize.fisher import quadratic_klds

TINY = BUILTIN_MODELS["tiny-phi4-mini"]


def _model():
    """The embedded model with its tied head untied, so that changing one changes only it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _changes(model, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Two random weight changes per linear layer and for the embedding, a few percent of its weights' spread,
    float16."""
    generator = torch.Generator().manual_seed(seed)
    modules = {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}
    return {name: {size: (torch.randn(module.weight.shape, generator=generator) * module.weight.std() * size_scale).half()
                   for size, size_scale in (("small", 0.02), ("large", 0.1))}
            for name, module in modules.items()}


def _reference(model, windows, labels, changes):
    """½ mean over tokens of (g_tᵀ·dW·x_t)², g and x hooked in a plain forward and backward of each window with
    `labels`; the head's exact ½(Σp·dz² − (Σp·dz)²) from the logits."""
    seen, sums = {}, {}

    def hook(name):
        def record(_module, inputs, output):
            seen[name] = [inputs[0].detach()[0]]
            output.register_hook(lambda grad: seen[name].append(grad.detach()[0]))
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name))
    for window, label in zip(windows, labels, strict=True):
        model.zero_grad(set_to_none=True)
        embedded = model.model.embed_tokens(torch.as_tensor(window[None])).detach().requires_grad_(True)
        seen["model.embed_tokens"] = [torch.nn.functional.one_hot(torch.as_tensor(window), model.config.vocab_size).float()]
        embedded.register_hook(lambda grad: seen["model.embed_tokens"].append(grad.detach()[0]))
        logits = model(inputs_embeds=embedded).logits[0]
        logprobs = torch.log_softmax(logits, -1)
        (-logprobs[torch.arange(len(label)), torch.as_tensor(label)].sum()).backward()
        probabilities = logprobs.detach().exp()
        for name, by_size in changes.items():
            x, g = seen[name]
            for size, delta in by_size.items():
                change = x @ (delta.float() if name == "model.embed_tokens" else delta.float().T)  # embedding: onehot @ E
                if name == "lm_head":
                    term = (probabilities * change ** 2).sum(-1) - (probabilities * change).sum(-1) ** 2
                else:
                    term = ((change * g).sum(-1)) ** 2
                sums.setdefault(name, {}).setdefault(size, 0.0)
                sums[name][size] += float(term.sum())
    return {name: {size: 0.5 * total / windows.size for size, total in by_size.items()} for name, by_size in sums.items()}


def test_layer_by_layer_second_order_kld_equals_autograd_through_the_whole_model(tmp_path):
    rng = np.random.default_rng(0)
    windows = rng.integers(5, 4000, size=(3, 48))
    model = _model()
    changes = _changes(model, 0)
    asked = []

    def deltas(name, weight, rows):
        asked.append(name)
        chosen = {size: change if rows is None else change[torch.as_tensor(rows)] for size, change in changes[name].items()}
        assert weight.shape == chosen["small"].shape
        return chosen

    found, labels = quadratic_klds(TINY, windows, deltas, spill_dir=tmp_path, budget_bytes=1, embedding=True)  # every store spilled
    assert labels.shape == windows.shape and labels.min() >= 0
    assert asked[:2] == ["lm_head", "model.layers.3.self_attn.qkv_proj"] and asked[-1] == "model.embed_tokens" and len(asked) == 18
    reference = _reference(model, windows, labels, changes)
    for name, by_size in reference.items():
        for size, expected in by_size.items():
            assert found[name][size] == pytest.approx(expected, rel=2e-3), (name, size)
        assert found[name]["large"] > 10 * found[name]["small"]  # quadratic: 25x the change's square
    assert not list(tmp_path.iterdir())  # every spilled store was deleted


def test_labels_are_sampled_from_the_model_and_reproducible():
    windows = np.random.default_rng(1).integers(5, 4000, size=(2, 32))

    def none(*_):
        return {}

    first = quadratic_klds(TINY, windows, none, seed=3)[1]
    assert np.array_equal(first, quadratic_klds(TINY, windows, none, seed=3)[1])
    assert not np.array_equal(first, quadratic_klds(TINY, windows, none, seed=4)[1])
    labels = np.full(windows.shape, 7)
    assert np.array_equal(quadratic_klds(TINY, windows, none, labels=labels)[1], labels)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj", "lm_head"])
def test_predicted_kld_of_one_layer_tracks_its_measured_kld(name):
    """Quantize one layer (RTN, 3 bits, groups of 32) and measure the KLD it causes on the windows the
    prediction was taken on: within 15% of it (the head's term is exact to second order: within 3%)."""
    windows = np.random.default_rng(3).integers(5, 4000, size=(8, 64))
    model = _model()
    weight = model.get_submodule(name).weight.detach()
    groups = weight.reshape(weight.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 3
    quantized = (torch.clamp(torch.round(groups / scale), -4, 3) * scale).reshape(weight.shape)

    def deltas(layer, stored, _rows):
        return {"3-bit": (quantized - stored.float()).half()} if layer == name else {}

    predicted = quadratic_klds(TINY, windows, deltas)[0][name]["3-bit"]
    with torch.no_grad():
        before = torch.log_softmax(model(torch.as_tensor(windows)).logits, -1)
        model.get_submodule(name).weight.copy_(quantized)
        after = torch.log_softmax(model(torch.as_tensor(windows)).logits, -1)
    measured = float((before.exp() * (before - after)).sum(-1).mean())
    assert measured > 1e-4 and abs(predicted / measured - 1) < (0.03 if name == "lm_head" else 0.15), (predicted, measured)


def test_without_head_the_head_is_skipped_and_the_layers_are_the_same():
    windows = np.random.default_rng(4).integers(5, 4000, size=(2, 32))
    changes = _changes(_model(), 1)

    def deltas(name, _weight, _rows):
        return changes[name]

    with_head, labels = quadratic_klds(TINY, windows, deltas)
    without, _ = quadratic_klds(TINY, windows, deltas, labels=labels, head=False)
    assert "lm_head" in with_head and "lm_head" not in without and len(without) == 16
    assert all(without[name] == with_head[name] for name in without)
