"""An auto variant's artifact: the smallest mixed-precision compressed-tensors folder whose KLD meets its budget.

1. Each candidate setting is calibrated with the variant's base quantizer over the whole model (one extra
   calibration pass per candidate, layer by layer, as every calibration here).
2. On a selection slice — calibration-length windows of the calibration text that overlap none of the
   calibration samples, and never the evaluation windows — the Fisher of the float model predicts each
   layer's KLD at each candidate (compress.quantize.sensitivity).
3. A knapsack picks the fewest bytes whose predicted KLD meets the budget (compress.quantize.automix); the plan's
   KLD is measured on the selection slice, and where it misses the budget the predictions are scaled by
   measured ÷ predicted and the plan chosen again (at most MAX_EVALUATIONS measurements).
4. The folder takes each layer's tensors from its candidate's calibration; it is then verified like any
   other artifact, on the evaluation windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress import memory
from compress.data import load_documents, selection_windows, token_stream
from compress.model import ModelInfo
from compress.produce import Workspace, unmade_artifact
from compress.quantize.automix import BudgetTooSmall, Option, choose_plan, packed_bytes, plan_bits
from compress.quantize.sensitivity import candidate_predictions, float_reference, plan_kld
from compress.quantize.streaming import calibrate_streaming, mixed_quantization_config, publish_folder
from compress.release import write_json_atomic
from compress.results import FAIL, Artifact
from compress.tensors import TensorFolder
from compress.verify.accuracy import Reference
from compress.verify.size import checkpoint_bits, folder_bytes

QUANTIZED_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


@dataclass(frozen=True)
class Chosen:
    """An auto variant's plan: each layer's candidate, the candidates' calibrated folders, how it was chosen."""

    plan: dict[str, str]
    candidates: dict[str, Path]
    details: dict


def auto_artifacts(variant, recipe, info: ModelInfo, samples: np.ndarray, space: Workspace, stamp: str,
                   budget_bytes: int | None) -> list[Artifact]:
    try:
        chosen = choose(variant, recipe, info, samples, space, stamp, budget_bytes)
    except BudgetTooSmall as error:
        return [unmet(variant, recipe, space, "compressed-tensors", "transformers", error)]
    folder = space.staging("compressed-tensors")
    write_mixed(info.path, chosen.plan, chosen.candidates, variant, folder)
    return [Artifact(variant.name, variant.method, "compressed-tensors", folder, "transformers", folder_bytes(folder),
                     checkpoint_bits(folder), chosen.details, runnable=folder)]


def choose(variant, recipe, info: ModelInfo, samples: np.ndarray, space: Workspace, stamp: str,
           budget_bytes: int | None) -> Chosen:
    """Steps 1-3: candidates, predictions on the selection slice, the plan (BudgetTooSmall where none fits)."""
    started = time.perf_counter()
    hidden_budget = None if budget_bytes is None else memory.activation_budget(budget_bytes)
    candidates = _calibrated_candidates(variant, info, samples, space, stamp, budget_bytes)
    selection = selection_slice(recipe, variant, info)
    predictions = _predictions(info, candidates, selection, recipe.calibration.seed, hidden_budget, space, stamp)
    options, weights = _options(variant, info, candidates, predictions)
    reference = reference_on_selection(info.path, selection, hidden_budget, space, stamp, recipe.evaluation.top_k)

    def measure(plan: dict[str, Option]) -> tuple[float, float]:
        return plan_kld(info.path, {layer: candidates[o.name] for layer, o in plan.items() if o.name != "keep"}, selection,
                        hidden_budget, space.work("activations"), reference)

    plan, steps = choose_plan(options, weights, measure, variant.budget.max_kld, variant.budget.max_bits_per_weight)
    details = {"layer_plan": {layer: option.name for layer, option in plan.items()},
               "layer_bits": dict(Counter(option.name for option in plan.values())),
               "automix": automix_record(variant, variant.base, selection, predictions, plan, steps, weights, started, space),
               "log": str(space.log)}
    return Chosen({layer: option.name for layer, option in plan.items()}, candidates, details)


def unmet(variant, recipe, space: Workspace, fmt: str, runtime: str, error: BudgetTooSmall) -> Artifact:
    """The variant reported as failing on every target: no plan of its candidates meets its budget."""
    why = f"no plan of these candidates meets the budget: {error}"
    return unmade_artifact(variant, space, fmt, runtime, {"log": str(space.log)}, {target: (FAIL, why) for target in recipe.targets})


def reference_on_selection(model_path: Path, selection: np.ndarray, hidden_budget: int | None, space: Workspace, stamp: str,
               top_k: int) -> Reference:
    """float_reference on the selection slice, kept in the run's work folder for every auto variant that chooses
    on the same windows of the same model."""
    key = hashlib.sha256(json.dumps(top_k).encode() + selection.tobytes()).hexdigest()[:16]
    saved = candidates_folder(space.run_dir, stamp) / f"reference-{key}.npz"
    if saved.is_file():
        with np.load(saved) as arrays:
            return Reference(**arrays)
    reference = float_reference(model_path, selection, hidden_budget, space.work("activations"), top_k)
    saved.parent.mkdir(parents=True, exist_ok=True)
    np.savez(saved.with_suffix(".partial.npz"), **reference.as_arrays())
    os.replace(saved.with_suffix(".partial.npz"), saved)
    return reference


def _calibrated_candidates(variant, info: ModelInfo, samples: np.ndarray, space: Workspace, stamp: str,
                           budget_bytes: int | None) -> dict[str, Path]:
    """{candidate: its calibrated folder}: the whole model at that setting with the base quantizer (layers the
    variant ignores kept). A folder calibrated before from the same inputs (`stamp`: the same base, model, data
    and versions, whatever the budget) is reused, by this variant or another."""
    found = {}
    shared = candidates_folder(space.run_dir, stamp)
    for name, setting in variant.candidate_settings().items():
        if setting is None:
            continue
        folder, record = shared / name, shared / f"{name}.stamp"
        if not (folder / "config.json").is_file() or not record.is_file() or record.read_text() != stamp:
            partial = shared / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            single = variant.model_copy(update={"method": variant.base, "bits": setting[0], "group_size": setting[1]})
            calibrate_streaming(info.path, single, samples, partial, space.work("activations"), budget_bytes)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
            record.write_text(stamp)
            memory.give_back_freed_memory()
        found[name] = folder
    return found


def _predictions(info: ModelInfo, candidates: dict[str, Path], selection: np.ndarray, seed: int,
                 hidden_budget: int | None, space: Workspace, stamp: str) -> dict[str, dict[str, float]]:
    """candidate_predictions, kept beside the candidates per candidate: each candidate's terms depend only on it,
    the float model, the selection and the seed (which samples the labels), so auto variants with other menus
    of the same candidates (an ONNX one beside a compressed-tensors one) compute only the candidates not seen yet."""
    key = hashlib.sha256(json.dumps(seed).encode() + selection.tobytes()).hexdigest()[:16]
    saved = candidates_folder(space.run_dir, stamp) / f"predictions-{key}.json"
    known: dict[str, dict[str, float]] = json.loads(saved.read_text()) if saved.is_file() else {}  # {candidate: {layer: kld}}
    if missing := {name: path for name, path in candidates.items() if name not in known}:
        found = candidate_predictions(info.path, missing, selection, seed=seed, budget_bytes=hidden_budget,
                                      spill_dir=space.work("activations"))
        for name in missing:
            known[name] = {layer: by_candidate[name] for layer, by_candidate in found.items() if name in by_candidate}
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, known)
    predictions: dict[str, dict[str, float]] = {}
    for name in candidates:
        for layer, kld in known[name].items():
            predictions.setdefault(layer, {})[name] = kld
    return predictions


def shared_json(run_dir: Path, stamp: str, kind: str, inputs: list, selection: np.ndarray, compute):
    """compute(), kept as json beside the candidates of `stamp` under the inputs and selection it came from, and
    read back by every auto variant that asks for it again (a matrix of budgets computes it once)."""
    key = hashlib.sha256(json.dumps(inputs).encode() + selection.tobytes()).hexdigest()[:16]
    saved = candidates_folder(run_dir, stamp) / f"{kind}-{key}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    saved.parent.mkdir(parents=True, exist_ok=True)
    value = compute()
    write_json_atomic(saved, value)
    return value


def automix_record(variant, base: str, selection: np.ndarray, predictions: dict[str, dict[str, float]],
                   plan: dict[str, Option], steps: list[dict], weights: int, started: float, space: Workspace) -> dict:
    """How the plan was chosen, for the manifest and the report (and the variant's work folder)."""
    budget = variant.budget
    record = {"budget": budget.model_dump(), "base": base, "candidates": list(variant.candidates),
              "selection_windows": int(len(selection)), "selection_tokens": int(selection.size),
              "predicted": {layer: {name: round(kld, 8) for name, kld in found.items()} for layer, found in predictions.items()},
              "contributions": {layer: round(option.kld, 8) for layer, option in plan.items()},
              "steps": steps, "bits_per_weight": round(plan_bits(plan, weights), 4),
              "met_on_selection": budget.max_kld is None or any(step["measured"] <= budget.max_kld for step in steps),
              "seconds": round(time.perf_counter() - started, 1)}
    space.work("automix.json").parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(space.work("automix.json"), record)
    return record


def candidates_folder(run_dir: Path, stamp: str) -> Path:
    """Where auto variants of the same base and inputs keep their calibrated candidates."""
    return run_dir / "work" / "auto-candidates" / stamp[:16]


def selection_slice(recipe, variant, info: ModelInfo) -> np.ndarray:
    from transformers import AutoTokenizer

    calibration = recipe.calibration
    tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True, trust_remote_code=False)
    tokenizer.model_max_length = 1 << 30
    stream = token_stream(load_documents(calibration.dataset), tokenizer)
    return selection_windows(stream, calibration.seq_len, variant.selection, calibration.samples, calibration.seed)


def _options(variant, info: ModelInfo, candidates: dict[str, Path],
             predictions: dict[str, dict[str, float]]) -> tuple[dict[str, list[Option]], int]:
    """Each layer's choices: every candidate with its bytes and predicted KLD, and keep (its stored bytes);
    with the weights of all these layers."""
    settings = variant.candidate_settings()
    stored = {"F32": 4}.get(info.stored_dtype, 2)
    with TensorFolder(next(iter(candidates.values()))) as tensors:
        shapes = {layer: tuple(int(size) for size in tensors.array(f"{layer}.weight_shape")) for layer in predictions}
    options = {}
    for layer, found in predictions.items():
        out_features, in_features = shapes[layer]
        options[layer] = [Option(name, packed_bytes(out_features, in_features, *settings[name], variant.symmetric, stored), kld)
                          for name, kld in found.items()]
        if "keep" in settings and (variant.formats != ["onnx"] or layer == "lm_head"):  # ONNX: every decoder layer quantized
            options[layer].append(Option("keep", out_features * in_features * stored, 0.0))
    return options, sum(out_features * in_features for out_features, in_features in shapes.values())


def write_mixed(model_path: Path, plan: dict[str, str], candidates: dict[str, Path], variant, out: Path) -> None:
    """A compressed-tensors folder: each planned layer's tensors from its candidate's calibration, every other
    tensor (kept layers, norms, embedding, head) from the float checkpoint, config groups per setting."""
    from compress.export.shards import ShardWriter

    settings = variant.candidate_settings()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = ShardWriter(partial)
    folders = {name: TensorFolder(path) for name, path in candidates.items()}
    try:
        with TensorFolder(model_path) as original:
            pieces: dict[str, list[str]] = {}  # a decoder layer's tensors, or one other tensor: a shard each
            for name in original.keys():
                pieces.setdefault(".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name, []).append(name)
            for names in pieces.values():
                for name in names:
                    module = name.rsplit(".", 1)[0]
                    choice = plan.get(module, "keep")
                    if choice == "keep":
                        writer.add(name, original.tensor(name))
                        continue
                    _copy_quantized(folders[choice], module, writer)
                writer.flush()
            if plan.get("lm_head", "keep") != "keep" and "lm_head.weight" not in original:  # tied: the head on its own
                _copy_quantized(folders[plan["lm_head"]], "lm_head", writer)
                writer.flush()
        shards = writer.close()
    finally:
        for tensors in folders.values():
            tensors.close()
    schemes = {layer: settings[choice] for layer, choice in plan.items() if choice != "keep"}
    kept = [layer for layer, choice in plan.items() if choice == "keep"] + ["lm_head"] * ("lm_head" not in plan)
    actorder = "static" if variant.base == "gptq" else None
    publish_folder(shards, partial, out, model_path, mixed_quantization_config(schemes, kept, variant.symmetric, actorder),
                   untie="lm_head" in schemes)


def _copy_quantized(tensors: TensorFolder, module: str, writer) -> None:
    for part in QUANTIZED_PARTS:
        if f"{module}.{part}" in tensors:
            writer.add(f"{module}.{part}", tensors.tensor(f"{module}.{part}"))
