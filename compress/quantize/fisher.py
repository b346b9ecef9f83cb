"""Each linear layer's KLD under a weight change, to second order, one decoder layer at a time (issue 14).

For a window, labels y sampled from the model's own next-token distribution and a linear layer with inputs
x_t and g_t = d(-log p(y))/d(output_t) at each position t, a weight change dW changes the window's
log-likelihood by s_t = g_tᵀ·dW·x_t at t, and the KLD from the original grows by about ½·E[s_t²] per token
(the Fisher's quadratic form, taken token by token). Unlike the diagonal Fisher (½ Σ F·dW²) this keeps how the
change lines up with the inputs: GPTQ shapes dW·x to be small, which the diagonal over-predicted 3.5-5×
(measured for this project on the embedded model under GPTQ: token by token within 7-14% of the measured KLD).
The head's term needs no sampled labels: with p the next-token distribution and dz = dW·x_t the change of the
logits, ½·(Σ p·dz² − (Σ p·dz)²) exactly (measured: the head's KLD to three digits). The embedding's (where a
format can quantize it): ½·E[(g_tᵀ·dE[token_t])²], g_t the gradient at the first layer's input; only the rows of
the tokens the windows hold are asked for.

Memory follows compress/layerwise.py: a forward pass keeps each decoder layer's inputs (spilled to disk beyond
the budget), then a backward pass runs from the head down, one decoder layer in float32 at a time, through
every window before moving on; a layer's weight changes (`deltas`, float16) are asked for when it is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from compress.activations import allocate
from compress.layerwise import HEAD_ROWS, LayerwiseModel
from compress.model import PHI3_LINEARS

LINEARS = PHI3_LINEARS["attention"] + PHI3_LINEARS["mlp"]
# deltas(name, its weight as stored or in float32, the rows of it given or None for all) -> {candidate: those
# rows of its weight minus the original's, float16 [rows, in]}
Deltas = Callable[[str, torch.Tensor, np.ndarray | None], dict[str, torch.Tensor]]


def _head_step(model: LayerwiseModel, hidden: torch.Tensor, labels: np.ndarray | None,
               generator: torch.Generator) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """One window [seq_len, hidden]: sample labels where none are given and return d(-log p(labels))/d(hidden),
    the labels and each position's log-sum-exp of the logits (for _head_terms)."""
    head = model.head_weight()
    hidden = hidden.detach().requires_grad_(True)
    normed = model.final_norm(hidden)
    rows = range(0, head.shape[0], HEAD_ROWS)
    with torch.no_grad():
        logits = torch.cat([normed.detach() @ head[row:row + HEAD_ROWS].float().T for row in rows], dim=-1)
        normalizer = torch.logsumexp(logits, dim=-1)
        probabilities = torch.softmax(logits, dim=-1)
        del logits
        if labels is None:
            labels = torch.multinomial(probabilities, 1, generator=generator)[:, 0].numpy()
        delta_logits = probabilities  # d(-log p(y))/d(logits) = p - onehot(y), in place
        delta_logits[torch.arange(len(labels)), torch.as_tensor(labels)] -= 1.0
        grad_normed = torch.zeros_like(normed)
        for row in rows:
            grad_normed += delta_logits[:, row:row + HEAD_ROWS] @ head[row:row + HEAD_ROWS].float()
    normed.backward(grad_normed)
    return hidden.grad.detach(), labels, normalizer


TERM_ROWS = 4096  # head rows per block in _head_terms: every candidate's block of them in float32 at once
TERM_TOKENS = 4096  # positions per block in _head_terms


def _head_terms(model: LayerwiseModel, hidden, normalizers: torch.Tensor, head_deltas: dict) -> dict[str, float]:
    """Σ over positions of Σp·δz² − (Σp·δz)², δz = ΔW·x the change of the logits, for each head candidate: the
    head's rows a block at a time, each candidate's block dequantized once for every position (unpacking it
    again for each window made this most of a Phi-4-mini-width sensitivity pass)."""
    head = model.head_weight()
    with torch.no_grad():
        inputs = torch.cat([model.final_norm(hidden.read(window, window + 1)[0]) for window in range(hidden.shape[0])])
        normalizers = normalizers.reshape(-1)
        first = {name: torch.zeros(len(inputs)) for name in head_deltas}
        mean = {name: torch.zeros(len(inputs)) for name in head_deltas}
        for row in range(0, head.shape[0], TERM_ROWS):
            weight = head[row:row + TERM_ROWS].float()
            changes = {name: delta[row:row + TERM_ROWS].float() for name, delta in head_deltas.items()}
            for start in range(0, len(inputs), TERM_TOKENS):
                x = inputs[start:start + TERM_TOKENS]
                probabilities = torch.exp(x @ weight.T - normalizers[start:start + TERM_TOKENS, None])
                for name, change in changes.items():
                    logits_change = x @ change.T
                    first[name][start:start + TERM_TOKENS] += (probabilities * logits_change * logits_change).sum(-1)
                    mean[name][start:start + TERM_TOKENS] += (probabilities * logits_change).sum(-1)
    return {name: float((first[name] - mean[name] * mean[name]).sum()) for name in head_deltas}


def _watch(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Hooks that keep each module's input and the gradient reaching its output: {name: [x, g]}, per window."""
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def record(_module, inputs, output):
            seen[name] = [inputs[0].detach()[0]]
            output.register_hook(lambda grad: seen[name].append(grad.detach()[0]))
        return record

    return seen, [module.register_forward_hook(hook(name)) for name, module in modules.items()]


def quadratic_klds(folder: Path, windows: np.ndarray, deltas: Deltas, labels: np.ndarray | None = None, seed: int = 0,
                   budget_bytes: int | None = None, spill_dir: Path | None = None, head: bool = True,
                   embedding: bool = False) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """{layer: {candidate: predicted KLD per token}} for the head ("lm_head"; the embedding table where tied;
    only with `head`), every decoder layer's linear layers and, with `embedding`, the embedding's lookup
    ("model.embed_tokens"), for the weight changes `deltas` gives, with the labels [windows, seq_len] the
    gradients were taken for (sampled with `seed` where not given)."""
    from transformers.masking_utils import create_causal_mask

    count, seq_len = windows.shape
    tokens = count * seq_len
    generator = torch.Generator().manual_seed(seed)
    found: dict[str, dict[str, float]] = {}
    with LayerwiseModel(folder) as model:
        # every layer's inputs are kept for the backward pass: each store gets its share of the budget
        share = None if budget_bytes is None else 2 * budget_bytes // (model.layers + 3)
        stores = [allocate(count, seq_len, model.hidden_size, share, spill_dir, "fisher-in-0")]
        model.embed(windows, stores[0])
        for index in range(model.layers):
            stores.append(allocate(count, seq_len, model.hidden_size, share, spill_dir, f"fisher-in-{index + 1}"))
            model.forward(model.layer(index), stores[index], stores[index + 1])
        grads = allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, "fisher-grad-head")
        chosen = np.zeros((count, seq_len), dtype=np.int64)
        normalizers = torch.zeros(count, seq_len)
        for window in range(count):
            given = None if labels is None else labels[window]
            grad, chosen[window], normalizers[window] = _head_step(model, stores[-1].read(window, window + 1)[0], given, generator)
            grads.write(window, grad[None])
        if head and (head_deltas := deltas("lm_head", model.head_weight(), None)):
            found["lm_head"] = {name: 0.5 * total / tokens
                                for name, total in _head_terms(model, stores[-1], normalizers, head_deltas).items()}
            del head_deltas
        stores.pop().delete()
        model.release_head()  # the decoder layers' backward pass needs its memory
        positions = torch.arange(seq_len).unsqueeze(0)
        for index in reversed(range(model.layers)):
            layer = model.layer(index).requires_grad_(False)  # gradients for the hidden states only
            inputs = stores.pop()
            below = allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, f"fisher-grad-{index}")
            modules = {f"model.layers.{index}.{name}": layer.get_submodule(name) for name in LINEARS}
            changes = {name: deltas(name, module.weight, None) for name, module in modules.items()}
            sums = {name: dict.fromkeys(found_here, 0.0) for name, found_here in changes.items()}
            seen, handles = _watch(modules)
            for window in range(count):
                hidden = inputs.read(window, window + 1).requires_grad_(True)
                rotary = model.rotary(hidden, position_ids=positions)
                mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                                          past_key_values=None, position_ids=positions)
                output = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
                output.backward(grads.read(window, window + 1))
                with torch.no_grad():
                    for name, by_candidate in changes.items():
                        x, g = seen[name]
                        for candidate, delta in by_candidate.items():
                            sums[name][candidate] += float(((x @ delta.float().T) * g).sum(-1).pow(2).sum())
                below.write(window, hidden.grad.detach())
            for handle in handles:
                handle.remove()
            inputs.delete()
            grads.delete()
            grads = below
            for name, by_candidate in sums.items():
                if by_candidate:
                    found[name] = {candidate: 0.5 * total / tokens for candidate, total in by_candidate.items()}
            del layer, modules, changes, seen
        if embedding:  # grads: d/d(the embedding rows the first layer read)
            found["model.embed_tokens"] = _embedding_terms(model, windows, grads, deltas, tokens)
        grads.delete()
    return found, chosen


def _embedding_terms(model: LayerwiseModel, windows: np.ndarray, grads, deltas: Deltas, tokens: int) -> dict[str, float]:
    """½·mean (g_tᵀ·dE[token_t])² for each candidate's change dE of the rows the windows use."""
    rows, index = np.unique(windows, return_inverse=True)
    table = model.tensors.tensor("model.embed_tokens.weight")[torch.as_tensor(rows)]
    changes = deltas("model.embed_tokens", table, rows)
    sums = dict.fromkeys(changes, 0.0)
    index = torch.as_tensor(index.reshape(windows.shape))
    for window in range(len(windows)):
        grad = grads.read(window, window + 1)[0]
        for name, change in changes.items():
            sums[name] += float((grad * change[index[window]].float()).sum(-1).pow(2).sum())
    return {name: 0.5 * total / tokens for name, total in sums.items()}
