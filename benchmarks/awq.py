"""AWQ's search against GPTQ, layer for layer (issue 12):

    python -m benchmarks.run --only awq [--awq-sizes 8x128,256x2048]

For each width (Phi-4-mini, Phi-4: random bf16 weights, one decoder layer) and calibration size (8×128 and
the recipes' own 256×2048), compress's layer-by-layer calibration (calibrate_streaming, what `compress run`
calls) runs `recipes/phi-4-mini-instruct.yaml`'s gptq-w4g128 and awq-w4g128 variants in fresh processes, side
by side: which goes first alternates from one size to the next. A layer's seconds are its whole time (the
forward that gathers statistics, then GPTQ's rounding, or AWQ's scale and clipping searches and rounding);
AWQ's search seconds are the searches alone. Random weights make the chosen scales meaningless; the time and
memory are real.
"""

from __future__ import annotations

import yaml

from benchmarks.common import CACHE, ROOT, log, probe, threads
from benchmarks.models import random_model

SIZES = ((8, 128), (256, 2048))
WIDTHS = ("phi4-mini", "phi4")
BUDGET_GIB = 12  # what a 16 GB machine leaves: hidden states beyond a third of it go to disk
MIB = 2**20


def recipe_variants() -> dict[str, dict]:
    recipe = yaml.safe_load((ROOT / "recipes" / "phi-4-mini-instruct.yaml").read_text())
    chosen = {variant["method"]: variant for variant in recipe["variants"] if variant["name"] in ("gptq-w4g128", "awq-w4g128")}
    return {method: {key: value for key, value in variant.items() if key != "formats"} for method, variant in chosen.items()}


def measure(width: str, samples: int, seq_len: int, method: str, variant: dict, rate: float) -> dict:
    from compress import timing
    from compress.memory import Shapes
    from compress.model import inspect_model

    model = random_model(width, 1, "bf16")
    estimate = timing.layer_time(Shapes.from_info(inspect_model(str(model))), method, samples * seq_len, seq_len, rate,
                                 timing.has_amx())
    name = f"awq-bench-{width}-{method}-{samples}x{seq_len}"
    job = {"model": str(model), "variant": variant, "calibration_samples": samples, "calibration_seq_len": seq_len,
           "budget_gib": BUDGET_GIB, "out": str(CACHE / "jobs" / f"{name}-out"), "work": str(CACHE / "jobs" / f"{name}-work"),
           "threads": threads()}
    log(f"awq: {width}, {samples}x{seq_len} tokens, {method}")
    result = probe("streaming", job, name)
    return {"width": width, "tokens": f"{samples}x{seq_len}", "method": method, "layer_seconds": result["layers_seconds"][0],
            "search_seconds": (result.get("search_seconds") or [None])[0], "peak_rss_mb": round(result["peak_rss_mb"], 1),
            "others_cpu": result["process"]["others_cpu"], "applied": result.get("applied"),
            "estimate_s": round(estimate.total, 1), "estimate_method_s": round(estimate.method, 1)}


def run(sizes=SIZES, widths=WIDTHS) -> dict:
    from compress.timing import machine_rate

    variants = recipe_variants()
    rate = machine_rate()  # what preflight would measure here, before anything runs
    rows, first = [], "gptq"
    for width in widths:
        for samples, seq_len in sizes:
            order = [first, "awq" if first == "gptq" else "gptq"]
            measured = {method: measure(width, samples, seq_len, method, variants[method], rate) for method in order}
            rows += [measured["gptq"], measured["awq"]]
            first = order[1]
    return {"variants": variants, "rows": rows, "ratios": ratios(rows), "machine_rate": rate}


def ratios(rows: list[dict]) -> list[dict]:
    """AWQ's layer seconds ÷ GPTQ's, per width and calibration size (target ≤ 1)."""
    by = {(row["width"], row["tokens"], row["method"]): row for row in rows}
    out = []
    for width, tokens in dict.fromkeys((row["width"], row["tokens"]) for row in rows):
        gptq, awq = by.get((width, tokens, "gptq")), by.get((width, tokens, "awq"))
        if gptq and awq:
            out.append({"width": width, "tokens": tokens, "awq_s": awq["layer_seconds"], "gptq_s": gptq["layer_seconds"],
                        "ratio": round(awq["layer_seconds"] / gptq["layer_seconds"], 3), "awq_search_s": awq["search_seconds"],
                        "awq_peak_mib": awq["peak_rss_mb"], "gptq_peak_mib": gptq["peak_rss_mb"],
                        "others_cpu": max(awq["others_cpu"], gptq["others_cpu"]),
                        "estimates": {"awq_s": awq.get("estimate_s"), "awq_search_s": awq.get("estimate_method_s"),
                                      "gptq_s": gptq.get("estimate_s")}})
    return out


def markdown(results: dict) -> list[str]:
    lines = ["## AWQ's search against GPTQ, per layer (issue 12)", "",
             "One random bf16 decoder layer through `calibrate_streaming` with the phi-4-mini recipe's awq-w4g128 and "
             "gptq-w4g128 variants, side by side (target: AWQ ÷ GPTQ ≤ 1).", "",
             "| width | calibration tokens | awq s/layer | of which search | gptq s/layer | awq ÷ gptq | awq peak MiB | gptq peak MiB | others' CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results.get("ratios", []):
        lines.append(f"| {row['width']} | {row['tokens']} | {row['awq_s']:.1f} | {row['awq_search_s'] or 0:.1f} | {row['gptq_s']:.1f} | "
                     f"{row['ratio']:.2f} | {row['awq_peak_mib']:.0f} | {row['gptq_peak_mib']:.0f} | {row['others_cpu']:.2f} |")
    if results.get("machine_rate"):
        lines += ["", f"Preflight's estimates (compress.timing at this machine's {results['machine_rate'] / 1e9:.0f} GFLOP/s), "
                      "seconds per layer, estimate ÷ measured:", "",
                  "| width | calibration tokens | awq | awq search | gptq |", "|---|---|---:|---:|---:|"]
        for row in results.get("ratios", []):
            guess = row["estimates"]
            lines.append(f"| {row['width']} | {row['tokens']} | {guess['awq_s']:.1f} ({guess['awq_s'] / row['awq_s']:.2f}) | "
                         f"{guess['awq_search_s']:.1f} ({guess['awq_search_s'] / (row['awq_search_s'] or 1):.2f}) | "
                         f"{guess['gptq_s']:.1f} ({guess['gptq_s'] / row['gptq_s']:.2f}) |")
    return lines


def main() -> None:
    import json

    results = run()
    print("\n".join(markdown(results)))
    print(json.dumps(results["ratios"], indent=1))


if __name__ == "__main__":
    main()
