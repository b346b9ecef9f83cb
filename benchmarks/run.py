"""Run the benchmarks, write benchmarks/results/<date>-<host>.json and .md, print the Markdown.

    python -m benchmarks.run [--only decode,bandwidth,overhead,scaling] [--layers 2] [--runs 5]
                             [--scaling phi4-mini:1,2,4 --scaling phi4:1,2] [--budget-minutes 30]

A run limited with --only writes <date>-<host>-<names>.json, so it never replaces a full run's file.
A benchmark that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python benchmarks/run.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, log  # noqa: E402
from benchmarks.table import render, targets  # noqa: E402

BENCHMARKS = ("decode", "bandwidth", "overhead", "scaling", "llama-cpp", "fullsize", "awq", "automix")
DEFAULT = ("decode", "bandwidth", "overhead", "scaling", "llama-cpp")  # fullsize, awq, automix (long) run only when asked for


def _plan(values: list[str] | None) -> dict[str, list[int]] | None:
    """['phi4:1,2'] -> {'phi4': [1, 2]}."""
    if not values:
        return None
    plan = {}
    for value in values:
        name, _, counts = value.partition(":")
        plan[name] = [int(count) for count in counts.split(",") if count]
    return plan


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--fullsize-depths", default="1,2,4,8", help="fullsize: Phi-4-width depths to run")
    parser.add_argument("--no-rehearsal", action="store_true", help="fullsize: skip the 32-layer Phi-4-mini rehearsal")
    parser.add_argument("--awq-sizes", default="8x128,256x2048", help="awq: calibration sizes, samples x tokens (the recipes' own is 256x2048)")
    parser.add_argument("--awq-widths", default="phi4-mini,phi4", help="awq: widths to measure")
    parser.add_argument("--fullsize-method", default="gptq", choices=["gptq", "rtn"],
                        help="fullsize: calibration of the depth runs (rtn: the same stages without GPTQ's minutes per layer)")
    parser.add_argument("--automix-layers", type=int, default=2, help="automix: decoder layers of the Phi-4-mini-width model")
    parser.add_argument("--layers", type=int, default=2, help="layers of the Phi-4-mini-width model (2-4)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per speed figure (at least 5)")
    parser.add_argument("--scaling", action="append", help="WIDTH:LAYERS,... (phi4 or phi4-mini), repeatable")
    parser.add_argument("--budget-minutes", type=float, default=30.0,
                        help="the suite's time budget: scaling slices predicted to overrun it are skipped (0: no limit)")
    options = parser.parse_args(argv)
    options.only = [name.strip() for name in options.only.split(",") if name.strip()]
    unknown = set(options.only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(BENCHMARKS)}")
    if options.runs < 5:
        parser.error("--runs: benchmarks take the median of at least 5 runs")
    return options


def run_all(options: argparse.Namespace, started: float) -> dict:
    from benchmarks import automix, awq, bandwidth, decode, fullsize, llama_cpp, overhead, scaling

    # Leave a minute for writing results; a slice predicted to end after this is skipped.
    deadline = started + 60 * options.budget_minutes - 60 if options.budget_minutes else None
    steps = {
        "decode": lambda results: decode.run(options.layers, options.runs),
        "bandwidth": lambda results: bandwidth.run(options.layers, results.get("decode")),
        "overhead": lambda results: overhead.run(options.layers),
        "scaling": lambda results: scaling.run(_plan(options.scaling), deadline),
        "llama-cpp": lambda results: llama_cpp.run(options.layers, options.runs),
        "fullsize": lambda results: fullsize.run([int(d) for d in options.fullsize_depths.split(",") if d.strip()],
                                                 not options.no_rehearsal, method=options.fullsize_method),
        "automix": lambda results: automix.run(options.automix_layers),
        "awq": lambda results: awq.run([tuple(int(n) for n in size.split("x")) for size in options.awq_sizes.split(",") if size.strip()],
                                       [width.strip() for width in options.awq_widths.split(",") if width.strip()]),
    }
    results: dict = {"errors": {}}
    seconds = {}
    for name in BENCHMARKS:
        if name not in options.only:
            continue
        started = time.perf_counter()
        try:
            results[name] = steps[name](results)
        except Exception as error:  # one failed benchmark is reported; the rest still run
            log(f"{name} failed: {error}")
            results["errors"][name] = f"{type(error).__name__}: {error}"
        seconds[name] = round(time.perf_counter() - started, 1)
    results["seconds_by_benchmark"] = seconds
    return results


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    started = time.perf_counter()
    env = environment()
    results = run_all(options, time.monotonic())
    stem = f"{date.today().isoformat()}-{env['host']}"
    if set(options.only) != set(DEFAULT):
        stem += "-" + "-".join(options.only)
    for plan in options.scaling or []:  # phi4:1,2,4 -> -phi4-1-2-4
        stem += "-" + plan.replace(":", "-").replace(",", "-")
    if "fullsize" in options.only:  # -phi4-1-2 for the depths, -rehearsal when it ran
        depths = [d.strip() for d in options.fullsize_depths.split(",") if d.strip()]
        stem += (f"-phi4-{options.fullsize_method}-" + "-".join(depths) if depths else "") + ("" if options.no_rehearsal else "-rehearsal")
    if "awq" in options.only:  # -8x128 when only the small size ran, -phi4 when only that width
        stem += "" if options.awq_sizes == "8x128,256x2048" else "-" + options.awq_sizes.replace(",", "-")
        stem += "" if options.awq_widths == "phi4-mini,phi4" else "-" + options.awq_widths.replace(",", "-")
    results["meta"] = {"date": date.today().isoformat(), "environment": env, "seconds": round(time.perf_counter() - started, 1),
                       "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "options": {key: value for key, value in vars(options).items()}}
    results["targets"] = targets(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = render(results)
    for suffix, text in ((".json", json.dumps(results, indent=1)), (".md", markdown)):
        temporary = RESULTS / f"{stem}{suffix}.tmp"
        temporary.write_text(text)
        temporary.replace(RESULTS / f"{stem}{suffix}")
    print(markdown)
    log(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
