"""Benchmark 2: this machine's memory bandwidth, bytes read per decoded token of each artifact (from its
stored tensors), and, with decode figures from the same run, the bandwidth each artifact achieves.

    python -m benchmarks.bandwidth [--layers 2]      (bound only; `benchmarks.run` adds achieved shares)

Bound = best measured bandwidth (GB/s) / bytes per token. Achieved = bytes per token × decode tok/s.
With decode figures, ONNX int4 is also decoded on one thread: a decode that speeds up with cores is
bound by compute rather than by memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.artifacts import all_artifacts, wide_model
from benchmarks.common import ProbeError, log, probe, threads
from benchmarks.decode import SPEED
from benchmarks.maths import (
    TokenBytes,
    bandwidth_use,
    checkpoint_token_bytes,
    dequantized_linear_bytes,
    kv_cache_bytes,
    mean_decode_context,
    onnx_token_bytes,
)

ARRAY_MIB, REPEATS = 1024, 5  # each array 1 GiB, twice the largest cache this VM reports; best of 5


def measure_bandwidth() -> dict:
    log(f"bandwidth: copy / triad / read over {ARRAY_MIB} MiB arrays, best of {REPEATS}")
    measured = probe("bandwidth", {"mib": ARRAY_MIB, "repeats": REPEATS, "threads": threads()}, "bandwidth")
    kernel = max(measured["gb_per_s"], key=measured["gb_per_s"].get)
    return {**measured, "bound_gb_per_s": measured["gb_per_s"][kernel], "bound_kernel": kernel}


def _kv_dtype_bytes(folder: Path, runtime: str) -> int:
    """Bytes per K/V element: fp32 in transformers on the CPU; an ONNX graph's past_key_values type."""
    if runtime == "transformers":
        return 4
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name.startswith("past_key_values"))
    return onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).itemsize


def token_bytes(folder: Path, runtime: str, config: dict, context: float) -> dict[str, dict]:
    """Stored bytes per token, and (where a runtime holds weights otherwise) bytes as run."""
    from compress.verify.size import read_onnx, read_tensors

    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    head_dim = hidden // int(config["num_attention_heads"])
    kv = kv_cache_bytes(int(config["num_hidden_layers"]), int(config["num_key_value_heads"]), head_dim, context,
                        _kv_dtype_bytes(folder, runtime))
    if (folder / "model.onnx").is_file():
        stored = TokenBytes(*onnx_token_bytes(*read_onnx(folder), vocab, hidden), kv)
        return {"stored": stored.as_dict(), "as_run": stored.as_dict()}
    tensors = read_tensors(folder)
    linear, head, row = checkpoint_token_bytes(tensors, vocab, bool(config.get("tie_word_embeddings")))
    stored = TokenBytes(linear, head, row, kv)
    # transformers on the CPU loads in fp32 (compress's TorchRuntime) and dequantizes compressed-tensors
    # layers on load, so what it reads per token is the fp32 size of every layer, head and row.
    fp32_head = (vocab * hidden * 4) if head else 0
    as_run = TokenBytes(dequantized_linear_bytes(tensors, 4), fp32_head, hidden * 4, kv)
    return {"stored": stored.as_dict(), "as_run": as_run.as_dict()}


def one_thread_decode(folder: Path, vocab: int) -> dict:
    """Decode of an ONNX folder with onnxruntime limited to one thread: if all cores decode about
    cores× faster, decode is bound by compute, not memory."""
    log(f"bandwidth: {folder.name} decode on one thread")
    job = {"folder": str(folder), "runtime": "onnxruntime-genai", "vocab_size": vocab, "runs": 5, "threads": 1,
           **SPEED, "prompt_lengths": SPEED["prompt_lengths"][:1]}
    measured = probe("speed", job, "speed-onnx-int4-1thread")
    return {"decode": measured["figures"]["decode"], "others_cpu": measured["process"]["others_cpu"]}


def run(layers: int = 2, decode: dict | None = None) -> dict:
    """Bandwidth, bytes/token and bound of each artifact; achieved shares when `decode` (same run) is given."""
    measured = measure_bandwidth()
    bound = measured["bound_gb_per_s"] * 1e9
    context = mean_decode_context(SPEED["prompt_lengths"][0], SPEED["new_tokens"])
    config = json.loads((wide_model(layers) / "config.json").read_text())
    artifacts = {}
    for name, (folder, runtime) in all_artifacts(layers).items():
        per_token = token_bytes(folder, runtime, config, context)
        entry = {"bytes_per_token": per_token, "bound_tps": bound / per_token["stored"]["total"],
                 "bound_tps_as_run": bound / per_token["as_run"]["total"]}
        if decode and name in decode["artifacts"]:
            tps = decode["artifacts"][name]["decode"]["tps"]
            entry["use"] = bandwidth_use(per_token["stored"]["total"], tps, bound)
            entry["use_as_run"] = bandwidth_use(per_token["as_run"]["total"], tps, bound)
        artifacts[name] = entry
    result = {"machine": measured, "decode_context": context, "artifacts": artifacts}
    if decode and "ONNX int4" in decode["artifacts"]:
        try:
            single = one_thread_decode(all_artifacts(layers)["ONNX int4"][0], int(config["vocab_size"]))
        except ProbeError as error:  # a diagnostic: the figures above stand without it
            result["int4_one_thread_error"] = str(error)
        else:
            single["speedup_all_threads"] = decode["artifacts"]["ONNX int4"]["decode"]["tps"] / single["decode"]["tps"]
            result["int4_one_thread"] = single
    return result


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "bandwidth"])
