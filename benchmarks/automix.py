"""The cost of an auto variant's choosing at Phi-4-mini width (issue 14):

    python -m benchmarks.run --only automix [--automix-layers 2]

Random bf16 weights at Phi-4-mini width (benchmarks/models.py), a few decoder layers and the full 200k-vocabulary
head. Each stage runs in a fresh process (benchmarks.probe automix), as `compress run` runs it: the candidate
calibrations (GPTQ, the default base; the head quantized too, as auto variants have it), the sensitivity pass
(compress.quantize.sensitivity.candidate_predictions: the forward, the backward from the head down, every
candidate's second-order KLD), the float model's top-64 reference on the selection slice, one plan's
measured KLD (uniform 4g128, head included), and for a GGUF auto variant the float GGUF with its --pure
candidates and their sensitivity pass (the embedding's term too). Random weights make the KLDs meaningless; the time and memory
are real, and the depth's share of them grows linearly.
"""

from __future__ import annotations

import json

from benchmarks.common import CACHE, log, probe, threads
from benchmarks.models import random_model

CANDIDATES = ("3g64", "3g128", "4g64", "4g128", "5g64", "6g128", "8g128")  # the default menu (compress.recipe)
GGUF_CANDIDATES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")  # a GGUF auto variant's default menu
SELECTION = (8, 512)  # windows x tokens: 8 windows, as auto variants choose on, of a 512-token calibration length
CALIBRATION = (8, 512)
BUDGET_GIB = 12


def run(layers: int = 2) -> dict:
    model = random_model("phi4-mini", layers, "bf16")
    root = CACHE / "jobs" / f"automix-{layers}L"
    base = {"model": str(model), "root": str(root), "selection": list(SELECTION), "calibration": list(CALIBRATION),
            "budget_gib": BUDGET_GIB, "threads": threads(), "candidates": list(CANDIDATES), "gguf_candidates": list(GGUF_CANDIDATES)}
    stages = []
    for name in CANDIDATES:
        job_name = f"automix-{layers}L-{name}"
        earlier = CACHE / "jobs" / f"{job_name}.result.json"
        if (root / name / "config.json").is_file() and earlier.is_file():  # calibrated by an earlier run: its figures
            log(f"automix: candidate {name} calibrated before; its earlier figures are reported")
            result = json.loads(earlier.read_text())
            process = earlier.with_suffix(".process.json")
            result["process"] = json.loads(process.read_text()) if process.is_file() else {"peak_rss_mb": result["peak_rss_mb"], "others_cpu": None}
            stages.append(_stage(result, f"calibrate {name} (gptq, an earlier run's)"))
            continue
        log(f"automix: calibrating candidate {name} (gptq, {layers} layers and the head)")
        result = probe("automix", {**base, "stage": "calibrate", "candidate": name}, job_name)
        earlier.with_suffix(".process.json").write_text(json.dumps(result["process"]))
        stages.append(_stage(result, f"calibrate {name} (gptq)"))
    for stage, what in (("predict", f"sensitivity pass, {len(CANDIDATES)} candidates"), ("reference", "float top-64 reference"),
                        ("plan", "one plan measured (uniform 4g128)"),
                        ("gguf-candidates", f"GGUF: float file and {len(GGUF_CANDIDATES)} --pure candidates (llama-quantize)"),
                        ("gguf-predict", f"GGUF: sensitivity pass, {len(GGUF_CANDIDATES)} candidates")):
        log(f"automix: {what}")
        stages.append(_stage(probe("automix", {**base, "stage": stage}, f"automix-{layers}L-{stage}"), what))
    return {"layers": layers, "selection": list(SELECTION), "calibration": list(CALIBRATION), "stages": stages}


def _stage(result: dict, what: str) -> dict:
    return {"stage": what, "seconds": round(result["seconds"], 1), "peak_rss_mb": round(result["process"]["peak_rss_mb"], 1),
            "others_cpu": result["process"]["others_cpu"], **{key: result[key] for key in ("predicted", "measured") if key in result}}


def markdown(results: dict) -> list[str]:
    windows, tokens = results["selection"]
    lines = [f"## Auto variant's choosing at Phi-4-mini width ({results['layers']} layers, the 200k head)", "",
             f"Selection slice {windows} × {tokens} tokens; candidates calibrated on {results['calibration'][0]} × "
             f"{results['calibration'][1]}. Each stage in its own process.", "",
             "| stage | seconds | peak RSS MiB | others' CPU |", "|---|---|---|---|"]
    lines += [f"| {row['stage']} | {row['seconds']} | {row['peak_rss_mb']} | "
              f"{'not recorded' if row['others_cpu'] is None else format(row['others_cpu'], '.2f')} |" for row in results["stages"]]
    return lines + [""]
