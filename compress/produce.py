"""From one variant to its artifacts in staging/: calibrate (or build) once, then write every format.

Calibrated variants (gptq, awq, rtn) are saved once as a compressed-tensors folder under
work/<variant>/calibrated/ — the search result as data. Every format, and every ONNX variant that names
this one in `from:`, is written from that folder; nothing is calibrated twice.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from compress import memory
from compress.export.gptq_v1 import write_gptq_v1
from compress.export.onnx_genai import (
    builder_options,
    carried_source,
    excluded_nodes,
    quantize_dynamic_int8,
    run_builder,
    ties_table,
    variant_plan,
)
from compress.model import ModelInfo
from compress.quantize.awq_search import SCALES_FILE, save_scales
from compress.quantize.llmc import calibrate_whole_model, needs_whole_model
from compress.quantize.plan import KEEP, keeps_decoder_layers, plan_summary
from compress.quantize.streaming import calibrate_streaming
from compress.quiet import library_output_to
from compress.release import write_json_atomic
from compress.results import NOT_APPLICABLE, NOT_VERIFIED, Artifact
from compress.verify.layers import layer_sensitivity
from compress.verify.size import checkpoint_bits, folder_bytes, onnx_bits_per_weight, read_onnx
from compress.verify.targets import availability

ONNX_PRECISION = {"onnx-int4": "int4", "onnx-int8": "int8", "onnx-int8-dynamic": "fp32"}
# Formats no loader here reads directly: verified through an ONNX build made from the folder (builder -i).
VIA_ONNX_BUILD = "onnxruntime-genai (ONNX built from this folder; transformers needs gptqmodel to read it, which does not install here)"


class Workspace:
    """Where a run keeps each variant's staging folders, work files and logs."""

    def __init__(self, run_dir: Path, variant: str):
        self.run_dir, self.variant = run_dir, variant

    def staging(self, fmt: str) -> Path:
        folder = self.run_dir / "staging" / self.variant / fmt
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    def work(self, name: str) -> Path:
        return self.run_dir / "work" / self.variant / name

    @property
    def cache(self) -> Path:
        return self.run_dir / "work" / "builder-cache"

    @property
    def log(self) -> Path:
        return self.run_dir / "logs" / f"{self.variant}.log"


def calibrated_folder(run_dir: Path, variant: str) -> Path:
    return run_dir / "work" / variant / "calibrated"


def produce(variant, recipe, info: ModelInfo, samples, run_dir: Path, stamp: str = "",
            budget_bytes: int | None = None, stop_ids: list[int] = ()) -> list[Artifact]:
    """Every artifact of `variant`, written into staging/ with what its quantization decided.

    A calibration saved by an earlier run with the same `stamp` (same settings, model, data, versions) is
    reused instead of calibrating again.
    """
    space = Workspace(run_dir, variant.name)
    with library_output_to(space.log):
        if variant.is_onnx:
            return _onnx_artifacts(variant, recipe, info, run_dir, space, budget_bytes)
        if variant.method == "gguf":
            from compress.produce_gguf import gguf_artifacts

            return gguf_artifacts(variant, recipe, info, samples, run_dir, space, stop_ids, budget_bytes)
        if variant.method == "auto" and variant.writes_gguf:
            from compress.produce_auto_gguf import auto_gguf_artifacts

            return auto_gguf_artifacts(variant, recipe, info, samples, run_dir, space, stamp, stop_ids, budget_bytes)
        if variant.method == "auto" and variant.formats == ["onnx"]:
            from compress.produce_auto_onnx import auto_onnx_artifacts

            return auto_onnx_artifacts(variant, recipe, info, samples, space, stamp, budget_bytes)
        if variant.method == "auto":
            from compress.produce_auto import auto_artifacts

            return auto_artifacts(variant, recipe, info, samples, space, stamp, budget_bytes)
        return _calibrated_artifacts(variant, recipe, info, samples, run_dir, space, stamp, budget_bytes)


def saved_calibration(run_dir: Path, variant: str, stamp: str) -> dict | None:
    """The details of a finished calibration with this stamp, if one is on disk."""
    record = run_dir / "work" / variant / "calibration.json"
    if not stamp or not record.is_file() or not (calibrated_folder(run_dir, variant) / "config.json").is_file():
        return None
    details = json.loads(record.read_text())
    return details if details.get("stamp") == stamp else None


def _calibrated_artifacts(variant, recipe, info: ModelInfo, samples, run_dir: Path, space: Workspace, stamp: str,
                          budget_bytes: int | None) -> list[Artifact]:
    calibrated = calibrated_folder(run_dir, variant.name)
    details = saved_calibration(run_dir, variant.name, stamp)
    if details is None:
        partial = calibrated.parent / "calibrating"
        shutil.rmtree(partial, ignore_errors=True)
        calibrate = calibrate_whole_model if needs_whole_model(variant) else calibrate_streaming
        details = calibrate(info.path, variant, samples, partial, space.work("activations"), budget_bytes)
        shutil.rmtree(space.work("activations"), ignore_errors=True)
        memory.give_back_freed_memory()
        if "awq_scales" in details:  # the searched scales as data, replayable with awq_search.replay
            scales_file = space.work(SCALES_FILE)
            save_scales(details.pop("awq_scales"), scales_file)
            details["awq"]["scales_file"] = str(scales_file)
        shutil.rmtree(calibrated, ignore_errors=True)
        os.replace(partial, calibrated)  # a killed run never leaves half a calibration
        if recipe.evaluation.sensitivity_samples:
            details["sensitivity"] = layer_sensitivity(info.path, calibrated, details["layer_plan"], variant.group_size,
                                                       variant.symmetric, samples[: recipe.evaluation.sensitivity_samples])
            memory.give_back_freed_memory()
        details["stamp"] = stamp
        write_json_atomic(space.work("calibration.json"), details)
    else:
        details["reused"] = True
    details = {**details, "log": str(space.log)}
    artifacts = []
    for fmt in variant.formats:
        folder = space.staging(fmt)
        skipped = {target: (NOT_VERIFIED, f"the {fmt} folder is verified through an ONNX build for the CPU only")
                   for target in recipe.targets if recipe.device(target) != "cpu"}
        if fmt == "compressed-tensors":
            shutil.copytree(calibrated, folder)
            artifacts.append(_artifact(variant, fmt, folder, folder, "transformers", details, {}))
            continue
        _writer(fmt)(calibrated, folder)
        needed = memory.folder_check(info, variant, recipe.evaluation.seq_len)
        if budget_bytes is not None and needed > budget_bytes:  # the check could not run: no build for it
            why = f"checking the {fmt} folder (through an ONNX build, in onnxruntime-genai) {memory.describe(needed, budget_bytes)}"
            artifacts.append(_artifact(variant, fmt, folder, folder, VIA_ONNX_BUILD, details, {**skipped, **{t: (NOT_VERIFIED, why) for t in recipe.targets if recipe.device(t) == "cpu"}}))
            continue
        build = run_builder(folder, space.work(f"{fmt}-onnx-cpu"), "int4" if variant.bits == 4 else "int8", "cpu",
                            _exact_build_options(details["layer_plan"]), space.cache, space.work(f"{fmt}-onnx-cpu.log"))
        artifacts.append(_artifact(variant, fmt, folder, build, VIA_ONNX_BUILD, details, skipped))
    return artifacts


def _writer(fmt: str):
    if fmt == "gptq":
        return write_gptq_v1
    from compress.export.awq_gemm import write_awq_gemm

    return write_awq_gemm


def _exact_build_options(plan: dict[str, int]) -> dict[str, str]:
    """Builder options that carry a pre-quantized folder as it is: fp32 compute, float layers left float."""
    options = {"accuracy_level": "1", "hf_token": "false"}
    if excluded := excluded_nodes(plan):
        options["nodes_to_exclude"] = ",".join(excluded)
    return options


def _onnx_artifacts(variant, recipe, info: ModelInfo, run_dir: Path, space: Workspace,
                    budget_bytes: int | None) -> list[Artifact]:
    plan = variant_plan(info.config, variant)
    details: dict = {"layer_plan": plan, "layer_bits": plan_summary(plan), "log": str(space.log)}
    carried_head = False
    if variant.from_:
        details["from"] = f"integer weights of {variant.from_} (its saved calibration, repacked to GPTQ v1)"
        calibration = json.loads((run_dir / "work" / variant.from_ / "calibration.json").read_text())
        carried = calibration["layer_plan"]
        plan = {**plan, **{layer: bits for layer, bits in carried.items() if layer != "lm_head"}}
        if carried.get("lm_head", KEEP) != KEEP:  # the source's own integers, carried like every layer
            plan["lm_head"], carried_head = carried["lm_head"], True
        if "sensitivity" in calibration:  # the same integer weights; the builder's compute type aside
            details["sensitivity"] = calibration["sensitivity"]
        details["layer_bits"] = plan_summary(plan)
    details["layer_plan"] = plan
    # int8-dynamic: the builder's fp32 graph streams its weights, quantize_dynamic then holds the graph.
    # A plan that keeps decoder layers float: the builder's GPTQ reader needs every decoder layer quantized,
    # so the builder rounds the float checkpoint itself (and holds it whole: preflight's estimate says so).
    from_float = not variant.from_ and (variant.method == "onnx-int8-dynamic" or keeps_decoder_layers(plan))
    options = builder_options(variant, plan, carried_head)
    tie = carried_head and ties_table(info.config, plan["lm_head"])
    if tie:  # the embedding gathers from the carried 8-bit head's integers, as from a head the builder rounds
        options["shared_embeddings"] = "true"
    details["builder_options"] = options
    head_rounded = plan.get("lm_head", KEEP) != KEEP and not carried_head
    needed = memory.onnx_build(memory.Shapes.from_info(info), variant.method, from_float, head_rounded, carried_head)

    def source() -> Path:
        if variant.from_:  # 8-bit layers and a quantized head as the source has them
            return carried_source(calibrated_folder(run_dir, variant.from_), space.work(f"from-{variant.from_}-gptq"), tie)
        if from_float:
            return info.path
        details["from"] = (f"round-to-nearest {ONNX_PRECISION[variant.method]} weights written layer by layer by compress "
                           "(the builder never loads the float model); the builder rounds only what the folder leaves float")
        return _rounded_source(variant, info, space, budget_bytes)

    def build(source: Path, folder: Path, device: str, log: Path) -> None:
        if variant.method == "onnx-int8-dynamic":
            fp32 = run_builder(source, space.work(f"{_onnx_format(device)}-fp32"), "fp32", device, {"hf_token": "false"},
                               space.cache, log)
            quantize_dynamic_int8(fp32, folder, [layer for layer, bits in plan.items() if bits == KEEP])
        else:
            run_builder(source, folder, ONNX_PRECISION[variant.method], device, options, space.cache, log)

    return onnx_builds(variant, recipe, space, details, needed, budget_bytes, source, build)


def onnx_builds(variant, recipe, space: Workspace, details: dict, needed: int, budget_bytes: int | None,
                source: Callable[[], Path], build: Callable[[Path, Path, str, Path], None]) -> list[Artifact]:
    """An ONNX folder per device the targets name (`build(source, folder, device, log)`, from the folder `source()`
    writes once), each verified in onnxruntime-genai on the targets of its device; a device whose runtime is
    missing here, or whose build does not fit `budget_bytes` (`needed`), is reported with why on its targets, and
    with no build left the variant is reported unmade."""
    for device in recipe.devices():
        fmt = _onnx_format(device)
        reason = availability(device, "onnxruntime-genai")
        if not reason and budget_bytes is not None and needed > budget_bytes:
            reason = f"the ONNX builder {memory.describe(needed, budget_bytes)}"
        if reason:
            details.setdefault("not_built", {})[fmt] = reason
    buildable = [device for device in recipe.devices() if _onnx_format(device) not in details.get("not_built", {})]
    made = source() if buildable else None
    artifacts = []
    for device in buildable:
        fmt = _onnx_format(device)
        folder = space.staging(fmt)
        build(made, folder, device, space.work(f"{fmt}-builder.log"))
        others = {t: (NOT_APPLICABLE, f"built for the {device} provider; see its {_onnx_format(recipe.device(t))} row")
                  for t in recipe.targets if recipe.device(t) != device}
        artifacts.append(_artifact(variant, fmt, folder, folder, "onnxruntime-genai", details, others))
    for fmt, reason in details.get("not_built", {}).items():
        for artifact in artifacts:
            for target in recipe.targets:
                if _onnx_format(recipe.device(target)) == fmt:
                    artifact.skipped[target] = (NOT_VERIFIED, f"the {fmt} build was not made: {reason}")
    if not artifacts:  # nothing could be built here: the variant is still reported, not verified, never released
        skipped = {target: (NOT_VERIFIED, f"not built: {details['not_built'][_onnx_format(recipe.device(target))]}")
                   for target in recipe.targets}
        artifacts.append(unmade_artifact(variant, space, "onnx", "onnxruntime-genai", details, skipped))
    return artifacts


def unmade_artifact(variant, space: Workspace, fmt: str, runtime: str, details: dict,
                    verdicts: dict[str, tuple[str, str]]) -> Artifact:
    """A variant whose artifact could not be made: an empty staging folder, reported with `verdicts` (target ->
    (status, why)) on every target, never run, never released."""
    folder = space.staging(fmt)
    folder.mkdir(parents=True, exist_ok=True)
    return Artifact(variant.name, variant.method, fmt, folder, runtime, 0, {"bits_per_weight": None, "bits_per_weight_all": None},
                    details, runnable=folder, skipped=verdicts)


def _onnx_format(device: str) -> str:
    """The format name of an ONNX build for `device`: onnx (cpu), onnx-cuda."""
    return "onnx" if device == "cpu" else f"onnx-{device}"


def _rounded_source(variant, info: ModelInfo, space: Workspace, budget_bytes: int | None) -> Path:
    """A GPTQ v1 folder of round-to-nearest weights for an ONNX variant without `from:`, written layer by layer,
    so the builder reads integer weights (`-i`) instead of loading the float model whole. The head stays float
    here: the builder's options (8-bit head, excluded nodes) decide what becomes of it, as before."""
    bits = {"onnx-int4": 4, "onnx-int8": 8}[variant.method]
    rtn = variant.model_copy(update={"method": "rtn", "bits": bits, "ignore": [*variant.ignore, "lm_head"]})
    rounded = space.work("rounded")
    shutil.rmtree(rounded, ignore_errors=True)
    calibrate_streaming(info.path, rtn, None, rounded, space.work("activations"), budget_bytes)
    memory.give_back_freed_memory()
    return write_gptq_v1(rounded, space.work("rounded-gptq"))


def _artifact(variant, fmt: str, folder: Path, runnable: Path, runtime: str, details: dict, skipped: dict) -> Artifact:
    onnx = (runnable / "model.onnx").is_file() and runnable == folder
    bits = onnx_bits_per_weight(*read_onnx(folder)) if onnx else checkpoint_bits(folder)
    return Artifact(variant.name, variant.method, fmt, folder, runtime, folder_bytes(folder), bits, details,
                    runnable=runnable, skipped=dict(skipped))
