"""Benchmark 1: prefill and decode speed, peak RSS and size on disk of five artifacts of one
Phi-4-mini-width model (random weights), each loaded and run in a process of its own, side by side.

    python -m benchmarks.decode [--layers 2] [--runs 5]

Prefill tok/s = prompt tokens / time to the first new token's logits, at 128 and 512 prompt tokens;
decode tok/s = 63 / time from the first to the 64th new token after the 128-token prompt (greedy).
One warm-up per prompt length, then `runs` timed runs: median, min, max. Token ids are fed directly.
"""

from __future__ import annotations

from benchmarks.artifacts import all_artifacts, built, wide_model
from benchmarks.common import log, probe
from benchmarks.maths import ratio

SPEED = {"prompt_lengths": [128, 512], "new_tokens": 64, "warmup_tokens": 8}
BASELINE = "fp32 PyTorch"


def model_summary(layers: int) -> dict:
    from compress.model import inspect_model

    info = inspect_model(str(wide_model(layers)))
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "tie_word_embeddings", "partial_rotary_factor")
    return {"layers": layers, "parameters": info.parameters, "stored_dtype": info.stored_dtype,
            **{key: info.config.get(key, (info.config.get("rope_parameters") or {}).get(key)) for key in keys}}


def run(layers: int = 2, runs: int = 5) -> dict:
    from compress.verify.size import folder_bytes

    artifacts = all_artifacts(layers)
    summary = model_summary(layers)
    results = {}
    for name, (folder, runtime) in artifacts.items():
        log(f"decode: {name} ({runtime}, {folder.name})")
        job = {"folder": str(folder), "runtime": runtime, "vocab_size": summary["vocab_size"], "runs": runs, **SPEED}
        measured = probe("speed", job, "speed-" + name.lower().replace(" ", "-"))
        results[name] = {
            "runtime": runtime, "folder": str(folder), "size_bytes": folder_bytes(folder),
            **measured["figures"], "peak_rss_mb": measured["peak_rss_mb"], "load_seconds": measured["load_seconds"],
            "process_seconds": measured["process"]["seconds"], "environment": measured["environment"],
            "others_cpu": measured["process"]["others_cpu"],
            "made_by": built(folder).get("settings"),
        }
    base = results[BASELINE]
    for entry in results.values():
        entry["decode_speedup"] = ratio(entry["decode"]["tps"], base["decode"]["tps"])
        entry["size_ratio"] = ratio(entry["size_bytes"], base["size_bytes"])
        for length in SPEED["prompt_lengths"]:
            entry[f"prefill_{length}_speedup"] = ratio(entry[f"prefill_{length}"]["tps"], base[f"prefill_{length}"]["tps"])
    return {"model": summary, "settings": {**SPEED, "runs": runs}, "baseline": BASELINE, "artifacts": results}


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "decode"])
