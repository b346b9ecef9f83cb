"""report.html: one self-contained page (plots embedded as PNG, no network) to choose an artifact from."""

from __future__ import annotations

import base64
import html
import io
import math

from compress.tradeoff import artifact_rows, noise_neighbours, pareto_front, recommendation_lines

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0} td.l{text-align:left}
tr.pass td{background:#eefaee} tr.fail td{background:#fbeaea} tr.nv td{background:#fff8e1}
.rec{font-size:1.2em;padding:.6em 1em;background:#eef4ff;border-left:4px solid #36c}
.plots img{max-width:48%;margin-right:1%}
small{color:#666}
"""


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plot(rows: list[dict], x_key: str, x_label: str, maximise_x: bool, gates: dict, baseline_size: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    points = [(row[x_key] / (2**20 if x_key == "size_bytes" else 1), row["kld"]) for row in rows]
    front = set(pareto_front(points, maximise_x))
    for index, (row, (x, y)) in enumerate(zip(rows, points, strict=True)):
        colour = "tab:green" if row["passed"] else "tab:red"
        axes.errorbar(x, y, yerr=2 * row["kld_se"], fmt="o", color=colour, ms=9 if index in front else 6,
                      mec="black" if index in front else colour, capsize=2)
        axes.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ordered = sorted(front, key=lambda i: points[i][0])
    axes.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "--", color="black", lw=1,
              label="Pareto front")
    if gates.get("max_kld") is not None:
        axes.axhline(gates["max_kld"], color="tab:red", lw=1, ls=":", label=f"max_kld {gates['max_kld']:g}")
    if x_key == "size_bytes" and gates.get("max_size_ratio") is not None:
        limit = gates["max_size_ratio"] * baseline_size / 2**20
        axes.axvline(limit, color="tab:orange", lw=1, ls=":", label=f"max_size_ratio {gates['max_size_ratio']:g}")
    positive = [y for _, y in points if y > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_yscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel("KLD vs baseline (nats/token, ±2 se)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes else ""
        cells = "".join(f'<td{" class=l" if col < 3 else ""}>{html.escape(cell)}</td>' for col, cell in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict, summary_rows, columns, verdict_lines, speed_notes: list[str]) -> str:
    """The page; the table's columns, rows and notes come from report.py so the Markdown and HTML agree."""
    rows = artifact_rows(report)
    neighbours = noise_neighbours(rows)
    gates = report.get("gates", {})
    baseline_size = report["baseline"]["size_bytes"]
    recommendation = "<br>".join(html.escape(line) for line in recommendation_lines(report))
    header = [name for name, _, _ in columns] + ["KLD within noise of"]
    table, classes = [], []
    for row, metrics in summary_rows(report):
        cells = [cell(row, metrics) for _, cell, _ in columns]
        key = f"{row['name']} ({row['format']})"
        cells.append(", ".join(neighbours.get(key, [])) if row.get("target") == "cpu" else "")
        table.append(cells)
        verdict = row["verdict"]
        classes.append("pass" if verdict.startswith("pass") else "fail" if verdict.startswith("fail") else "nv")
    plots = ""
    if rows:
        size_plot = _plot(rows, "size_bytes", "size on disk (MiB)", False, gates, baseline_size)
        speed_plot = _plot(rows, "decode_tps", "decode tokens/s (CPU)", True, gates, baseline_size)
        plots = (f'<div class="plots"><img alt="size vs KLD" src="data:image/png;base64,{size_plot}">'
                 f'<img alt="decode speed vs KLD" src="data:image/png;base64,{speed_plot}"></div>')
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['recipe'])} — compress report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(report['recipe'])}</h1>",
        f"<p>Model <code>{html.escape(report['model'])}</code> ({report['model_parameters'] / 1e6:.1f}M parameters). "
        f"Every figure was measured on the exported artifact, loaded from disk in its own runtime and process.</p>",
        f'<p class="rec">{recommendation}</p>',
        "<h2>Summary</h2>", _table(header, table, classes),
        f"<p><small>{html.escape(report['kld_note'])} ± is one standard error over evaluation windows; two artifacts "
        "whose KLDs differ by less than two combined standard errors are within noise.</small></p>",
        *(f"<p><small>{html.escape(note)}</small></p>" for note in speed_notes),
        "<h2>Trade-off (CPU)</h2>", plots or "<p>No artifact was measured on the CPU.</p>",
        "<p><small>Green passed every gate, red failed one; ringed points are on the Pareto front; dotted lines are "
        "the gates.</small></p>",
        "<h2>Verdicts</h2><ul>", *(f"<li>{html.escape(line)}</li>" for line in verdict_lines(report)), "</ul>",
        _sensitivity(report),
        f"<p><small>Versions: {html.escape(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}</small></p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _sensitivity(report: dict) -> str:
    """Per variant, each quantized layer's output SQNR against the original on calibration data, worst first."""
    sections, seen = [], set()
    for variant in report["variants"]:
        rows = variant.get("sensitivity")
        if not rows or variant["name"] in seen:
            continue
        seen.add(variant["name"])
        cells = [[row["layer"], str(row["bits"]), "∞" if math.isinf(row["sqnr_db"]) else f"{row['sqnr_db']:.1f}"] for row in rows]
        sections.append(f"<h3>{html.escape(variant['name'])}</h3>" + _table(["layer", "bits", "SQNR dB"], cells))
    if not sections:
        return ""
    return ("<h2>Per-layer sensitivity</h2><p><small>Output SQNR of each quantized layer against the original, on the "
            "original model's calibration activations; worst first. Higher is better; each bit adds about 6 dB."
            "</small></p>" + "".join(sections))
