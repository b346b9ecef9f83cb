"""Answers to "which file do I ship?": Pareto fronts, the recommendation, and differences within noise. Pure."""

from __future__ import annotations

import math


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


def recommend(rows: list[dict]) -> dict[str, dict | None]:
    """The smallest and the fastest released artifact that met every gate."""
    shipped = [row for row in rows if row["released"] and row["passed"]]
    return {
        "smallest": min(shipped, key=lambda row: (row["size_bytes"], row["kld"]), default=None),
        "fastest": max((row for row in shipped if row["decode_tps"]), key=lambda row: row["decode_tps"], default=None),
    }


def within_noise(a: dict, b: dict) -> bool:
    """Two KLDs whose difference is within 2 combined standard errors (METRICS.md)."""
    return abs(a["kld"] - b["kld"]) <= 2 * math.hypot(a["kld_se"], b["kld_se"])


def noise_neighbours(rows: list[dict]) -> dict[str, list[str]]:
    """label -> the other artifacts whose KLD it cannot be told apart from."""
    return {row["label"]: [other["label"] for other in rows if other is not row and within_noise(row, other)] for row in rows}
