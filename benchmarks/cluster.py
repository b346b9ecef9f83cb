"""Issue 15's overhead figures: `compress run --cluster` against a local run of the same recipe, side by side.

    python -m benchmarks.cluster [--recipe recipes/tiny-phi4-mini.yaml] [--rounds 2]

Each round runs, in turn: the recipe locally; the recipe on a simulated one-node cluster (`--cluster`, the cluster's
start excluded: compress.cluster.simulate times the command alone); and, in the last round, the recipe on a
simulated two-node cluster with its targets on labelled nodes. Every run gets a fresh baseline cache, so each
does the whole work. Cluster runs happen inside a loopback-only network namespace (unshare -n, root), as the
tests do. Writes benchmarks/results/<date>-<host>-cluster.json and .md; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, environment, log, run_measured

NAMESPACE = ("unshare", "-n", "bash", "-c")
QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/"}


def _local(recipe: Path, out: Path, cache: Path) -> dict:
    measured = run_measured([sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out)], out.parent / f"{out.name}.log",
                            env={"COMPRESS_CACHE": str(cache)})
    return {"seconds": measured["seconds"], "others_cpu": measured["others_cpu"], "returncode": measured["returncode"],
            "report": str(out / "report.json")}


def _on_cluster(recipe: Path, out: Path, cache: Path, nodes: list[str]) -> dict:
    """The recipe on a simulated cluster of `nodes`; the seconds are the compress command's own."""
    simulate = [sys.executable, "-m", "compress.cluster.simulate", *[f"--node={node}" for node in nodes], "--",
                sys.executable, "-m", "compress.cli", "run", str(recipe), "--cluster", "auto", "--out", f"file://{out}"]
    log_file = out.parent / f"{out.name}.log"
    measured = run_measured([*NAMESPACE, "ip link set lo up && exec " + " ".join(simulate)], log_file,
                            env={"COMPRESS_CACHE": str(cache), **QUIET})
    text = log_file.read_text(errors="replace")
    started = re.search(r"started in ([\d.]+) s", text)
    finished = re.search(r"command finished in ([\d.]+) s \(exit code (\d+)\)", text)
    if not finished:
        raise RuntimeError(f"the cluster run did not finish; see {log_file}")
    return {"seconds": float(finished.group(1)), "cluster_start_seconds": float(started.group(1)) if started else None,
            "with_start_seconds": measured["seconds"], "others_cpu": measured["others_cpu"],
            "returncode": int(finished.group(2)), "report": str(out / "report.json")}


def _placed(recipe: Path, folder: Path) -> Path:
    """The recipe with its targets as two places: laptop (required) and edge on labelled nodes, phone on none."""
    text = recipe.read_text()
    places = ("targets:\n  laptop: {device: cpu, required: true, node_labels: {place: laptop}}\n"
              "  edge: {device: cpu, node_labels: {place: edge}}\n  phone: {device: cpu, node_labels: {place: phone}}\n")
    text = re.sub(r"^targets:\n(?:[ \t]+.*\n)+", places, text, flags=re.MULTILINE)
    placed = folder / f"{recipe.stem}-placed.yaml"
    placed.write_text(text)
    return placed


def _figures(report_file: str) -> dict:
    report = json.loads(Path(report_file).read_text())
    return {(v["name"], v["format"], t): {k: r["metrics"].get(k) for k in ("ppl", "kld", "top1")}
            for v in report["variants"] for t, r in v["targets"].items() if r["status"] == "pass"}


def run(recipe: Path, rounds: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        placed = _placed(recipe, folder)
        local, one_node, two_nodes = [], [], None
        for index in range(rounds):
            log(f"round {index + 1}: local run")
            local.append(_local(recipe, folder / f"local-{index}", folder / f"cache-local-{index}"))
            log(f"round {index + 1}: one-node cluster run")
            one_node.append(_on_cluster(recipe, folder / f"one-{index}", folder / f"cache-one-{index}", [":2"]))
        log("two-node cluster run (laptop, edge; phone matches no node)")
        two_nodes = _on_cluster(placed, folder / "two", folder / "cache-two", ["place=laptop:2", "place=edge:2"])
        same = _figures(local[0]["report"]) == _figures(one_node[0]["report"])
        two_report = json.loads(Path(two_nodes["report"]).read_text())
        where = {t: (r.get("environment", {}).get("node", {}).get("labels"), r.get("reason"))
                 for t, r in two_report["baseline"]["targets"].items()}
        ratios = [one["seconds"] / alone["seconds"] for alone, one in zip(local, one_node, strict=True)]
        return {"recipe": str(recipe), "rounds": rounds, "local": local, "one_node": one_node, "two_nodes": two_nodes,
                "one_node_over_local": ratios, "median_ratio": statistics.median(ratios), "same_figures": same,
                "two_node_places": where,
                "two_node_rows": [{"variant": v["name"], "format": v["format"], "target": t, "status": r["status"],
                                   "node": (r.get("environment") or {}).get("node", {}).get("node_id", "")[:12],
                                   "labels": (r.get("environment") or {}).get("node", {}).get("labels"),
                                   "kld": r["metrics"].get("kld"), "why": "; ".join(r["failures"])}
                                  for v in two_report["variants"] for t, r in v["targets"].items()]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def render(results: dict) -> str:
    env = results["meta"]["environment"]
    lines = [f"# --cluster overhead, {results['meta']['date']}", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; load average at start "
             f"{env['load_average_at_start']}. Recipe `{results['recipe']}`; {results['rounds']} round(s), local and "
             "one-node cluster run in turn, each with a fresh baseline cache. Cluster runs: compress.cluster.simulate "
             "in a loopback-only namespace; seconds are the compress command's own (the cluster's start excluded, "
             "shown apart). Others' CPU: the share of the machine's CPU used outside the command's process tree "
             "while it ran; a cluster run's work happens in the nodes' Ray workers, which are outside it.", "",
             "| round | local s | one-node cluster s | ratio | cluster start s | others' CPU (local, cluster) |", "|---|---:|---:|---:|---:|---|"]
    for index, (local, one) in enumerate(zip(results["local"], results["one_node"], strict=True)):
        lines.append(f"| {index + 1} | {local['seconds']:.1f} | {one['seconds']:.1f} | {one['seconds'] / local['seconds']:.3f} | "
                     f"{one['cluster_start_seconds']} | {local['others_cpu']:.0%}, {one['others_cpu']:.0%} |")
    two = results["two_nodes"]
    lines += ["", f"Median ratio {results['median_ratio']:.3f} (target ≤ 1.1). ppl/KLD/top-1 of round 1's local and "
              f"cluster runs identical: {results['same_figures']}.", "",
              f"Two-node simulated run (laptop and edge nodes, 2 CPUs each, on this {env['cores']}-core machine): "
              f"{two['seconds']:.1f} s (cluster start {two['cluster_start_seconds']} s), exit code {two['returncode']}.", "",
              "| variant | format | target | status | node | labels | KLD | why |", "|---|---|---|---|---|---|---:|---|"]
    for row in results["two_node_rows"]:
        kld = "—" if row["kld"] is None else f"{row['kld']:.4g}"
        lines.append(f"| {row['variant']} | {row['format']} | {row['target']} | {row['status']} | {row['node'] or '—'} | "
                     f"{row['labels'] or '—'} | {kld} | {row['why'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-phi4-mini.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args(argv)
    env = environment()
    results = run(options.recipe.resolve(), options.rounds)
    results["meta"] = {"date": date.today().isoformat(), "environment": env,
                       "command": "python -m benchmarks.cluster " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = RESULTS / f"{date.today().isoformat()}-{env['host']}-cluster"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
