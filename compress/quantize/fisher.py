"""The diagonal Fisher information of every linear layer, one decoder layer at a time (issue 14's sensitivity).

For a window x and labels y sampled from the model's own next-token distribution, g = d(-log p(y | x))/dW;
F = mean over windows of g², element by element. A quantized weight W + dW then adds about ½ Σ F·dW² to the
KLD from the original (the KLD's second-order term; measured for this project to rank layers like their
measured KLD, Spearman 0.998 under RTN).

Memory follows compress/layerwise.py: a forward pass keeps each decoder layer's inputs (spilled to disk beyond
the budget), then a backward pass runs from the head down, one decoder layer in float32 at a time, through
every window before moving on, so each layer's F is complete when its layer is left — `each_linear` gets it
then and the next layer's replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from compress.activations import allocate
from compress.layerwise import HEAD_ROWS, LayerwiseModel

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _head_step(model: LayerwiseModel, hidden: torch.Tensor, labels: np.ndarray | None, generator: torch.Generator,
               head_fisher: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
    """One window [seq_len, hidden]: sample labels where none are given, add the head's g² to `head_fisher`
    (where one is kept), and return d(-log p(labels))/d(hidden) with the labels."""
    head = model.head_weight()
    hidden = hidden.detach().requires_grad_(True)
    normed = model.final_norm(hidden)
    rows = range(0, head.shape[0], HEAD_ROWS)
    with torch.no_grad():
        logits = torch.cat([normed @ head[row:row + HEAD_ROWS].float().T for row in rows], dim=-1)
        probabilities = torch.softmax(logits, dim=-1)
        del logits
        if labels is None:
            labels = torch.multinomial(probabilities, 1, generator=generator)[:, 0].numpy()
        delta = probabilities  # d(-log p(y))/d(logits) = p - onehot(y), in place
        delta[torch.arange(len(labels)), torch.as_tensor(labels)] -= 1.0
        grad_normed = torch.zeros_like(normed)
        for row in rows:
            part = delta[:, row:row + HEAD_ROWS]
            grad_normed += part @ head[row:row + HEAD_ROWS].float()
            if head_fisher is not None:
                head_fisher[row:row + HEAD_ROWS] += (part.T @ normed.detach()).pow(2)
    normed.backward(grad_normed)
    return hidden.grad.detach(), labels


def layer_fisher(folder: Path, windows: np.ndarray, each_linear: Callable[[str, torch.Tensor, torch.Tensor], None],
                 labels: np.ndarray | None = None, seed: int = 0, budget_bytes: int | None = None,
                 spill_dir: Path | None = None, head: bool = True) -> np.ndarray:
    """Call each_linear(name, float32 weight [out, in], F [out, in]) for the head ("lm_head"; the embedding
    table where it is tied; only with `head`: its F and float copy are the largest tensors here, 2.5 GB each at
    Phi-4-mini's vocabulary) and then every decoder layer's linear layers from the last down. -> the labels
    [windows, seq_len] the gradients were taken for (sampled with `seed` where not given)."""
    from transformers.masking_utils import create_causal_mask

    count, seq_len = windows.shape
    generator = torch.Generator().manual_seed(seed)
    with LayerwiseModel(folder) as model:
        stores = [allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, "fisher-in-0")]
        model.embed(windows, stores[0])
        for index in range(model.layers):
            stores.append(allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, f"fisher-in-{index + 1}"))
            model.forward(model.layer(index), stores[index], stores[index + 1])
        table = model.head_weight()
        head_fisher = torch.zeros(table.shape, dtype=torch.float32) if head else None
        grads = allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, "fisher-grad-head")
        chosen = np.zeros((count, seq_len), dtype=np.int64)
        for window in range(count):
            given = None if labels is None else labels[window]
            grad, chosen[window] = _head_step(model, stores[-1].read(window, window + 1)[0], given, generator, head_fisher)
            grads.write(window, grad[None])
        stores.pop().delete()
        if head:
            each_linear("lm_head", table.float(), head_fisher / count)
        del table, head_fisher
        model.release_head()  # the decoder layers' backward pass needs its memory
        positions = torch.arange(seq_len).unsqueeze(0)
        for index in reversed(range(model.layers)):
            layer = model.layer(index)
            inputs = stores.pop()
            below = allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, f"fisher-grad-{index}")
            modules = {name: layer.get_submodule(name) for name in LINEARS}
            fisher = {name: torch.zeros_like(module.weight) for name, module in modules.items()}
            for window in range(count):
                hidden = inputs.read(window, window + 1).requires_grad_(True)
                rotary = model.rotary(hidden, position_ids=positions)
                mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                                          past_key_values=None, position_ids=positions)
                layer.zero_grad(set_to_none=True)
                output = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
                output.backward(grads.read(window, window + 1))
                for name, module in modules.items():
                    fisher[name] += module.weight.grad.pow(2)
                below.write(window, hidden.grad.detach())
            inputs.delete()
            grads.delete()
            grads = below
            for name, module in modules.items():
                each_linear(f"model.layers.{index}.{name}", module.weight.detach(), fisher[name] / count)
            del layer, modules, fisher
        grads.delete()
    return chosen


def predicted_kld(fisher: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor, tokens_per_window: int) -> float:
    """The KLD per token that replacing `weight` by `quantized` adds, to second order: ½ Σ F·dW² with F from
    layer_fisher (gradients of a whole window's log-likelihood, hence the division by its tokens)."""
    return 0.5 * float((fisher * (weight - quantized).pow(2)).sum()) / tokens_per_window
