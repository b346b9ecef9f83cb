"""Answers to "which file do I ship?": Pareto fronts, the recommendation, and differences within noise. Pure."""

from __future__ import annotations

import math

from compress.verify.cpu_share import BUSY


def artifact_rows(report: dict, target: str = "cpu") -> list[dict]:
    """One dict per artifact measured on `target`: label, size, KLD with its se, decode speed, released."""
    rows = []
    for variant in report["variants"]:
        result = variant["targets"].get(target, {})
        metrics = result.get("metrics") or {}
        if "kld" not in metrics:
            continue
        rows.append({
            "label": f"{variant['name']} ({variant['format']})", "size_bytes": variant["size_bytes"],
            "kld": metrics["kld"], "kld_se": metrics.get("kld_se", 0.0), "decode_tps": metrics.get("decode_tps"),
            "busy": (metrics.get("others_cpu") or 0.0) > BUSY,
            "released": variant["released"], "passed": result.get("status") == "pass",
        })
    return rows


def pareto_front(points: list[tuple[float, float]], maximise_x: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (lower y; lower x, or higher if maximise_x)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0] if maximise_x else points[i][0], points[i][1]))
    front, best = [], math.inf
    for index in order:
        if points[index][1] < best:
            front.append(index)
            best = points[index][1]
    return front


SIZE_SLACK = 1.1  # an artifact this much larger may be chosen when its KLD is clearly better
RULE = (f"the smallest released artifact on the size–KLD Pareto front whose KLD is within noise (2 combined standard "
        f"errors) of the best KLD among released artifacts at most {SIZE_SLACK:g}× its size")


def recommend(rows: list[dict]) -> dict[str, dict | None]:
    """The recommended, the smallest and the fastest released artifact that met every gate (RULE says how the
    recommended one is chosen: a few percent of size never buys a much worse KLD)."""
    shipped = [row for row in rows if row["released"] and row["passed"]]
    front = [shipped[i] for i in pareto_front([(row["size_bytes"], row["kld"]) for row in shipped])]
    recommended = next((row for row in front if within_noise(row, min(
        (other for other in shipped if other["size_bytes"] <= SIZE_SLACK * row["size_bytes"]), key=lambda o: o["kld"]))), None)
    return {
        "recommended": recommended,
        "smallest": min(shipped, key=lambda row: (row["size_bytes"], row["kld"]), default=None),
        "fastest": max((row for row in shipped if row["decode_tps"]), key=lambda row: row["decode_tps"], default=None),
    }


def within_noise(a: dict, b: dict) -> bool:
    """Two KLDs whose difference is within 2 combined standard errors (METRICS.md)."""
    return abs(a["kld"] - b["kld"]) <= 2 * math.hypot(a["kld_se"], b["kld_se"])


def noise_neighbours(rows: list[dict]) -> dict[str, list[str]]:
    """label -> the other artifacts whose KLD it cannot be told apart from."""
    return {row["label"]: [other["label"] for other in rows if other is not row and within_noise(row, other)] for row in rows}


def recommendation_lines(report: dict) -> list[str]:
    """The recommendation with its rule in one sentence, then the smallest and the fastest beside it; nothing
    where there is nothing to choose between (`compress verify` of one folder)."""
    rows = artifact_rows(report)
    choice = recommend(rows)
    if len(rows) < 2:
        return []
    if choice["recommended"] is None:
        return ["No released artifact met every gate, so none is recommended."]

    def described(row: dict) -> str:
        speed = "" if row["decode_tps"] is None else f", {row['decode_tps']:.0f} tok/s" + (" †" if row.get("busy") else "")
        return f"{row['label']}: {row['size_bytes'] / 2**20:.2f} MiB, KLD {row['kld']:.3g} ± {row['kld_se']:.2g}{speed}"

    lines = [f"Recommended: {described(choice['recommended'])} — {RULE}."]
    for kind in ("smallest", "fastest"):
        row = choice[kind]
        if row is not None:
            lines.append(f"{kind.capitalize()}: " + ("the recommended one" if row is choice["recommended"] else described(row)) + ".")
    return lines
