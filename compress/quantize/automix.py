"""Automatic mixed precision (issue 14), the pure part: what each setting of a layer costs in bytes, and the
smallest plan whose predicted KLD stays within a budget.

A plan picks one option per layer (a width and group, or keep); predicted KLD adds up over layers (measured
for this project: random plans' measured / predicted KLD had a median of 0.98-1.01). Choosing the plan is a
multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into `resolution` steps,
each option's cost rounded *up* to a step, so a plan found never exceeds the budget: the fewest bytes within
a KLD budget (smallest_plan), or the least KLD within a size budget (least_kld_plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# GGUF block types: (weights per block, bytes per block), as ggml lays them out.
GGUF_BLOCKS = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84),
    "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "F16": (1, 2), "BF16": (1, 2),
    "F32": (1, 4),
}


@dataclass(frozen=True)
class Option:
    name: str  # e.g. "4g128", "8g128", "keep", "Q4_K"
    bytes: int  # what the layer takes on disk at this setting
    kld: float  # its predicted contribution to the model's KLD (0 for keep)


def packed_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                 scale_bytes: int = 2) -> int:
    """A compressed-tensors `pack-quantized` layer: the codes, a scale per group (in the checkpoint's float
    width) and, asymmetric, a zero point per group packed at `bits`."""
    group_size = in_features if group_size == -1 else group_size
    groups = out_features * math.ceil(in_features / group_size)
    codes = out_features * math.ceil(in_features * bits / 32) * 4
    zeros = 0 if symmetric else math.ceil(groups * bits / 32) * 4
    return codes + groups * scale_bytes + zeros


def gguf_bytes(out_features: int, in_features: int, kind: str) -> int:
    """A GGUF tensor of type `kind` (rows of `in_features`, which must fill whole blocks)."""
    per_block, size = GGUF_BLOCKS[kind]
    if in_features % per_block:
        raise ValueError(f"{kind} needs rows that are a multiple of {per_block}, not {in_features}")
    return out_features * in_features // per_block * size


class BudgetTooSmall(ValueError):
    """No plan predicts a KLD within the budget; str() says the smallest there is."""


def smallest_plan(options: dict[str, list[Option]], budget: float, resolution: int = 4096) -> dict[str, Option]:
    """One option per layer: the fewest bytes whose predicted KLD adds up to at most `budget`.

    Exact for KLDs rounded up to budget / resolution; the rounding costs at most layers / resolution of the
    budget (a plan the rounding rules out predicts within that much of it)."""
    if budget <= 0:
        raise ValueError(f"the KLD budget must be positive, not {budget}")
    least = sum(min(option.kld for option in choices) for choices in options.values())
    if least > budget:
        raise BudgetTooSmall(f"the smallest predicted KLD of any plan is {least:.3g}, above the budget {budget:.3g}")
    plan = _knapsack(options, lambda option: option.kld, lambda option: option.bytes, budget, resolution)
    if plan is None:
        raise BudgetTooSmall(f"no plan fits the budget {budget:.3g} once each layer's KLD is rounded up to "
                             f"{budget / resolution:.3g}; raise the budget or the resolution")
    return plan


def least_kld_plan(options: dict[str, list[Option]], max_bytes: int, resolution: int = 4096) -> dict[str, Option]:
    """One option per layer: the least predicted KLD whose bytes add up to at most `max_bytes` (each option's
    bytes rounded up to max_bytes / resolution)."""
    least = sum(min(option.bytes for option in choices) for choices in options.values())
    if least > max_bytes:
        raise BudgetTooSmall(f"the smallest plan takes {least} bytes, above the budget of {max_bytes}")
    plan = _knapsack(options, lambda option: option.bytes, lambda option: option.kld, max_bytes, resolution)
    if plan is None:
        raise BudgetTooSmall(f"no plan fits {max_bytes} bytes once each layer's bytes are rounded up to "
                             f"{max_bytes / resolution:.0f}")
    return plan


def _knapsack(options: dict[str, list[Option]], cost, value, budget: float, resolution: int) -> dict[str, Option] | None:
    """The plan of least total `value` whose `cost`, each rounded up to budget / resolution, adds up to at most
    `budget` (None where none does): dynamic programming over the budget's steps, layer by layer."""
    step = budget / resolution

    def steps(option: Option) -> int:
        return math.ceil(cost(option) / step - 1e-9) if cost(option) > 0 else 0

    best = np.zeros(resolution + 1)  # least value so far using at most k steps of the budget
    picks = []
    for choices in options.values():
        candidates = np.full((len(choices), resolution + 1), np.inf)
        for index, option in enumerate(choices):
            if (used := steps(option)) <= resolution:
                candidates[index, used:] = best[: resolution + 1 - used] + value(option)
        picks.append(candidates.argmin(axis=0))
        best = candidates.min(axis=0)
    if not np.isfinite(best[resolution]):
        return None
    plan, room = {}, resolution
    for (layer, choices), pick in zip(reversed(list(options.items())), reversed(picks), strict=True):
        option = choices[int(pick[room])]
        plan[layer] = option
        room -= steps(option)
    return dict(reversed(list(plan.items())))
