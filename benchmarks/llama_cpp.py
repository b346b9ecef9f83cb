"""Benchmark: llama.cpp's GGUF files beside onnxruntime-genai int4/int8 and fp32 PyTorch, on one
Phi-4-mini-width model (random weights), every runtime in a process of its own, timed in turn.

    python -m benchmarks.run --only llama-cpp [--layers 2] [--runs 5]

All six are loaded at once (compress.verify.isolated.SpeedServer, as `compress run` times an artifact beside
its baseline) and take turns: one generation of each, then the next round, so every ratio compares runs
a few seconds apart under the same load. Same threads everywhere (COMPRESS_THREADS, default all cores).
The GGUF files come from the same fp32 model through llama.cpp's converter and llama-quantize (no
importance matrix: the weights are random): Q4_0 --pure (every matrix Q4_0), Q4_K_M (llama.cpp's mix),
Q8_0. Prefill at 128 and 512 prompt tokens, decode over 64 new tokens after each prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from benchmarks.artifacts import _done, _mark, onnx_artifact, wide_model
from benchmarks.common import CACHE, log, threads
from benchmarks.maths import ratio

GGUF_BUILDS = {"GGUF Q4_0 pure": ("Q4_0", True), "GGUF Q4_K_M": ("Q4_K_M", False), "GGUF Q8_0": ("Q8_0", False)}
PROMPTS = (128, 512)
NEW_TOKENS = 64
BASELINE, REFERENCE = "fp32 PyTorch", "ONNX int4"


def gguf_artifact(name: str, layers: int) -> Path:
    """A folder holding one GGUF file of the wide model, made by llama.cpp's converter and llama-quantize."""
    from compress.export.gguf import convert, quantize

    quant, pure = GGUF_BUILDS[name]
    source = wide_model(layers)
    folder = CACHE / f"gguf-{quant.lower()}{'-pure' if pure else ''}-{layers}L"
    settings = {"quant": quant, "pure": pure}
    if not _done(folder, settings):
        float_file = CACHE / f"gguf-f32-{layers}L.gguf"
        if not float_file.is_file():
            log(f"converting {source.name} to GGUF (llama.cpp's converter)")
            convert(source, float_file.with_suffix(".partial"), "f32", CACHE / "gguf.log")
            os.replace(float_file.with_suffix(".partial"), float_file)
        log(f"quantizing {folder.name} (llama-quantize {quant}{' --pure' if pure else ''})")
        folder.mkdir(parents=True, exist_ok=True)
        result = quantize(float_file, folder / "model.gguf", quant, {}, None, None, None, threads(), CACHE / "gguf.log", pure=pure)
        _mark(folder, settings, fell_back=len(result["fell_back"]))
    return folder


def artifacts(layers: int) -> dict[str, tuple[Path, str]]:
    found = {BASELINE: (wide_model(layers), "transformers"), REFERENCE: (onnx_artifact("onnx-int4", layers), "onnxruntime-genai"),
             "ONNX int8": (onnx_artifact("onnx-int8", layers), "onnxruntime-genai")}
    return found | {name: (gguf_artifact(name, layers), "llama.cpp") for name in GGUF_BUILDS}


def run(layers: int = 2, runs: int = 5) -> dict:
    from compress.verify.isolated import SpeedServer, time_in_turn
    from compress.verify.size import folder_bytes

    found = artifacts(layers)
    vocab = int(json.loads((wide_model(layers) / "config.json").read_text())["vocab_size"])
    tokens = np.random.default_rng(0).integers(0, vocab, max(PROMPTS))
    work = CACHE / "llama-cpp-speed"
    work.mkdir(parents=True, exist_ok=True)
    rounds = {}
    for length in PROMPTS:
        windows = work / f"prompt-{length}.npz"
        np.savez(windows, windows=tokens[None, :length], prompt=tokens[:length])
        servers = {}
        try:
            for name, (folder, runtime) in found.items():
                job = {"artifact": str(folder), "runtime": runtime, "target": "cpu", "windows": str(windows),
                       "new_tokens": NEW_TOKENS}
                servers[name] = SpeedServer(job, work, f"{name.lower().replace(' ', '-')}-{length}")
            log(f"llama-cpp: {len(servers)} runtimes loaded, {runs} rounds at {length} prompt tokens, in turn")
            rounds[length] = time_in_turn(servers, length, NEW_TOKENS, runs)
        finally:
            for server in servers.values():
                server.close()
    results = {}
    for name, (folder, runtime) in found.items():
        results[name] = {"runtime": runtime, "size_bytes": folder_bytes(folder),
                         **{f"prompt_{length}": rounds[length][name] for length in PROMPTS}}
    for entry in results.values():
        short = entry[f"prompt_{PROMPTS[0]}"]
        entry["decode_vs_baseline"] = ratio(short["decode_tps"], results[BASELINE][f"prompt_{PROMPTS[0]}"]["decode_tps"])
        entry["decode_vs_onnx_int4"] = ratio(short["decode_tps"], results[REFERENCE][f"prompt_{PROMPTS[0]}"]["decode_tps"])
        for length in PROMPTS:
            entry[f"prefill_{length}_vs_onnx_int4"] = ratio(entry[f"prompt_{length}"]["prefill_tps"],
                                                            results[REFERENCE][f"prompt_{length}"]["prefill_tps"])
    return {"layers": layers, "threads": threads(), "runs": runs, "new_tokens": NEW_TOKENS, "prompts": list(PROMPTS),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset", "artifacts": results}


def markdown(found: dict) -> list[str]:
    lines = [
        "## llama.cpp beside onnxruntime-genai and PyTorch (timed in turn)",
        "",
        f"Phi-4-mini width, {found['layers']} layers, random weights; {found['threads']} threads everywhere; OMP_WAIT_POLICY "
        f"{found['omp_wait_policy']}; {found['runs']} rounds, each runtime once per round (medians). Decode: "
        f"{found['new_tokens']} new tokens after the {found['prompts'][0]}-token prompt.",
        "",
        "| artifact | runtime | MB | decode tok/s | × fp32 PyTorch | × ONNX int4 | "
        + " | ".join(f"prefill {n} tok/s | × ONNX int4" for n in found["prompts"]) + " | others' CPU |",
        "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(found["prompts"]) + "---:|",
    ]
    for name, entry in found["artifacts"].items():
        short = entry[f"prompt_{found['prompts'][0]}"]
        prefill = " | ".join(f"{entry[f'prompt_{n}']['prefill_tps']:.1f} | {entry[f'prefill_{n}_vs_onnx_int4']:.2f}"
                             for n in found["prompts"])
        others = max(entry[f"prompt_{n}"]["others_cpu"] or 0 for n in found["prompts"])
        lines.append(f"| {name} | {entry['runtime']} | {entry['size_bytes'] / 1e6:,.0f} | {short['decode_tps']:.2f} | "
                     f"{entry['decode_vs_baseline']:.2f} | {entry['decode_vs_onnx_int4']:.2f} | {prefill} | {others:.2f} |")
    return [*lines, ""]
