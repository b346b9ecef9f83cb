"""Automatic mixed precision (issue 14), the pure part: what each setting of a layer costs in bytes, and the
smallest plan whose predicted KLD stays within a budget.

A plan picks one option per layer (a width and group, or keep); predicted KLD adds up over layers (measured
for this project: random plans' measured / predicted KLD had a median of 0.98-1.01). Choosing the plan is a
multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into `resolution` steps,
each option's cost rounded *up* to a step, so a plan found never exceeds the budget: the fewest bytes within
a KLD budget (smallest_plan), or the least KLD within a size budget (least_kld_plan). Predictions are
corrected by measuring plans (choose_plan, with a `measure` the caller gives: the KLD a plan really causes).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_EVALUATIONS = 8  # plans measured on the selection slice, the corrective steps included (issue 14: at most 12)

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


Measure = Callable[[dict[str, Option]], tuple[float, float]]  # a plan -> (its measured KLD, standard error)


def smallest_plan(options: dict[str, list[Option]], budget: float, resolution: int = 1 << 16) -> dict[str, Option]:
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


def least_kld_plan(options: dict[str, list[Option]], max_bytes: int, resolution: int = 1 << 16) -> dict[str, Option]:
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


def choose_plan(options: dict[str, list[Option]], weights: int, measure: Measure, max_kld: float | None = None,
                max_bits_per_weight: float | None = None) -> tuple[dict[str, Option], list[dict]]:
    """The plan for a budget: the fewest bytes meeting `max_kld` (corrected by measurement), or the least
    predicted KLD within `max_bits_per_weight` of the `weights` (measured once, for the record); with both, the
    first, refused where it does not fit the second. -> (plan, every measured step, the chosen one marked)."""
    if max_kld is not None:
        plan, steps = _corrected_plan(options, max_kld, measure)
    else:
        plan = least_kld_plan(options, int(max_bits_per_weight * weights / 8))
        steps = [_step(plan, 1.0, measure)]
        steps[0]["chosen"] = True
        del steps[0]["_plan"]
    if max_bits_per_weight is not None and plan_bits(plan, weights) > max_bits_per_weight:
        raise BudgetTooSmall(f"the smallest plan meeting max_kld {max_kld:g} takes {plan_bits(plan, weights):.3f} "
                             f"bits per weight, above max_bits_per_weight {max_bits_per_weight:g}")
    return plan, steps


def plan_bits(plan: dict[str, Option], weights: int) -> float:
    """The plan's quantized-layer bits (METRICS.md)."""
    return 8 * sum(option.bytes for option in plan.values()) / weights


def _step(plan: dict[str, Option], scale: float, measure: Measure) -> dict:
    measured, se = measure(plan)
    return {"predicted": sum(option.kld for option in plan.values()), "scale": scale, "measured": measured,
            "measured_se": se, "bytes": sum(option.bytes for option in plan.values()),
            "plan": dict(Counter(option.name for option in plan.values())), "_plan": plan}


def _corrected_plan(options: dict[str, list[Option]], target: float, measure: Measure) -> tuple[dict[str, Option], list[dict]]:
    """The knapsack's plan for predictions scaled by s (first s = 1), measured on the selection slice; then s is
    searched: the last plan's measured ÷ predicted while every plan met or every plan missed the target (the
    estimate reads the whole vocabulary's KLD, the verdict's top-k figure reads less; layers' errors interact),
    the geometric mean of the smallest s that met and the largest that missed once both are known. Until a plan
    repeats or MAX_EVALUATIONS are spent. `measure` gives the KLD as the verdict measures it (the float model's
    top-k reference). -> (the smallest plan measured within the target, else the last; every step)."""
    scale, steps, seen = 1.0, [], set()
    met, missed = [], []  # scales whose plans met / missed the target
    for _ in range(MAX_EVALUATIONS):
        try:
            chosen = smallest_plan({layer: [Option(o.name, o.bytes, o.kld * scale) for o in choices]
                                    for layer, choices in options.items()}, target)
        except BudgetTooSmall:
            if not steps:
                raise
            break
        plan = {layer: next(o for o in options[layer] if o.name == option.name) for layer, option in chosen.items()}
        names = tuple(option.name for option in plan.values())
        if names in seen:
            break
        seen.add(names)
        step = _step(plan, scale, measure)
        steps.append(step)
        (met if step["measured"] <= target else missed).append(scale)
        if met and missed:
            scale = math.sqrt(min(met) * max(missed))
        elif step["predicted"] > 0:
            scale = step["measured"] / step["predicted"]
    within = [step for step in steps if step["measured"] <= target]
    chosen_step = min(within, key=lambda step: step["bytes"]) if within else steps[-1]
    chosen_step["chosen"] = True
    plan = chosen_step["_plan"]
    for step in steps:
        del step["_plan"]
    return plan, steps
