"""Benchmark 5: `compress run` at full width, where memory is real: random-weight checkpoints of Phi-4's and
Phi-4-mini's exact widths (their quality figures mean nothing; their memory and time are real).

    python -m benchmarks.run --only fullsize [--fullsize-depths 1,2,4,8] [--rehearsal/--no-rehearsal]

(a) depth: Phi-4 width (hidden 5120, 40/10 heads, intermediate 17920, vocab 100352, untied), bf16, at each
    depth, one `compress run` of GPTQ W4 g128 -> compressed-tensors and ONNX int4 `from:` it. Peak host memory
    is the largest sum of RSS over the run's whole process tree (../shared/METRICS.md), polled every 0.1 s and
    attributed to the stage running then (by which subprocess is alive: baseline worker, ONNX builder,
    verification worker, or the main process alone: preflight, data, calibration, report). A line over the
    depths gives each stage's growth per layer against one layer's stored bytes, and the 40-layer peak.
(b) rehearsal: Phi-4-mini's exact shape (32 layers, bf16, vocab 200064, tied) through the variants of
    recipes/phi-4-mini-instruct.yaml that issue 11 names, calibration and evaluation cut to fit 2 cores.
(c) prediction: what preflight estimates for the real Phi-4 14B under a 16 GB machine's budget, beside (a)'s
    measured line, and the time per layer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import CACHE, ROOT, log
from benchmarks.maths import linear_fit
from benchmarks.models import FULL_LAYERS, random_model

DEPTHS = (1, 2, 4, 8)
GIB, MIB = 2**30, 2**20
SMALL_MACHINE_GIB = 16  # the machine (c) predicts for: a 16 GB laptop or desktop
BUDGET_GIB = 12  # --max-memory of every run here: what a 16 GB machine leaves (16 less the system and desktop, less the margin)
DEPTH_RECIPE = """name: fullsize-{layers}
model: {model}
calibration: {{dataset: builtin:pydoc-calib, samples: 8, seq_len: 256, seed: 0}}
evaluation: {{dataset: builtin:pydoc-eval, seq_len: 256, windows: 4, prompt_tokens: 64, new_tokens: 8,
             speed_runs: 3, prompts: ["Say hello."], generation_tokens: 8, sensitivity_samples: 1}}
targets: {{cpu: {{required: true}}}}
variants:
  - {{name: {method}, method: {method}, bits: 4, group_size: 128, ignore: [lm_head], formats: [compressed-tensors]}}
  - {{name: onnx-int4-{method}, method: onnx-int4, from: {method}, group_size: 128}}
"""
REHEARSAL_TARGET_MIN = 90  # the target; the run is stopped only well past it, so an overrun is measured
REHEARSAL_TIMEOUT_S = 130 * 60
# The rehearsal's --max-memory is its peak target: preflight keeps every stage within it, and what needs more
# (the compressed-tensors checks' whole model, the GPTQ folder's float32-head graph) is "not verified", as on
# a machine with that much to spare.
REHEARSAL_BUDGET_GIB = 6
REHEARSAL_VARIANTS = ("gptq-w4g128", "onnx-int4-gptq", "onnx-int4-rtn", "onnx-int8")
# GPTQ at 16x512 tokens would add ~40 minutes on 2 cores (the Hessian of down_proj grows with the tokens)
REHEARSAL_CUTS = {"calibration": {"samples": 8, "seq_len": 512},
                  "evaluation": {"windows": 4, "seq_len": 512, "prompt_tokens": 64, "new_tokens": 8, "speed_runs": 3,
                                 "generation_tokens": 16, "sensitivity_samples": 1}}
STAGES = ("main process (preflight, data, calibration, report)", "baseline worker", "ONNX builder", "verification worker")


def _stage_of(children: list[list[str]]) -> str:
    """Which stage a set of living subprocess command lines belongs to."""
    for command in children:
        joined = " ".join(command)
        if "onnxruntime_genai.models.builder" in joined or "compress.export.builder_stream" in joined:
            return STAGES[2]
        if "compress.verify.worker" in joined:
            return STAGES[1] if "/baseline/" in joined else STAGES[3]
    return STAGES[0]


def run_tree(command: list[str], log_file: Path, timeout: float | None = None) -> dict:
    """Run `command`; poll the sum of RSS over its process tree. -> seconds, peak sum, peak per stage, exit code,
    and the share of the machine's CPU other processes used meanwhile."""
    import psutil

    from compress.verify.cpu_share import busy_cpu_seconds, others_share

    environment = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    busy_before, own_cpu = busy_cpu_seconds(), 0.0
    peaks = dict.fromkeys(STAGES, 0)
    main_at_peak = dict.fromkeys(STAGES, 0)  # the main process's own share of each stage's peak
    with log_file.open("w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=environment)
        root = psutil.Process(process.pid)
        cpu_by_pid: dict[int, float] = {}
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                total, commands, main = 0, [], 0
                for member in tree:
                    with member.oneshot():
                        rss = member.memory_info().rss
                        total += rss
                        main = rss if member.pid == root.pid else main
                        times = member.cpu_times()
                        cpu_by_pid[member.pid] = times.user + times.system
                        if member.pid != root.pid:
                            commands.append(member.cmdline())
                stage = _stage_of(commands)
                if total > peaks[stage]:
                    peaks[stage], main_at_peak[stage] = total, main
            except psutil.Error:
                pass
            if timeout and time.perf_counter() - started > timeout:
                process.kill()
            time.sleep(0.1)
        seconds = time.perf_counter() - started
    own_cpu = sum(cpu_by_pid.values())
    others = others_share(busy_cpu_seconds() - busy_before - own_cpu, seconds)
    return {"seconds": round(seconds, 1), "returncode": process.returncode, "log": str(log_file),
            "peak_tree_rss_mb": round(max(peaks.values()) / MIB), "peak_by_stage_mb": {k: round(v / MIB) for k, v in peaks.items()},
            "main_process_at_stage_peak_mb": {k: round(v / MIB) for k, v in main_at_peak.items()},
            "others_cpu": others}


def _compress_run(recipe_text: str, model: Path, name: str, timeout: float | None = None, budget_gib: float = BUDGET_GIB) -> dict:
    folder = CACHE / "fullsize" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(recipe_text)
    command = [sys.executable, "-m", "compress.cli", "run", str(folder / "recipe.yaml"), "--out", str(folder / "run"),
               "--model", str(model), "--max-memory", str(budget_gib)]
    env_cache = {"COMPRESS_CACHE": str(folder / "cache")}
    os.environ.update(env_cache)
    measured = run_tree(command, folder / "run.log", timeout)
    report_file = folder / "run" / "report.json"
    measured["report"] = _summary(json.loads(report_file.read_text())) if report_file.is_file() else None
    for row in measured["report"] or []:
        row["estimate_mb"] = _onnx_estimate_mb(folder / "run", row, model)
    measured["stage_seconds"] = _stage_seconds(Path(measured["log"]).read_text(errors="replace"))
    measured["baseline_layerwise_rss_mb"] = _baseline_layerwise_rss(folder / "run")
    measured["estimates"] = estimates_vs_measured(measured, folder / "recipe.yaml", model, budget_gib)
    measured["calibration"] = {path.parent.name: {k: v for k, v in json.loads(path.read_text()).items() if k in ("seconds", "layers_seconds")}
                               for path in (folder / "run" / "work").glob("*/calibration.json")}
    for heavy in ("release", "staging", "work"):  # ~11 GB a run at Phi-4 width; the report, logs and results stay
        shutil.rmtree(folder / "run" / heavy, ignore_errors=True)
    return measured


def estimates_vs_measured(measured: dict, recipe_file: Path, model: Path, budget_gib: float) -> list[dict]:
    """Preflight's estimate of each stage beside the peak measured for it: the baseline worker's own peak after its
    layer-by-layer pass and its whole (the tree's less the main process's share), the main process's (calibration),
    the builder's (likewise), each verification worker's own (from the report). Stages that did not fit did not run."""
    from compress import memory
    from compress.model import inspect_model
    from compress.recipe import load_recipe

    estimates = memory.run_estimates(inspect_model(str(model)), load_recipe(recipe_file), int(budget_gib * GIB))
    peaks, mains = measured["peak_by_stage_mb"], measured.get("main_process_at_stage_peak_mb", {})
    workers = {(row["name"], row["format"]): row.get("peak_rss_mb") for row in measured.get("report") or []}
    rows = []
    for stage, (needed, _) in estimates.items():
        if stage.startswith("baseline accuracy"):
            peak = measured.get("baseline_layerwise_rss_mb")
        elif stage.startswith("calibration,"):
            peak = peaks[STAGES[0]]
        elif stage.startswith("ONNX build"):
            peak = peaks[STAGES[2]] - mains.get(STAGES[2], 0) or None
        elif stage.endswith(" in onnxruntime-genai"):
            name, _, fmt = stage.removesuffix(" in onnxruntime-genai").partition(" (")
            peak = workers.get((name, fmt.rstrip(")") or "onnx"))
        elif stage.startswith("compressed-tensors checks"):
            peak = max((mb for (_, fmt), mb in workers.items() if fmt == "compressed-tensors" and mb), default=None)
        else:  # the baseline's worker, with the whole model where it fits
            peak = peaks[STAGES[1]] - mains.get(STAGES[1], 0) or None
        if needed <= budget_gib * GIB and peak:
            rows.append({"stage": stage, "estimate_gib": round(needed / GIB, 2), "measured_gib": round(peak / 1024, 2)})
    return rows


def _onnx_estimate_mb(run: Path, row: dict, model: Path) -> float | None:
    """What preflight's onnxruntime-genai estimate said for an artifact verified in it (a GPTQ v1 folder
    through its float32-compute build), to set beside the worker's measured peak."""
    from compress import memory
    from compress.model import inspect_model
    from compress.verify.size import onnx_weight_bytes

    graph = run / "work" / row["name"] / "gptq-onnx-cpu" if row["format"] == "gptq" else run / "staging" / row["name"] / row["format"]
    if row["format"] == "onnx" and row["released"]:
        graph = run / "release" / row["name"] / row["format"]
    if not (graph / "model.onnx").is_file():
        return None
    recipe = yaml.safe_load((run.parent / "recipe.yaml").read_text())
    needed = memory.onnx_runtime(onnx_weight_bytes(graph), memory.Shapes.from_info(inspect_model(str(model))),
                                 recipe["evaluation"]["seq_len"])
    return round(needed / MIB, 1)


def _baseline_layerwise_rss(run: Path) -> float | None:
    """The baseline worker's own peak after its layer-by-layer pass (before any whole model is loaded)."""
    result = run / "baseline" / "cpu.result.json"
    return json.loads(result.read_text())["metrics"].get("peak_rss_mb_layerwise") if result.is_file() else None


def _stage_seconds(output: str) -> dict[str, float]:
    """'✓ 3. Baseline  ...  (69.2 s)' lines -> {'Baseline': 69.2}."""
    import re

    found = {}
    for match in re.finditer(r"^✓ \d\. ([A-Za-z ,]+?)  .*\(([\d.]+) s\)\s*$", output, re.MULTILINE):
        found[match.group(1)] = float(match.group(2))
    return found


def _summary(report: dict) -> list[dict]:
    rows = []
    for variant in report["variants"]:
        cpu = variant["targets"].get("cpu", {})
        rows.append({"name": variant["name"], "format": variant["format"], "released": variant["released"],
                     "status": cpu.get("status"), "reason": cpu.get("reason"), "size_mb": round(variant["size_bytes"] / MIB, 1),
                     "kld": (cpu.get("metrics") or {}).get("kld"), "peak_rss_mb": (cpu.get("metrics") or {}).get("peak_rss_mb")})
    return rows


def _main_share(run: dict, stage: str) -> str:
    main = run.get("main_process_at_stage_peak_mb", {}).get(stage)
    return f" (main process {main / 1024:.2f} of it)" if main and stage != STAGES[0] else ""


def fit_depths(rows: list[dict]) -> dict:
    """Least-squares growth per layer of each stage's peak, over the depths whose run produced a report."""
    done = [row for row in rows if "skipped" not in row and row["returncode"] in (0, 1) and row["report"]]
    if len(done) < 2:
        return {}
    fits = {}
    layer_bytes = (done[-1]["stored_bytes"] - done[0]["stored_bytes"]) / (done[-1]["layers"] - done[0]["layers"])
    # (layers, peak) per stage, over the depths where that stage ran (a build refused for memory did not)
    # Stages that load a whole model where it fits the budget (baseline speed, compressed-tensors checks) change
    # regime between depths: their peaks are in the table, not fitted. The rest ran at every depth they fit.
    series = {stage: [(row["layers"], row["peak_by_stage_mb"][stage]) for row in done if row["peak_by_stage_mb"][stage]]
              for stage in (STAGES[0], STAGES[2])}
    series["baseline layer-by-layer pass (its worker alone)"] = [(row["layers"], row["baseline_layerwise_rss_mb"])
                                                                 for row in done if row.get("baseline_layerwise_rss_mb")]
    for stage, points in series.items():
        if len({layers for layers, _ in points}) < 2:
            continue
        intercept, slope = linear_fit([layers for layers, _ in points], [peak for _, peak in points])
        fits[stage] = {"mb_per_layer": round(slope, 1), "share_of_layer_bytes": round(slope * MIB / layer_bytes, 3),
                       "at_40_layers_gib": round((intercept + slope * FULL_LAYERS["phi4"]) / 1024, 2),
                       "depths": [layers for layers, _ in points]}
    fits["layer_stored_mb"] = round(layer_bytes / MIB, 1)
    fits["depths"] = [row["layers"] for row in done]
    return fits


def depth_scaling(depths=DEPTHS, deadline: float | None = None, method: str = "gptq") -> dict:
    """(a) at each depth; `method` rtn measures the same stages without GPTQ's minutes per layer."""
    from compress.model import inspect_model

    rows = []
    for layers in depths:
        model = random_model("phi4", layers, "bf16", pool_layers=max(depths))
        if deadline and rows and time.monotonic() + 1.5 * rows[-1]["seconds"] * layers / rows[-1]["layers"] > deadline:
            log(f"fullsize: skipping {layers} layers (would overrun the time budget)")
            rows.append({"layers": layers, "skipped": "time budget"})
            continue
        log(f"fullsize: Phi-4 width, {layers} layer(s)")
        measured = _compress_run(DEPTH_RECIPE.format(layers=layers, model=model, method=method), model, f"phi4-{method}-{layers}L")
        info = inspect_model(str(model))
        rows.append({"layers": layers, "method": method, "stored_bytes": info.weight_bytes, **measured})
    return {"method": method, "rows": rows, "fits": fit_depths(rows)}


def rehearsal(timeout: float | None = None, method: str = "gptq") -> dict:
    """(b). With `method` rtn, the GPTQ variant calibrates with RTN instead (renamed so, and the ONNX variant
    carrying its weights too): every stage runs at full size but GPTQ's minutes per layer."""
    recipe = yaml.safe_load((ROOT / "recipes" / "phi-4-mini-instruct.yaml").read_text())
    recipe["name"] = "rehearsal-phi-4-mini"
    for section, cuts in REHEARSAL_CUTS.items():
        recipe[section].update(cuts)
    recipe["variants"] = [variant for variant in recipe["variants"] if variant["name"] in REHEARSAL_VARIANTS]
    if method == "rtn":
        for variant in recipe["variants"]:
            if variant["name"] == "gptq-w4g128":
                variant.update(name="rtn-w4g128", method="rtn")
            if variant.get("from") == "gptq-w4g128":
                variant.update(name="onnx-int4-from-rtn", **{"from": "rtn-w4g128"})
    recipe["gates"] = {}  # random weights: quality gates mean nothing here
    model = random_model("phi4-mini", FULL_LAYERS["phi4-mini"], "bf16")
    log("fullsize: rehearsal, Phi-4-mini exact shape (32 layers, bf16)")
    measured = _compress_run(yaml.safe_dump(recipe, sort_keys=False), model, "rehearsal-phi4-mini", timeout, REHEARSAL_BUDGET_GIB)
    return {"budget_gib": REHEARSAL_BUDGET_GIB, "cuts": REHEARSAL_CUTS, "variants": [variant["name"] for variant in recipe["variants"]], "method": method, **measured}


def prediction(depth: dict) -> dict:
    """Preflight's estimates for the real Phi-4 14B (40 layers, bf16) under a 16 GB machine's budget."""
    from compress import memory
    from compress.model import ModelInfo
    from compress.recipe import load_recipe

    one = random_model("phi4", 1, "bf16")
    config = json.loads((one / "config.json").read_text())
    config["num_hidden_layers"] = FULL_LAYERS["phi4"]
    shapes_1 = memory.Shapes.from_info(_info(one))
    parameters = shapes_1.parameters + (FULL_LAYERS["phi4"] - 1) * shapes_1.layer_parameters
    info = ModelInfo("microsoft/phi-4 (predicted)", one, config, parameters, 2 * parameters, "BF16")
    budget = SMALL_MACHINE_GIB * GIB - memory.MARGIN
    recipe = load_recipe(ROOT / "recipes" / "phi-4.yaml")
    estimates = {name: {"gib": round(needed / GIB, 2), "fits": needed <= budget, "required": required}
                 for name, (needed, required) in memory.run_estimates(info, recipe, budget).items()}
    done = [row for row in depth.get("rows", []) if "calibration" in row and row.get("calibration")]
    per_layer = [seconds for row in done for seconds in row["calibration"].get("gptq", {}).get("layers_seconds", [])]
    # measured GPTQ seconds per Phi-4-width layer, when the depth run used GPTQ
    return {"budget_gib": round(budget / GIB, 2), "parameters": parameters, "estimates": estimates,
            "gptq_seconds_per_layer_measured": round(sorted(per_layer)[len(per_layer) // 2], 1) if per_layer else None,
            "calibration_tokens_measured": "8×256"}


def _info(folder: Path):
    from compress.model import inspect_model

    return inspect_model(str(folder))


def run(depths=DEPTHS, with_rehearsal: bool = True, deadline: float | None = None, method: str = "gptq") -> dict:
    results = {"budget_gib": BUDGET_GIB, "depth": depth_scaling(depths, deadline, method)}
    results["prediction"] = prediction(results["depth"])
    if with_rehearsal:
        results["rehearsal"] = rehearsal(timeout=REHEARSAL_TIMEOUT_S, method=method)
    return results


def _estimate_ratios(rows: list[dict]) -> list[str]:
    """Preflight's estimate ÷ the measured peak, a row per stage and a column per depth."""
    if not rows:
        return []
    stages = list(dict.fromkeys(pair["stage"] for row in rows for pair in row["estimates"]))
    ratios = [{pair["stage"]: pair["estimate_gib"] / pair["measured_gib"] for pair in row["estimates"]} for row in rows]
    return ["", "Preflight's estimate ÷ measured peak (target 0.75-1.25):", "",
            "| stage | " + " | ".join(f"{row['layers']} layers" for row in rows) + " |", "|---|" + "---:|" * len(rows),
            *(f"| {stage} | " + " | ".join(f"{ratio[stage]:.2f}" if stage in ratio else "—" for ratio in ratios) + " |" for stage in stages)]


def markdown(results: dict) -> list[str]:
    """The report section: peak by depth and stage, the fitted growth, the rehearsal, the prediction."""
    lines = ["## Full size: memory of `compress run` by depth and stage", "",
             f"Every run with `--max-memory {results['budget_gib']}` (what a 16 GB machine leaves). Peak = largest sum of RSS "
             "over the run's process tree, by the stage running then.", "",
             f"Calibration method: {results['depth'].get('method', 'gptq')}.", "",
             "| layers | stored GiB | peak GiB | " + " | ".join(STAGES) + " | wall s | calibration s/layer | others' CPU |",
             "|---:|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|---:|"]
    for row in results["depth"]["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['layers']} | skipped: {row['skipped']} |")
            continue
        per_layer = row.get("calibration", {}).get(row.get("method", "gptq"), {}).get("layers_seconds") or []
        lines.append(f"| {row['layers']} | {row['stored_bytes'] / GIB:.2f} | {row['peak_tree_rss_mb'] / 1024:.2f} | "
                     + " | ".join(f"{row['peak_by_stage_mb'][stage] / 1024:.2f}" for stage in STAGES)
                     + f" | {row['seconds']:.0f} | {sum(per_layer) / max(len(per_layer), 1):.0f} | {row['others_cpu']:.2f} |")
    lines += _estimate_ratios([row for row in results["depth"]["rows"] if row.get("estimates")])
    fits = results["depth"].get("fits") or {}
    if fits:
        lines += ["", f"Growth per added layer (one layer stores {fits['layer_stored_mb']} MiB; target ≤ 10%):", ""]
        for stage, fit in fits.items():
            if isinstance(fit, dict):
                lines.append(f"- {stage}: {fit['mb_per_layer']} MiB per layer ({100 * fit['share_of_layer_bytes']:.1f}% of a "
                             f"layer's stored bytes); at 40 layers {fit['at_40_layers_gib']} GiB "
                             f"(depths {', '.join(map(str, fit.get('depths', [])))})")
    if "rehearsal" in results:
        rehearsal = results["rehearsal"]
        lines += ["", "### Rehearsal: Phi-4-mini's exact shape (32 layers, bf16), variants " + ", ".join(rehearsal["variants"]), "",
                  f"Cut to fit 2 cores: {json.dumps(rehearsal['cuts'])}. Exit {rehearsal['returncode']}, {rehearsal['seconds'] / 60:.1f} min (target ≤ {REHEARSAL_TARGET_MIN}), "
                  f"peak {rehearsal['peak_tree_rss_mb'] / 1024:.2f} GiB (target ≤ 6): "
                  + ", ".join(f"{stage} {mb / 1024:.2f}" + _main_share(rehearsal, stage) for stage, mb in rehearsal["peak_by_stage_mb"].items())
                  + f". Run with `--max-memory {rehearsal.get('budget_gib', BUDGET_GIB)}`.", "",
                  "Stage times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in rehearsal["stage_seconds"].items()), ""]
        if rehearsal.get("estimates"):
            lines += ["Preflight's estimate of each stage that ran beside its measured peak (the ONNX builds: the largest):", "",
                      "| stage | estimate GiB | measured GiB | estimate ÷ measured |", "|---|---:|---:|---:|"]
            lines += [f"| {row['stage']} | {row['estimate_gib']:.2f} | {row['measured_gib']:.2f} | "
                      f"{row['estimate_gib'] / row['measured_gib']:.2f} |" for row in rehearsal["estimates"]]
            lines.append("")
        for row in rehearsal.get("report") or []:
            measured = row.get("peak_rss_mb")
            estimate = row.get("estimate_mb")
            memory = (f"; verification worker {measured / 1024:.2f} GiB, onnxruntime-genai estimate {estimate / 1024:.2f} "
                      f"({100 * (estimate / measured - 1):+.0f}%)" if measured and estimate else "")
            lines.append(f"- {row['name']}/{row['format']}: {row['status']}{' (' + row['reason'] + ')' if row['reason'] else ''}, "
                         f"{row['size_mb']} MiB, released: {row['released']}{memory}")
    prediction = results.get("prediction")
    if prediction:
        lines += ["", f"### Prediction: Phi-4 14B under a {prediction['budget_gib']} GiB budget (preflight's estimates)", ""]
        for name, estimate in prediction["estimates"].items():
            verdict = "fits" if estimate["fits"] else ("refused" if estimate["required"] else "not verified")
            lines.append(f"- {name}: {estimate['gib']} GiB — {verdict}")
        if prediction.get("gptq_seconds_per_layer_measured"):
            lines.append(f"- GPTQ: {prediction['gptq_seconds_per_layer_measured']} s per layer measured at "
                         f"{prediction['calibration_tokens_measured']} calibration tokens (scales with tokens)")
    return lines + [""]


def merge(files: list[Path]) -> dict:
    """One fullsize result from several runs' JSON files (depth rows joined and refitted; the last rehearsal
    and prediction kept), for depths run in separate invocations."""
    merged: dict = {"depth": {"rows": []}}
    for file in files:
        results = json.loads(Path(file).read_text())
        fullsize = results["fullsize"]
        merged["budget_gib"] = fullsize["budget_gib"]
        merged["depth"]["method"] = fullsize["depth"].get("method", "gptq")
        merged["depth"]["rows"] += [row for row in fullsize["depth"]["rows"] if row.get("report")]
        for key in ("rehearsal", "prediction"):
            if fullsize.get(key):
                merged[key] = fullsize[key]
        merged["meta"], merged["environment"] = results["meta"], results["meta"]["environment"]
    merged["depth"]["rows"].sort(key=lambda row: row["layers"])
    merged["depth"]["fits"] = fit_depths(merged["depth"]["rows"])
    merged["prediction"] = prediction(merged["depth"])  # with today's estimates
    return merged


if __name__ == "__main__":
    # python -m benchmarks.fullsize merge A.json B.json OUT_STEM: join depth runs made separately
    if len(sys.argv) > 2 and sys.argv[1] == "merge":
        from benchmarks.common import RESULTS

        merged = merge([Path(name) for name in sys.argv[2:-1]])
        stem = RESULTS / sys.argv[-1]
        meta = merged.pop("meta")
        merged.pop("environment")
        (stem.with_suffix(".json")).write_text(json.dumps({"fullsize": merged, "meta": meta}, indent=1))
        (stem.with_suffix(".md")).write_text("\n".join(markdown(merged)))
        print("\n".join(markdown(merged)))
    else:
        print(json.dumps(run(), indent=1))
