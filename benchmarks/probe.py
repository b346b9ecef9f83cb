"""Measuring subprocesses, one model each: python -m benchmarks.probe MODE JOB.json

Modes: speed (prefill/decode of one artifact in its runtime), gptq (compress's quantize_gptq on random
tokens, optionally writing the compressed-tensors folder), streaming (compress's layer-by-layer calibration
with a recipe's variant), oneshot (bare llm-compressor, the overhead reference), raw_forward (onnxruntime-genai forward passes only), bandwidth (memory bandwidth).
Each writes its result JSON with its own peak RSS (VmHWM) and the environment it ran in.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from compress.verify.worker import peak_rss_mb


def _tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, shape, dtype=np.int64)


def _spread(values: list[float]) -> dict[str, float]:
    return {"tps": statistics.median(values), "min": min(values), "max": max(values)}


def speed(job: dict) -> dict:
    """Per prompt length: one warm-up, then `runs` timed greedy runs (compress's timed_generation).

    The first length also times decode (new_tokens after it); the others time prefill alone (one new
    token). Figures as ../shared/METRICS.md defines them: prompt / time to first logits, and
    (new - 1) / time from the first to the last new token.
    """
    from compress.verify.targets import prepare
    from compress.verify.worker import _runtime

    described = prepare("cpu", job["runtime"])
    started = time.perf_counter()
    runtime = _runtime(job["runtime"], Path(job["folder"]), "cpu", job.get("threads") or described["threads"])
    load_seconds = time.perf_counter() - started
    lengths, runs = job["prompt_lengths"], job["runs"]
    prompt = _tokens(job["vocab_size"], max(lengths), job.get("seed", 0))
    figures, generated = {}, 0
    for index, length in enumerate(lengths):
        new_tokens = job["new_tokens"] if index == 0 else 1
        runtime.timed_generation(prompt[:length], min(new_tokens, job["warmup_tokens"]))  # warm-up
        timed = [runtime.timed_generation(prompt[:length], new_tokens) for _ in range(runs)]
        figures[f"prefill_{length}"] = _spread([length / prefill for prefill, _, _ in timed])
        if new_tokens > 1:
            figures["decode"] = {**_spread([(new_tokens - 1) / decode for _, decode, _ in timed]),
                                 "context": length, "new_tokens": new_tokens}
            generated = len(timed[-1][2])
    return {"figures": figures, "runs": runs, "load_seconds": load_seconds, "generated_tokens": generated,
            "peak_rss_mb": peak_rss_mb(), "environment": described}


def gptq(job: dict) -> dict:
    """compress.quantize.llmc.quantize_gptq (what `compress run` calls) on random calibration tokens."""
    import torch

    from compress.quantize.llmc import quantize_gptq
    from compress.recipe import Variant

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    config = json.loads((Path(job["model"]) / "config.json").read_text())
    samples = _tokens(int(config["vocab_size"]), (job["calibration_samples"], job["calibration_seq_len"]))
    variant = Variant(name="gptq-w4", method="gptq", bits=4, group_size=job["group_size"])
    started = time.perf_counter()
    model, tokenizer, details = quantize_gptq(Path(job["model"]), variant, samples)
    result = {"quantize_seconds": time.perf_counter() - started, "oneshot_seconds": details["seconds"],
              "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "rss_at_end_mb": _rss_parts()}
    if job.get("out"):
        from compress.export.compressed_tensors import write_compressed_tensors

        write_compressed_tensors(model, tokenizer, Path(job["model"]), Path(job["out"]))
        result["peak_rss_mb_with_save"] = peak_rss_mb()
    return result


def streaming(job: dict) -> dict:
    """compress.quantize.streaming.calibrate_streaming (what `compress run` calls for gptq, awq, rtn) with one
    of a recipe's variants, on random calibration tokens; per-layer seconds, AWQ's search seconds, peak RSS."""
    import shutil

    import torch

    from compress.quantize.streaming import calibrate_streaming
    from compress.recipe import Variant

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    config = json.loads((Path(job["model"]) / "config.json").read_text())
    samples = _tokens(int(config["vocab_size"]), (job["calibration_samples"], job["calibration_seq_len"]))
    out, work = Path(job["out"]), Path(job["work"])
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        details = calibrate_streaming(Path(job["model"]), Variant(**job["variant"]), samples, out, work, int(job["budget_gib"] * 2**30))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    awq = details.get("awq") or {}
    return {"seconds": details["seconds"], "layers_seconds": details["layers_seconds"], "search_seconds": details.get("search_seconds"),
            "applied": awq.get("applied"), "clip": awq.get("clip"), "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def oneshot(job: dict) -> dict:
    """Bare llm-compressor: load, oneshot(GPTQModifier W4A16, lm_head ignored), save. No compress code runs
    after the calibration tokens are made (outside the timed region)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot as llmc_oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = np.load(job["samples"]).tolist()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(row) for row in samples]})
    calibrating = time.perf_counter()
    llmc_oneshot(model=model, dataset=dataset, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
                 max_seq_length=len(samples[0]), num_calibration_samples=len(samples), shuffle_calibration_samples=False)
    oneshot_seconds = time.perf_counter() - calibrating
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    return {"oneshot_seconds": oneshot_seconds, "load_oneshot_save_seconds": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def raw_forward(job: dict) -> dict:
    """onnxruntime-genai alone: one generator per window, append its tokens, read the logits. Timed the
    way the worker's evaluation runs them (no warm-up). Writes a top-k reference from those logits."""
    import onnxruntime_genai as og

    from benchmarks.common import threads as default_threads
    from compress.runtimes.ort_genai import session_threads

    config = og.Config(job["folder"])
    config.clear_providers()
    config.overlay(json.dumps(session_threads(job.get("threads") or default_threads())))  # as the worker's runtime
    model = og.Model(config)
    windows = np.load(job["windows"])["windows"]
    seconds, top_ids, top_logprobs, target_logprobs = 0.0, [], [], []
    for window in windows:
        started = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(window) + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(window[None].astype(np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)[0, :-1]
        seconds += time.perf_counter() - started
        logprobs = logits - logits.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        ids = np.argpartition(-logprobs, job["top_k"], axis=-1)[:, : job["top_k"]]
        order = np.argsort(-np.take_along_axis(logprobs, ids, -1), axis=-1, kind="stable")
        ids = np.take_along_axis(ids, order, -1)
        top_ids.append(ids.astype(np.int32))
        top_logprobs.append(np.take_along_axis(logprobs, ids, -1))
        target_logprobs.append(np.take_along_axis(logprobs, window[1:, None], -1)[:, 0])
    np.savez(job["reference"], top_ids=np.stack(top_ids), top_logprobs=np.stack(top_logprobs),
             target_logprobs=np.stack(target_logprobs))
    return {"forward_seconds": seconds, "windows": len(windows), "peak_rss_mb": peak_rss_mb()}


def bandwidth(job: dict) -> dict:
    """GB/s of copy, add, triad and read over arrays far larger than any cache, best of `repeats`: numpy
    (one thread) and torch (`threads`). Bytes counted as STREAM counts them (copy 2, add and triad 3, read 1
    per element; write-allocate traffic is not counted, so these are lower bounds of what moved)."""
    import torch

    torch.set_num_threads(job["threads"])
    n = job["mib"] * 2**20 // 8
    found = {}
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    _best(found, {"numpy_copy": (lambda: np.copyto(a, b), 2), "numpy_add": (lambda: np.add(b, c, out=a), 3),
                  "numpy_read": (lambda: b.sum(), 1)}, n, job["repeats"])
    del a, b, c
    a, b, c = (torch.full((n,), value, dtype=torch.float64) for value in (0.0, 1.0, 2.0))
    _best(found, {"torch_copy": (lambda: a.copy_(b), 2), "torch_triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3),
                  "torch_read": (lambda: b.sum(), 1)}, n, job["repeats"])
    return {"gb_per_s": found, "array_mib": job["mib"], "threads": job["threads"], "peak_rss_mb": peak_rss_mb()}


def _best(found: dict, kernels: dict, n: int, repeats: int) -> None:
    """GB/s of each kernel (arrays of n float64), best of `repeats` after one untimed run."""
    for name, (kernel, arrays) in kernels.items():
        kernel()
        found[name] = arrays * n * 8 / min(_timed(kernel) for _ in range(repeats)) / 1e9


def _rss_parts() -> dict[str, float]:
    """Resident memory now, by kind (MiB): anonymous (allocated) vs file-backed (mapped checkpoint pages,
    which the kernel can drop) — peak RSS counts both."""
    parts = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    return parts


def _timed(kernel) -> float:
    started = time.perf_counter()
    kernel()
    return time.perf_counter() - started


def automix(job: dict) -> dict:
    """One stage of an auto variant's choosing (benchmarks/automix.py): a candidate's calibration, the
    sensitivity pass over every candidate, the float reference on the selection slice, or one plan measured."""
    import torch

    from compress.memory import activation_budget
    from compress.quantize.sensitivity import candidate_predictions, float_reference, plan_kld
    from compress.quantize.streaming import calibrate_streaming, linear_names
    from compress.recipe import Variant
    from compress.verify.accuracy import Reference

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model, root = Path(job["model"]), Path(job["root"])
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    budget = int(job["budget_gib"] * 2**30)
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    selection = _tokens(vocab, tuple(job["selection"]), seed=1)
    candidates = {name: root / name for name in job["candidates"]}
    started = time.perf_counter()
    result: dict = {}
    if job["stage"] == "calibrate":
        bits, group = job["candidate"].split("g")
        variant = Variant(name=f"c{job['candidate']}", method="gptq", bits=int(bits), group_size=int(group), ignore=[])
        calibrate_streaming(model, variant, _tokens(vocab, tuple(job["calibration"])), candidates[job["candidate"]], work, budget)
    elif job["stage"] == "predict":
        predictions = candidate_predictions(model, candidates, selection, budget_bytes=activation_budget(budget), spill_dir=work)
        result["predicted"] = {name: sum(found[name] for found in predictions.values()) for name in candidates}
    elif job["stage"] == "gguf-candidates":  # the float GGUF, then llama-quantize --pure per type, as produce_auto_gguf does
        from compress.export import gguf

        gguf.convert(model, root / "float.gguf", "bf16", work / "gguf.log")
        for kind in job["gguf_candidates"]:
            gguf.quantize(root / "float.gguf", root / f"gguf-{kind}.gguf", kind, {}, kind, kind, None, job["threads"],
                          work / "gguf.log", pure=True)
    elif job["stage"] == "gguf-predict":
        from compress.model import inspect_model
        from compress.produce import Workspace
        from compress.produce_auto_gguf import _predictions

        files = {kind: root / f"gguf-{kind}.gguf" for kind in job["gguf_candidates"]}
        predictions, _ = _predictions(inspect_model(str(model)), files, selection, 0, activation_budget(budget), Workspace(root, "gguf"))
        result["predicted"] = {kind: sum(found[kind] for found in predictions.values()) for kind in files}
    elif job["stage"] == "reference":
        reference = float_reference(model, selection, activation_budget(budget), work)
        np.savez(root / "reference.npz", **reference.as_arrays())
    else:
        with np.load(root / "reference.npz") as arrays:
            reference = Reference(**arrays)
        layers = linear_names(int(json.loads((model / "config.json").read_text())["num_hidden_layers"]))  # the head too
        result["measured"] = plan_kld(model, dict.fromkeys(layers, candidates["4g128"]), selection, activation_budget(budget), work, reference)
    return {**result, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


MODES = {"automix": automix, "speed": speed, "gptq": gptq, "streaming": streaming, "oneshot": oneshot, "raw_forward": raw_forward, "bandwidth": bandwidth}


def main() -> None:
    mode, job_file = sys.argv[1], Path(sys.argv[2])
    job = json.loads(job_file.read_text())
    result = MODES[mode](job)
    Path(job["result"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
