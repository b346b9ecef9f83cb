"""Generation sanity (../shared/METRICS.md): greedy continuations of fixed chat prompts, scored. Pure.

Catches what perplexity misses: int4 builds that loop forever on the same phrase, or never stop.
"""

from __future__ import annotations

import numpy as np

# Fixed prompts, wrapped in the model's chat template by the caller. Python questions suit the embedded
# model's training text; real checkpoints answer them too.
DEFAULT_PROMPTS = (
    "What does the assert statement do?",
    "Explain how a for loop works in Python.",
    "What is the difference between a list and a tuple?",
    "How do I open a file and read its lines?",
    "What does the global statement do?",
    "Describe what a decorator is.",
    "How are exceptions raised and caught?",
    "What is a generator function?",
)


def repetition(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams in `tokens` that already occurred earlier in it (0 = no repeats)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many of the first `limit` tokens agree before the first difference."""
    count = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        count += 1
    return count


def generation_figures(outputs: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                       baseline: list[list[int]] | None = None, agreement_tokens: int = 16) -> dict[str, float]:
    """Mean repetition, EOS rate and (against the baseline's continuations) prefix agreement."""
    figures = {
        "repetition": float(np.mean([repetition(tokens) for tokens in outputs])),
        "eos_rate": float(np.mean([bool(tokens) and tokens[-1] in stop_ids and len(tokens) <= max_new_tokens
                                   for tokens in outputs])),
        "generated_tokens": float(np.mean([len(tokens) for tokens in outputs])),
    }
    if baseline is not None:
        limit = agreement_tokens
        figures["generation_agreement"] = float(np.mean(
            [common_prefix(ours, theirs, limit) / min(limit, max(len(theirs), 1)) for ours, theirs in zip(outputs, baseline, strict=True)]
        ))
    return figures
