"""The Phi-4-mini-width model and its artifacts, made through the same calls `compress run` makes.

fp32 safetensors (random weights) -> ONNX fp32 / int8 / int4 (compress.export.onnx_genai.run_builder with
the options a recipe variant gets from builder_options) and GPTQ W4 g128 (compress.quantize.llmc.quantize_gptq
+ compress.export.compressed_tensors, in a probe process). Each is cached under benchmarks/.cache with a
`bench.json` marker written last, so a half-written folder is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import CACHE, log, probe
from benchmarks.models import random_model

# name -> (precision for the builder, recipe fields of the variant whose options it gets)
ONNX_BUILDS = {
    "onnx-fp32": ("fp32", None),
    "onnx-int8": ("int8", {"method": "onnx-int8", "group_size": 32, "ignore": []}),
    "onnx-int4": ("int4", {"method": "onnx-int4", "group_size": 32, "accuracy_level": 4, "ignore": []}),
}
GPTQ = {"group_size": 128, "calibration_samples": 8, "calibration_seq_len": 128}


def wide_model(layers: int) -> Path:
    return random_model("phi4-mini", layers, "fp32")


def _done(folder: Path, settings: dict) -> bool:
    marker = _marker(folder)
    return folder.is_dir() and marker.is_file() and json.loads(marker.read_text()).get("settings") == settings


def _marker(folder: Path) -> Path:
    return folder.with_name(folder.name + ".bench.json")


def built(folder: Path) -> dict:
    """What the marker recorded when `folder` was made (build seconds, quantization figures)."""
    return json.loads(_marker(folder).read_text()) if _marker(folder).is_file() else {}


def _mark(folder: Path, settings: dict, **facts) -> None:
    _marker(folder).write_text(json.dumps({"settings": settings, **facts}, indent=1))


def builder_options_for(name: str, config: dict) -> dict[str, str]:
    """--extra_options a user's recipe variant would pass (fp32: none but the hub token)."""
    from compress.export.onnx_genai import builder_options, phi3_linear_names
    from compress.quantize.plan import resolve_plan
    from compress.recipe import Variant

    fields = ONNX_BUILDS[name][1]
    if fields is None:
        return {"hf_token": "false"}
    variant = Variant(name=name, **fields)
    plan = resolve_plan(phi3_linear_names(config), variant.bits, list(variant.ignore), variant.layer_overrides())
    return builder_options(variant, plan)


def onnx_artifact(name: str, layers: int) -> Path:
    import time

    from compress.export.onnx_genai import run_builder

    source = wide_model(layers)
    options = builder_options_for(name, json.loads((source / "config.json").read_text()))
    folder = CACHE / f"{name}-{layers}L"
    settings = {"precision": ONNX_BUILDS[name][0], "options": options}
    if not _done(folder, settings):
        log(f"building {folder.name} (onnxruntime-genai builder, {options})")
        started = time.perf_counter()
        run_builder(source, folder, ONNX_BUILDS[name][0], "cpu", options, CACHE / "builder-cache", CACHE / f"{name}-{layers}L.log")
        _mark(folder, settings, build_seconds=round(time.perf_counter() - started, 1))
    return folder


def gptq_artifact(layers: int) -> Path:
    """compressed-tensors GPTQ W4 g128 (symmetric, lm_head kept) of the wide model, calibrated on random tokens."""
    source = wide_model(layers)
    folder = CACHE / f"gptq-ct-{layers}L"
    if not _done(folder, GPTQ):
        log(f"quantizing {folder.name} (quantize_gptq, {GPTQ['calibration_samples']}x{GPTQ['calibration_seq_len']} random tokens)")
        result = probe("gptq", {"model": str(source), "out": str(folder), **GPTQ}, f"gptq-ct-{layers}L")
        _mark(folder, GPTQ, quantize=result)
    return folder


def all_artifacts(layers: int) -> dict[str, tuple[Path, str]]:
    """name -> (folder, runtime) for every artifact the speed benchmark measures, in the order measured:
    ONNX int4 right after the baseline, so the headline ratio has the least drift between its two figures."""
    return {
        "fp32 PyTorch": (wide_model(layers), "transformers"),
        "ONNX int4": (onnx_artifact("onnx-int4", layers), "onnxruntime-genai"),
        "ONNX int8": (onnx_artifact("onnx-int8", layers), "onnxruntime-genai"),
        "ONNX fp32": (onnx_artifact("onnx-fp32", layers), "onnxruntime-genai"),
        "GPTQ compressed-tensors": (gptq_artifact(layers), "transformers"),
    }
