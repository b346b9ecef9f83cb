"""The run's report: report.json (the contract), report.md, and the summary table printed at the end."""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compress.quantize.plan import plan_runs
from compress.release import write_json_atomic
from compress.tradeoff import recommendation_lines
from compress.verify.cpu_share import BUSY

BASELINE_KEYS = ("ppl", "nll_se", "decode_tps", "prefill_tps", "others_cpu", "peak_rss_mb", "peak_vram_mb", "repetition", "eos_rate")


def build_report(out: Path, recipe, info, baseline, outcomes, context) -> dict:
    """The report as a dict; keys follow the contract in the foundation issue (extend, never rename)."""
    variants = []
    for outcome in outcomes:
        artifact = outcome.artifact
        variants.append({
            "name": artifact.variant,
            "method": artifact.method,
            "format": artifact.format,
            "runtime": artifact.runtime,
            "path": str(artifact.path),
            "released": outcome.released,
            "not_released_because": outcome.reasons,
            "size_bytes": artifact.size_bytes,
            "bits_per_weight": artifact.bits["bits_per_weight"],
            "bits_per_weight_all": artifact.bits["bits_per_weight_all"],
            "quantized_layer_bits": artifact.bits.get("quantized_layer_bits"),
            "quantize_seconds": artifact.details.get("seconds"),
            "layer_bits": artifact.details.get("layer_bits"),
            "layer_plan": artifact.details.get("layer_plan"),
            "from": artifact.details.get("from"),
            "awq_skipped_mappings": artifact.details.get("awq", {}).get("skipped"),
            "awq": artifact.details.get("awq"),
            "builder_options": artifact.details.get("builder_options"),
            "gguf": artifact.details.get("gguf"),
            "automix": artifact.details.get("automix"),
            "sensitivity": artifact.details.get("sensitivity"),
            "resumed": artifact.details.get("resumed"),
            "targets": {
                target: {"status": verdict.status, "failures": verdict.failures, "metrics": verdict.metrics,
                         "environment": verdict.environment}
                for target, verdict in outcome.verdicts.items()
            },
        })
    return {
        "recipe": recipe.name,
        "recipe_sha256": context["recipe_sha256"],
        "model": info.spec,
        "model_parameters": info.parameters,
        "evaluation": recipe.evaluation.model_dump(),
        "gates": recipe.gates.model_dump(),
        "kld_note": f"KLD keeps the baseline's top {recipe.evaluation.top_k} tokens per position plus one bucket "
                    "for the rest: a lower bound on full-vocabulary KLD when the vocabulary is larger.",
        "baseline": {
            "size_bytes": baseline.size_bytes,
            "targets": {
                **{t: {k: r["metrics"][k] for k in BASELINE_KEYS if k in r["metrics"]} | {"status": "measured", "accuracy_cached": r.get("cached", False), "environment": r["environment"]}
                   | ({"speed_not_measured": r["not_measured"]} if r.get("not_measured") else {})
                   for t, r in baseline.results.items()},
                **{t: {"status": "not-verified", "reason": why} for t, why in baseline.missing.items()},
            },
        },
        "variants": variants,
        "versions": context["versions"],
        "data": context["data"],
    }


def _fmt(value, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


LOADS = ("others_cpu", "baseline_others_cpu")  # others' CPU share while the artifact's and the baseline's runs were timed


def _load(metrics: dict, keys: tuple[str, ...] = LOADS) -> float:
    """The highest share of the CPU that other processes used while these figures were timed."""
    return max(metrics.get(key) or 0.0 for key in keys)


def _speed(metrics: dict, key: str, spec: str, loads: tuple[str, ...] = LOADS[:1]) -> str:
    """A speed or speedup, marked † when it was timed while other processes used more than BUSY of the CPU."""
    value = _fmt(metrics.get(key), spec)
    return value + " †" if key in metrics and _load(metrics, loads) > BUSY else value


def _kld(metrics: dict) -> str:
    return f"{metrics['kld']:.3g} ± {metrics['kld_se']:.2g}" if "kld" in metrics else "—"


# (header, cell from (row, metrics), shown in the terminal too). A row is a dict with name, format, target,
# size_bytes, bits_per_weight, verdict; metrics are that target's figures.
COLUMNS = [
    ("variant", lambda r, m: r["name"], True),
    ("format", lambda r, m: r["format"], True),
    ("target", lambda r, m: r["target"], True),
    ("MiB", lambda r, m: _fmt(r["size_bytes"] / 2**20, ".2f"), True),
    ("bits/w", lambda r, m: _fmt(r["bits_per_weight"], ".2f"), True),
    ("layer bits", lambda r, m: _fmt(r.get("quantized_layer_bits"), ".2f"), False),  # METRICS.md: quantized-layer bits
    ("ppl", lambda r, m: _fmt(m.get("ppl"), ".3f"), True),
    ("KLD ± se", lambda r, m: _kld(m), True),
    ("top-1", lambda r, m: _fmt(m.get("top1"), ".3f"), True),
    ("Δp rms", lambda r, m: _fmt(m.get("delta_p_rms"), ".2g"), False),
    ("prefill tok/s", lambda r, m: _speed(m, "prefill_tps", ".0f"), False),
    ("tok/s", lambda r, m: _speed(m, "decode_tps", ".0f"), True),
    ("× base", lambda r, m: _speed(m, "decode_speedup", ".2f", LOADS), True),
    ("RSS MB", lambda r, m: _fmt(m.get("peak_rss_mb"), ".0f"), False),
    ("repeat", lambda r, m: _fmt(m.get("repetition"), ".2f"), True),
    ("EOS", lambda r, m: _fmt(m.get("eos_rate"), ".2f"), False),
    ("same start", lambda r, m: _fmt(m.get("generation_agreement"), ".2f"), False),
    ("verdict", lambda r, m: r["verdict"], True),
]


def absent_targets(report: dict) -> dict[str, str]:
    """target -> why it is not on this machine at all (the baseline could not be measured there either)."""
    return {target: base["reason"] for target, base in report["baseline"]["targets"].items()
            if base.get("status") == "not-verified"}


def absent_lines(report: dict) -> list[str]:
    """One sentence per absent target, in place of a row of dashes for every artifact."""
    return [f"{target}: not verified for any artifact — {why}" for target, why in absent_targets(report).items()]


def summary_rows(report: dict) -> list[tuple[dict, dict]]:
    """(row, metrics) per (artifact, target measured here), the baseline first."""
    absent = absent_targets(report)
    rows = []
    for target, base in report["baseline"]["targets"].items():
        if base.get("status") == "measured":
            row = {"name": "baseline", "format": "original", "target": target, "bits_per_weight": None,
                   "size_bytes": report["baseline"]["size_bytes"], "verdict": "reference"}
            rows.append((row, base))
    for variant in report["variants"]:
        for target, result in variant["targets"].items():
            if result["status"] == "not-applicable" or target in absent:
                continue
            verdict = result["status"] + (", released" if variant["released"] and result["status"] == "pass" else "")
            rows.append(({**variant, "target": target, "verdict": verdict}, result["metrics"]))
    return rows


def render_markdown(report: dict) -> str:
    header = [name for name, _, _ in COLUMNS]
    lines = [
        f"# {report['recipe']}: compression report",
        "",
        f"Model `{report['model']}` ({report['model_parameters'] / 1e6:.1f}M parameters). "
        f"Evaluation: {report['evaluation']['windows']} windows × {report['evaluation']['seq_len']} tokens of "
        f"`{report['evaluation']['dataset']}`; every figure was measured on the exported artifact loaded from disk "
        "in its own runtime, each in its own process.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, metrics in summary_rows(report):
        lines.append("| " + " | ".join(cell(row, metrics).replace("|", "\\|") for _, cell, _ in COLUMNS) + " |")
    lines += ["", f"- {report['kld_note']}", "- ± is one standard error over evaluation windows.",
              "- Decode and prefill speeds: one warm-up, then the median of "
              f"{report['evaluation']['speed_runs']} runs of {report['evaluation']['new_tokens']} new tokens after a "
              f"{report['evaluation']['prompt_tokens']}-token prompt; greedy."]
    lines += [f"- {line}" for line in speed_notes(report)]
    lines += [f"- Baseline on {target}: speed and generations not measured, so no speedups: {result['speed_not_measured']}."
              for target, result in report["baseline"]["targets"].items() if result.get("speed_not_measured")]
    recommendation = recommendation_lines(report)
    if recommendation:
        lines += ["", "## Recommendation", ""] + [f"- {line}" for line in recommendation]
    lines += ["", "## Verdicts", ""] + [f"- {line}" for line in verdict_lines(report)]
    lines += node_lines(report)
    lines += plan_lines(report)
    lines += awq_mapping_lines(report)
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += ["", f"Versions: {versions}.", ""]
    return "\n".join(lines)


def node_lines(report: dict) -> list[str]:
    """On a cluster run: the node (or nodes) each target's figures were measured on."""
    places: dict[str, dict[str, dict]] = {}
    measured = [(t, r) for t, r in report["baseline"]["targets"].items()] + \
        [(t, r) for variant in report["variants"] for t, r in variant["targets"].items()]
    for target, result in measured:
        if node := (result.get("environment") or {}).get("node"):
            places.setdefault(target, {})[node["node_id"]] = node
    if not places:
        return []
    lines = ["", "## Where each target was measured", ""]
    for target, nodes in places.items():
        lines += [f"- {target}: node {node['node_id'][:12]} (labels {node['labels'] or 'none'}), host {node['host']}, "
                  f"{node['cpu']}, {node['gpu'] or 'no GPU'}, {node['threads']} threads" for node in nodes.values()]
    lines += [f"- {target}: not verified: {why}" for target, why in absent_targets(report).items()]
    return lines


def speed_notes(report: dict) -> list[str]:
    """How the speedups were timed, and which speeds were taken under others' load (the † in the table)."""
    measured = [(row, metrics) for row, metrics in summary_rows(report) if "decode_tps" in metrics]
    apart = [f"{row['name']} ({row['format']}, {row['target']})" for row, metrics in measured
             if "decode_speedup" in metrics and not metrics.get("speed_interleaved")]
    notes = ["Speedup (× base) is decode tok/s over the baseline's, the two timed in turn (baseline, artifact, baseline, "
             "artifact…), each in its own process, so the ratio sees the same load; the baseline's figures from those runs "
             "are in report.json (baseline_decode_tps)" + (f"; timed apart from the baseline instead: {', '.join(apart)}" if apart else "") + "."]
    busy = [(row, metrics) for row, metrics in measured if _load(metrics) > BUSY]
    if not busy:
        return notes
    if len(busy) > 1 and len(busy) == len(measured):
        loads = sorted(_load(metrics) for _, metrics in busy)
        shares = f"every speed here: {loads[0]:.0%}–{loads[-1]:.0%}"
    else:
        shares = ", ".join(f"{row['name']}" + ("" if row["name"] == "baseline" else f" ({row['format']})")
                           + f" on {row['target']} {_load(metrics):.0%}" for row, metrics in busy)
    return notes + [f"† timed while other processes used more than {BUSY:.0%} of the machine's CPU ({shares}): not the "
                    "model's own speed, and a speedup marked † may compare different loads. Rerun on a quiet machine."]


def plan_lines(report: dict) -> list[str]:
    """The precision plan of each variant whose layers do not all share one bit width, as runs of layers
    (the plan layer by layer is in report.json and each artifact's manifest)."""
    lines = []
    seen = set()
    for variant in report["variants"]:
        plan = variant.get("layer_plan") or {}
        if variant["name"] in seen or len(set(plan.values())) < 2:
            continue
        seen.add(variant["name"])
        counts = ", ".join(f"{count} at {bits}" + ("" if not bits.isdigit() else " bits" if bits != "16" else " bits (kept)")
                           for bits, count in (variant.get("layer_bits") or {}).items())
        lines += [f"- {variant['name']} ({counts}):"] + [f"  - {run}" for run in plan_runs(plan)]
    return (["", "## Per-layer precision", "", "Kept = left in floating point; every layer's bits are in "
             "report.json and each artifact's manifest.", "", *lines]) if lines else []


def awq_mapping_lines(report: dict) -> list[str]:
    """Every AWQ mapping of each variant: applied (form, alpha, searched error against RTN's, clipping of its
    consumer) or skipped, with the reason."""
    lines, seen = [], set()
    for variant in report["variants"]:
        awq = variant.get("awq") or {}
        if variant["name"] in seen or not (awq.get("applied") or awq.get("skipped")):
            continue
        seen.add(variant["name"])
        clip = awq.get("clip") or {}
        search = awq.get("search_seconds") or []
        lines += ["", f"### {variant['name']}: {'Phi-aware' if awq.get('search') == 'phi' else 'llm-compressor'} AWQ, "
                      f"n_grid {awq.get('n_grid')}"
                      + (f", search {statistics.median(search):.1f} s per layer (median of {len(search)})" if search else ""), ""]
        if awq.get("applied"):
            lines += ["| mapping | form | α | error ÷ RTN's | Gram trace in the search's sketch | consumer range kept (clip) |",
                      "|---|---|---:|---:|---:|---:|"]
            for item in awq["applied"]:
                kept = clip.get(item.get("consumer"))
                sketch = f"{item['trace_kept']:.3f} (rank {item['rank']})" if "trace_kept" in item else "—"
                lines.append(f"| {item['mapping']} | {item['form']} | {item['alpha']:.2f} | {item['error_vs_rtn']:.3f} | {sketch} | "
                             f"{'—' if kept is None else f'{kept:.3f}'} |")
        lines += [f"- skipped: {reason}" for reason in awq.get("skipped") or []]
    return (["", "## AWQ mappings"] + lines) if lines else []


def verdict_lines(report: dict) -> list[str]:
    """One sentence per target absent from this machine, then one per artifact: where it was released, or every
    reason it was not."""
    absent = absent_targets(report)
    lines = absent_lines(report)
    for variant in report["variants"]:
        label = f"{variant['name']} ({variant['format']})"
        if variant["released"]:
            lines.append(f"{label}: released to {variant['path']}" + (f" ({variant['resumed']})" if variant.get("resumed") else ""))
        else:
            lines.append(f"{label}: not released: " + "; ".join(variant["not_released_because"]))
        for target, result in variant["targets"].items():
            if result["status"] == "not-verified" and target not in absent:
                lines.append(f"{label} on {target}: not verified: " + "; ".join(result["failures"]))
        if variant.get("awq"):
            lines.extend(f"{label}: {line}" for line in awq_lines(variant["awq"]))
        if variant.get("from"):
            lines.append(f"{label}: weights are the {variant['from']}")
        if variant.get("gguf"):
            lines.extend(f"{label}: {line}" for line in gguf_lines(variant["gguf"]))
        if variant.get("automix"):
            lines.append(f"{label}: {automix_line(variant['automix'])}")
    return lines


def automix_line(automix: dict) -> str:
    """How an auto variant's plan was chosen, in one sentence."""
    last = next(step for step in automix["steps"] if step.get("chosen"))
    plan = ", ".join(f"{count} at {name}" for name, count in sorted(last["plan"].items()))
    budget = automix["budget"]
    limits = []
    if budget.get("max_kld") is not None:
        limits.append(f"max KLD {budget['max_kld']:g}")
    if budget.get("max_bits_per_weight") is not None:
        limits.append(f"at most {budget['max_bits_per_weight']:g} quantized-layer bits per weight")
    bits = f" ({automix['bits_per_weight']:.3g} quantized-layer bits)" if "bits_per_weight" in automix else ""
    scaled = f" ({last['predicted'] * last['scale']:.4g} as scaled when chosen)" if last["scale"] != 1 else ""
    return (f"plan for {' and '.join(limits)} ({automix['base']} candidates {', '.join(automix['candidates'])}): {plan}{bits}; "
            f"predicted {last['predicted']:.4g}{scaled}, measured {last['measured']:.4g} ± {last['measured_se']:.2g} on "
            f"{automix['selection_windows']} selection windows disjoint from calibration and evaluation (the chosen of "
            f"{len(automix['steps'])} plan(s) measured; predictions scaled by measured ÷ predicted between them)"
            + ("" if automix["met_on_selection"] else " — NOT met on the selection slice"))


def gguf_lines(gguf: dict) -> list[str]:
    """A GGUF file's tensor types as written, its importance matrix, and the tensors llama.cpp gave another type."""
    types = ", ".join(f"{kind} {count}" for kind, count in gguf.get("tensor_types", {}).items())
    lines = [f"tensor types written: {types}" + (f" (llama-quantize {gguf['quant']})" if gguf.get("quant") else "")]
    if gguf.get("imatrix"):
        lines.append(f"importance matrix: {gguf['imatrix']}")
    fell_back = gguf.get("fell_back") or {}
    if fell_back:
        shown = "; ".join(f"{name}: {why}" for name, why in list(fell_back.items())[:4])
        lines.append(f"{len(fell_back)} tensor(s) fell back to another type: {shown}" + (" …" if len(fell_back) > 4 else ""))
    return lines


def awq_lines(awq: dict) -> list[str]:
    """What an AWQ search applied and skipped, in words."""
    lines = []
    if awq.get("applied"):
        errors = [entry["error_vs_rtn"] for entry in awq["applied"]]
        kinds = sorted({entry["mapping"].split(" ", 1)[1] for entry in awq["applied"]})
        who = "Phi-aware AWQ" if awq.get("search") == "phi" else "AWQ"
        lines.append(f"{who} applied {len(errors)} mapping(s) ({', '.join(kinds)}); "
                     f"searched output error {min(errors):.2f}–{max(errors):.2f}× RTN's"
                     + (f"; ranges clipped to {min(awq['clip'].values()):.2f}–{max(awq['clip'].values()):.2f} on average"
                        if awq.get("clip") else ""))
    if awq.get("skipped"):
        lines.append(f"AWQ skipped {len(awq['skipped'])} mapping(s): " + "; ".join(awq["skipped"]))
    return lines


def print_summary(report: dict, console: Console) -> None:
    table = Table(title=f"{report['recipe']} — {report['model']}", header_style="bold")
    shown = [(name, cell) for name, cell, terminal in COLUMNS if terminal]
    for name, _ in shown:
        table.add_column(name, no_wrap=name not in ("variant", "format"))
    for row, metrics in summary_rows(report):
        verdict = row["verdict"]
        style = "green" if verdict.startswith("pass") else ("red" if verdict.startswith("fail") else "yellow")
        table.add_row(*(cell(row, metrics) for _, cell in shown), style=style if row["name"] != "baseline" else None)
    console.print(table)
    for line in speed_notes(report)[1:] + recommendation_lines(report) + verdict_lines(report):
        console.print(f"  {line}", highlight=False, soft_wrap=True)


def write_report(out: Path, recipe, info, baseline, outcomes, context, console: Console) -> dict:
    report = build_report(out, recipe, info, baseline, outcomes, context)
    render_files(out, report)
    print_summary(report, console)
    return report


def render_files(out: Path, report: dict) -> None:
    """report.json, report.md and report.html from the report dict alone (`compress report` reuses this)."""
    from compress.report_html import render_html

    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report, summary_rows, COLUMNS, verdict_lines, speed_notes(report)))
