"""Benchmark 3: what our machinery costs on top of the libraries it drives.

    python -m benchmarks.overhead [--layers 2]

Quantization: `compress run` (the real CLI, a fresh process, a fresh baseline cache) with one GPTQ
variant on the embedded model, against bare llm-compressor `oneshot` (GPTQModifier W4A16, lm_head
ignored: the same scheme) on the same model and the same calibration tokens, run before and after it
(their mean is the reference; their spread shows the machine's drift). Two comparisons:
  - quantize stage: the run's own oneshot seconds (work/<variant>/calibration.json) vs bare oneshot
    seconds — like with like, the target (≤ 1.15×);
  - whole: the run's wall time and peak RSS vs the bare script's (load, oneshot, save). The run also
    tokenizes, evaluates the baseline, exports, verifies and reports, so this ratio is context, not a target.
Verification: compress.verify.worker's perplexity/KLD pass over the ONNX int4 artifact of the wide model
(result seconds.evaluate) vs onnxruntime-genai's bare forward passes over the same windows (≤ 1.3×).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile

import numpy as np

from benchmarks.artifacts import onnx_artifact
from benchmarks.common import CACHE, log, probe, run_measured
from benchmarks.maths import ratio

VARIANT = "gptq-w4g128"
CALIBRATION = {"dataset": "builtin:pydoc-calib", "samples": 32, "seq_len": 256, "seed": 0}
RECIPE = f"""name: bench-overhead
model: builtin:tiny-phi4-mini
calibration: {json.dumps(CALIBRATION)}
evaluation: {{dataset: builtin:pydoc-eval, seq_len: 256, windows: 8}}
targets: {{cpu: {{required: true}}}}
variants:
  - {{name: {VARIANT}, method: gptq, bits: 4, group_size: 128, symmetric: true, ignore: [lm_head]}}
"""
VERIFY = {"windows": 4, "seq_len": 256, "top_k": 64}


def calibration_tokens() -> np.ndarray:
    """The calibration samples `compress run` makes from RECIPE (compress.data, the same seed)."""
    from transformers import AutoTokenizer

    from compress.data import calibration_samples, load_documents, token_stream
    from compress.model import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-phi4-mini"))
    tokenizer.model_max_length = 1 << 30
    stream = token_stream(load_documents(CALIBRATION["dataset"]), tokenizer)
    return calibration_samples(stream, CALIBRATION["seq_len"], CALIBRATION["samples"], CALIBRATION["seed"])


def quantization() -> dict:
    from compress.model import resolve_model

    folder = CACHE / "overhead"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    np.save(folder / "samples.npy", calibration_tokens())
    job = {"model": str(resolve_model("builtin:tiny-phi4-mini")), "samples": str(folder / "samples.npy")}
    # Bare oneshot before and after the run, so drift on a shared machine shows as their spread.
    log("overhead: bare llm-compressor oneshot on builtin:tiny-phi4-mini")
    bare = [probe("oneshot", {**job, "out": str(folder / "bare-out-1")}, "oneshot-bare-1")]
    (folder / "recipe.yaml").write_text(RECIPE)
    log("overhead: compress run (CLI) on the same model and calibration tokens")
    with tempfile.TemporaryDirectory(prefix="bench-compress-cache-") as cache:
        run = run_measured([sys.executable, "-m", "compress.cli", "run", str(folder / "recipe.yaml"), "--out", str(folder / "run")],
                           folder / "compress-run.log", env={"COMPRESS_CACHE": cache, "COLUMNS": "160"})
    log("overhead: bare llm-compressor oneshot again")
    bare.append(probe("oneshot", {**job, "out": str(folder / "bare-out-2")}, "oneshot-bare-2"))
    calibration = json.loads((folder / "run" / "work" / VARIANT / "calibration.json").read_text())
    oneshot = statistics.mean(b["oneshot_seconds"] for b in bare)
    script = statistics.mean(b["process"]["seconds"] for b in bare)
    peak = max(b["process"]["peak_rss_mb"] for b in bare)
    return {
        "model": "builtin:tiny-phi4-mini", "calibration": CALIBRATION,
        "bare": {"oneshot_seconds": oneshot, "oneshot_seconds_each": [b["oneshot_seconds"] for b in bare],
                 "script_seconds": script, "peak_rss_mb": peak, "threads": bare[0]["threads"],
                 "others_cpu": max(b["process"]["others_cpu"] for b in bare)},
        "compress_run": {"oneshot_seconds": calibration["seconds"], "run_seconds": run["seconds"],
                         "peak_rss_mb": run["peak_rss_mb"], "returncode": run["returncode"], "log": run["log"],
                         "others_cpu": run["others_cpu"]},
        "quantize_time_ratio": ratio(calibration["seconds"], oneshot),
        "whole_time_ratio": ratio(run["seconds"], script),
        "peak_rss_ratio": ratio(run["peak_rss_mb"], peak),
    }


def verification(layers: int) -> dict:
    from compress.verify.isolated import measure_in_subprocess

    folder = onnx_artifact("onnx-int4", layers)
    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    work = CACHE / "verify-overhead"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(1)
    windows = rng.integers(1, vocab, (VERIFY["windows"], VERIFY["seq_len"]), dtype=np.int64)
    np.savez(work / "windows.npz", windows=windows, prompt=windows[0, :16])
    log(f"overhead: onnxruntime-genai forward passes over {VERIFY['windows']}x{VERIFY['seq_len']} tokens ({folder.name})")
    raw = probe("raw_forward", {"folder": str(folder), "windows": str(work / "windows.npz"),
                                "reference": str(work / "reference.npz"), "top_k": VERIFY["top_k"]}, "raw-forward")
    log("overhead: compress.verify.worker perplexity/KLD pass over the same windows")
    job = {"artifact": str(folder), "runtime": "onnxruntime-genai", "target": "cpu", "windows": str(work / "windows.npz"),
           "reference": str(work / "reference.npz"), "top_k": VERIFY["top_k"], "new_tokens": 2, "speed_runs": 1,
           "prompts": [], "stop_ids": [], "generation_tokens": 4}
    worker = measure_in_subprocess(job, work, "worker")
    return {
        "artifact": folder.name, **VERIFY,
        "raw_forward_seconds": raw["forward_seconds"], "worker_evaluate_seconds": worker["seconds"]["evaluate"],
        "raw_others_cpu": raw["process"]["others_cpu"],
        "ratio": ratio(worker["seconds"]["evaluate"], raw["forward_seconds"]),
        "self_kld": worker["metrics"].get("kld"),  # reference from the same graph: ~0 if both read the same logits
    }


def run(layers: int = 2) -> dict:
    return {"quantization": quantization(), "verification": verification(layers)}


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "overhead"])
