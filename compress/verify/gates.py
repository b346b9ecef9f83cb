"""Gates: compare one (variant, target)'s figures with the recipe's limits. Pure; returns sentences."""

from __future__ import annotations

# gate name -> (metric, comparison, words); "max" fails above the limit, "min" below it.
GATE_TABLE = {
    "max_kld": ("kld", "max", "KLD"),
    "min_top1": ("top1", "min", "top-1 agreement"),
    "max_ppl_ratio": ("ppl_ratio", "max", "perplexity ratio"),
    "max_size_ratio": ("size_ratio", "max", "size ratio"),
    "min_decode_speedup": ("decode_speedup", "min", "decode speedup"),
    "max_repetition": ("repetition", "max", "generation repetition"),
    "min_eos_rate": ("eos_rate", "min", "EOS rate"),
}


def check_gates(gates: dict[str, float | None], metrics: dict[str, float]) -> list[str]:
    """Every failed gate as a sentence, e.g. "KLD 0.031 > max_kld 0.02". Empty when all pass."""
    failures = []
    for gate, limit in gates.items():
        if limit is None:
            continue
        metric, kind, words = GATE_TABLE[gate]
        value = metrics.get(metric)
        if value is None or value != value:  # missing or NaN cannot pass a gate
            failures.append(f"{words} was not measured, so {gate} {limit:g} cannot be checked")
        elif kind == "max" and value > limit:
            failures.append(f"{words} {value:.4g} > {gate} {limit:g}")
        elif kind == "min" and value < limit:
            failures.append(f"{words} {value:.4g} < {gate} {limit:g}")
    return failures
