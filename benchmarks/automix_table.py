"""Issue 14's done-when table from a `compress run recipes/automix.yaml` report:

    python -m benchmarks.automix_table runs/automix/report.json

For each auto variant: its budget, the plan's predicted KLD as scaled when chosen, its KLD measured on the
selection slice and on the held-out evaluation windows, its bytes and quantized-layer bits, and the smallest
uniform variant of the same format whose held-out KLD is not above the auto variant's (METRICS.md: plans and
uniform settings are compared on quantized-layer bits at equal or better held-out KLD), with the saving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(report: dict) -> list[dict]:
    variants = [v for v in report["variants"] if v.get("released") and v["targets"].get("cpu", {}).get("metrics")]
    table = []
    for auto in (v for v in variants if v.get("automix")):
        kld = auto["targets"]["cpu"]["metrics"]["kld"]
        uniform = [v for v in variants if not v.get("automix") and v["format"] == auto["format"]
                   and v["targets"]["cpu"]["metrics"]["kld"] <= kld]
        best = min(uniform, key=lambda v: v["quantized_layer_bits"], default=None)
        chosen = next(step for step in auto["automix"]["steps"] if step.get("chosen"))
        table.append({
            "variant": auto["name"], "budget": auto["automix"]["budget"],
            "predicted": chosen["predicted"] * chosen["scale"], "selection": chosen["measured"], "held_out": kld,
            "held_out_se": auto["targets"]["cpu"]["metrics"]["kld_se"], "bytes": chosen["bytes"],
            "bits": auto["quantized_layer_bits"], "plans_measured": len(auto["automix"]["steps"]),
            "uniform": best and best["name"], "uniform_bits": best and best["quantized_layer_bits"],
            "uniform_kld": best and best["targets"]["cpu"]["metrics"]["kld"],
            "saving": best and 1 - auto["quantized_layer_bits"] / best["quantized_layer_bits"],
        })
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| auto variant | budget | predicted (scaled) | selection | held-out ± se | plan bytes | layer bits | plans measured "
             "| smallest uniform at ≤ its KLD | its bits, KLD | fewer bits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        budget = ", ".join(f"{key} {value:g}" for key, value in row["budget"].items() if value is not None)
        uniform = "—" if row["uniform"] is None else f"{row['uniform_bits']:.3f}, {row['uniform_kld']:.3g}"
        saving = "—" if row["saving"] is None else f"{100 * row['saving']:.1f}%"
        lines.append(f"| {row['variant']} | {budget} | {row['predicted']:.4g} | {row['selection']:.4g} | {row['held_out']:.4g} ± "
                     f"{row['held_out_se']:.2g} | {row['bytes']} | {row['bits']:.3f} | {row['plans_measured']} | "
                     f"{row['uniform'] or '—'} | {uniform} | {saving} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows(json.loads(Path(sys.argv[1]).read_text()))))
