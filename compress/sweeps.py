"""Sweeps: a variant's `matrix:` block expanded into one variant per combination, named predictably."""

from __future__ import annotations

import itertools

# How an expanded sweep variant is named: "<name>-<part>-<part>", in this order of keys.
SWEEP_NAME_PARTS = {
    "method": lambda value: str(value),
    "bits": lambda value: f"w{value}",
    "group_size": lambda value: f"g{value}",
    "symmetric": lambda value: "sym" if value else "asym",
    "max_kld": lambda value: f"kld{value:g}",  # auto variants: one per budget, a Pareto front in one run
    "max_bits_per_weight": lambda value: f"bpw{value:g}",
}
NESTED = {"max_kld": "budget", "max_bits_per_weight": "budget"}  # matrix keys that set a field inside one of the variant's blocks


def expand_matrix(variant: dict) -> list[dict]:
    """One variant per combination of a `matrix:` block's lists, named predictably (e.g. sweep-gptq-w3-g32)."""
    matrix = variant.get("matrix")
    if matrix is None:
        return [variant]
    if not isinstance(matrix, dict) or not matrix or not all(isinstance(v, list) and v for v in matrix.values()):
        raise ValueError("matrix: must map option names to non-empty lists, e.g. {bits: [3, 4], group_size: [32, 128]}")
    keys = sorted(matrix, key=lambda key: list(SWEEP_NAME_PARTS).index(key) if key in SWEEP_NAME_PARTS else len(SWEEP_NAME_PARTS))
    base = {key: value for key, value in variant.items() if key != "matrix"}
    expanded = []
    for values in itertools.product(*(matrix[key] for key in keys)):
        parts = [SWEEP_NAME_PARTS.get(key, lambda v, k=key: f"{k}{v}")(value) for key, value in zip(keys, values, strict=True)]
        one = {**base, "name": "-".join([str(base.get("name", "sweep")), *parts])}
        for key, value in zip(keys, values, strict=True):
            if key in NESTED:
                one[NESTED[key]] = {**(base.get(NESTED[key]) or {}), key: value}
            else:
                one[key] = value
        expanded.append(one)
    return expanded
