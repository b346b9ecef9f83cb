"""Automatic mixed precision, the pure part: byte counts by hand and the knapsack against brute force."""

import itertools

import numpy as np
import pytest

from compress.quantize.automix import BudgetTooSmall, Option, gguf_bytes, packed_bytes, smallest_plan


def test_byte_counts_by_hand():
    # 8 rows of 256 at 4 bits, groups of 128: 8*256/2 bytes of codes, 16 fp16 scales; asymmetric adds 16 4-bit zeros
    assert packed_bytes(8, 256, 4, 128, True) == 1024 + 32
    assert packed_bytes(8, 256, 4, 128, False) == 1024 + 32 + 8
    assert packed_bytes(8, 256, 8, -1, True) == 2048 + 16  # one group per row
    assert gguf_bytes(8, 256, "Q4_0") == 8 * 8 * 18 and gguf_bytes(8, 256, "Q6_K") == 8 * 210
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_bytes(8, 128, "Q4_K")


def _brute_force(options, budget):
    best = None
    for combination in itertools.product(*options.values()):
        if sum(o.kld for o in combination) <= budget:
            size = sum(o.bytes for o in combination)
            best = size if best is None else min(best, size)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_is_feasible_and_as_small_as_brute_force_within_its_rounding(seed):
    rng = np.random.default_rng(seed)
    options = {}
    for layer in range(5):
        size = int(rng.integers(1000, 5000))
        kld = float(rng.uniform(0.001, 0.01))
        options[f"layer{layer}"] = [Option("3", size * 3 // 16, kld * 4), Option("4", size // 4, kld),
                                    Option("8", size // 2, kld / 16), Option("keep", size, 0.0)]
    budget = float(rng.uniform(0.005, 0.04))
    resolution = 1000
    plan = smallest_plan(options, budget, resolution)
    assert list(plan) == list(options)
    assert sum(o.kld for o in plan.values()) <= budget * (1 + 1e-12)
    found = sum(o.bytes for o in plan.values())
    # never worse than the best plan within the budget less the rounding slack, never better than the true best
    assert found <= _brute_force(options, budget * (1 - len(options) / resolution))
    assert found >= _brute_force(options, budget)


def test_a_budget_no_plan_meets_is_refused_with_the_smallest_there_is():
    options = {"a": [Option("4", 10, 0.02), Option("8", 20, 0.01)], "b": [Option("4", 10, 0.02)]}
    with pytest.raises(BudgetTooSmall, match="smallest predicted KLD of any plan is 0.03"):
        smallest_plan(options, 0.025)
    assert {k: o.name for k, o in smallest_plan(options, 0.031).items()} == {"a": "8", "b": "4"}
    assert {k: o.name for k, o in smallest_plan(options, 0.04).items()} == {"a": "4", "b": "4"}
