"""An auto variant in GGUF: each tensor's llama.cpp type chosen for the smallest file that meets the budget.

1. llama-quantize writes the float GGUF (shared with gguf variants) once per candidate type, every tensor at
   that type (--pure; the head and the embedding too; llama.cpp's importance matrix where a candidate is a
   K-quant), shared by the auto variants of the run.
2. On the selection slice (compress.produce_auto) the second-order estimate (compress.quantize.fisher)
   predicts each tensor's KLD at each type from the candidates' own dequantized tensors; a tied embedding
   table counts as head and embedding both (the one tensor serves both in llama.cpp).
3. A knapsack picks the plan (compress.quantize.automix.choose_plan); each plan is written by llama-quantize
   with a type per tensor and its KLD measured in llama.cpp itself on the selection slice, as the verdict
   measures it, and the predictions are rescaled until a plan meets the budget.
4. The chosen plan's file is released with the tokenizer and an Ollama Modelfile, and verified like every
   gguf artifact.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from compress.export import gguf
from compress.export.onnx_genai import phi3_linear_names
from compress.model import ModelInfo
from compress.produce import Workspace, unmade_artifact
from compress.produce_auto import (
    automix_record,
    candidates_folder,
    reference_on_selection,
    selection_slice,
    shared_json,
)
from compress.produce_gguf import RUNTIME, float_gguf, float_outtype, importance_matrix, release_folder
from compress.quantize.automix import BudgetTooSmall, Option, choose_plan
from compress.quantize.fisher import quadratic_klds
from compress.quantize.sensitivity import blocks_kld
from compress.results import FAIL, Artifact

TIED = "token_embd.weight"


def auto_gguf_artifacts(variant, recipe, info: ModelInfo, samples: np.ndarray, run_dir: Path, space: Workspace,
                        stamp: str, stop_ids: list[int], budget_bytes: int | None) -> list[Artifact]:
    """The variant's GGUF folder in staging/; where a llama.cpp tool fails or no plan meets the budget, the
    variant is reported failed with its sentence and the run goes on."""
    from compress import memory

    started = time.perf_counter()
    threads = int(os.environ.get("COMPRESS_THREADS", os.cpu_count() or 1))
    hidden_budget = None if budget_bytes is None else memory.activation_budget(budget_bytes)
    details: dict = {"log": str(space.log)}
    try:
        source = float_gguf(info, run_dir, space.log)
        described: dict = {"float_gguf": float_outtype(info).upper()}
        matrix = importance_matrix(variant, info, samples, run_dir, space, source, threads, budget_bytes, described)
        candidates = _candidate_files(variant, source, matrix, candidates_folder(run_dir, stamp), threads, space.log)
        selection = selection_slice(recipe, variant, info)
        predictions, tensors = shared_json(
            run_dir, stamp, "gguf-predictions", [sorted(path.name for path in candidates.values()), recipe.calibration.seed],
            selection, lambda: _predictions(info, candidates, selection, recipe.calibration.seed, hidden_budget, space))
        options, weights = _options(source, candidates, predictions)
        reference = reference_on_selection(info.path, selection, hidden_budget, space, stamp, recipe.evaluation.top_k)
        keep = float_outtype(info)
        written: dict[tuple, Path] = {}

        def measure(plan: dict[str, Option]) -> tuple[float, float]:
            path = space.work(f"plans/plan-{len(written)}.gguf")
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_plan(source, path, plan, keep, matrix, threads, space.log)
            written[_names(plan)] = path
            return _llama_cpp_kld(path, selection, reference, threads)

        try:
            plan, steps = choose_plan(options, weights, measure, variant.budget.max_kld, variant.budget.max_bits_per_weight)
        except BudgetTooSmall as error:
            why = f"no plan of these candidates meets the budget: {error}"
            return [unmade_artifact(variant, space, "gguf", RUNTIME, details, {target: (FAIL, why) for target in recipe.targets})]
    except gguf.GgufError as error:
        return [unmade_artifact(variant, space, "gguf", RUNTIME, details, {target: (FAIL, str(error)) for target in recipe.targets})]
    folder = space.staging("gguf")
    folder.mkdir(parents=True)
    out_file = folder / f"{variant.name}.gguf"
    shutil.move(str(written[_names(plan)]), out_file)
    shutil.rmtree(space.work("plans"), ignore_errors=True)
    types = gguf.tensor_types(out_file)
    hf = {name: layer for layer, name in tensors.items()}
    details.update({
        "layer_plan": {hf.get(name, name): option.name for name, option in plan.items()},
        "layer_bits": dict(Counter(option.name for option in plan.values())),
        "gguf": {**described, "tensor_types": dict(sorted(Counter(types.values()).items()))},
        "automix": automix_record(variant, "llama-quantize", selection, predictions, plan, steps, weights, started, space),
    })
    return [release_folder(variant, recipe, info, out_file, stop_ids, details)]


def _names(plan: dict[str, Option]) -> tuple:
    return tuple(option.name for option in plan.values())


def _candidate_files(variant, source: Path, matrix: Path | None, shared: Path, threads: int, log: Path) -> dict[str, Path]:
    """{type: the float GGUF with every tensor at that type}, written once per run and shared."""
    shared.mkdir(parents=True, exist_ok=True)
    found = {}
    for kind in variant.candidates:
        if kind == "keep":
            continue
        path = shared / f"gguf-{kind}{'-imatrix' if matrix else ''}.gguf"
        if not path.is_file():
            partial = path.with_suffix(".partial")
            gguf.quantize(source, partial, kind, {}, kind, kind, matrix, threads, log, pure=True)
            os.replace(partial, path)
        found[kind] = path
    return found


def _tensors(config: dict, reader) -> dict[str, str]:
    """{Hugging Face layer: its GGUF tensor} for every tensor a plan chooses: the linear layers, the head (the
    embedding table where tied) and the embedding."""
    names = gguf.gguf_name_map(config)
    present = {tensor.name for tensor in reader.tensors}
    found = {layer: gguf.tensor_name(names, layer + ".weight") for layer in phi3_linear_names(config)}
    found["lm_head"] = "output.weight" if "output.weight" in present else TIED
    found["model.embed_tokens"] = TIED
    return found


def _predictions(info: ModelInfo, candidates: dict[str, Path], selection: np.ndarray, seed: int,
                 hidden_budget: int | None, space: Workspace) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{GGUF tensor: {type: predicted KLD}} from each candidate file's own dequantized tensors; a tied table's
    terms as head and as embedding added up. -> (that, {Hugging Face layer: GGUF tensor})."""
    module = gguf.gguf_module()
    readers = {kind: module.GGUFReader(str(path)) for kind, path in candidates.items()}
    tensors = _tensors(info.config, next(iter(readers.values())))
    by_name = {kind: {tensor.name: tensor for tensor in reader.tensors} for kind, reader in readers.items()}

    def deltas(layer: str, weight: torch.Tensor, rows: np.ndarray | None) -> dict[str, torch.Tensor | GgufRows]:
        changes = {}
        for kind, found in by_name.items():
            change = GgufRows(module, found[tensors[layer]], weight)
            if layer == "lm_head":  # a block of rows at a time, from the memory-mapped file
                changes[kind] = change
            elif rows is None:
                changes[kind] = change[0:change.shape[0]].half()
            else:
                changes[kind] = change.take(rows).half()
        return changes

    found, _labels = quadratic_klds(info.path, selection, deltas, seed=seed, budget_bytes=hidden_budget,
                                    spill_dir=space.work("activations"), head=True, embedding=True)
    predictions: dict[str, dict[str, float]] = {}
    for layer, by_kind in found.items():
        for kind, kld in by_kind.items():
            total = predictions.setdefault(tensors[layer], {})
            total[kind] = total.get(kind, 0.0) + kld
    return predictions, tensors


class GgufRows:
    """One candidate's change to a matrix, dequantized from its memory-mapped GGUF tensor a block of rows at a
    time (the head's and the embedding's would be 1.2 GB each in float16 at Phi-4-mini's vocabulary)."""

    def __init__(self, module, tensor, weight: torch.Tensor):
        self.module, self.tensor, self.weight = module, tensor, weight
        self.shape = tuple(weight.shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self._values(self.tensor.data[start:stop]) - self.weight[start:stop].float()

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """The change of the given rows (`weight` holds just those rows)."""
        return self._values(self.tensor.data[rows]) - self.weight.float()

    def _values(self, data) -> torch.Tensor:
        values = np.asarray(self.module.quants.dequantize(np.asarray(data), self.tensor.tensor_type), dtype=np.float32)
        return torch.from_numpy(values.reshape(len(data), -1))


def _options(source: Path, candidates: dict[str, Path], predictions: dict[str, dict[str, float]]) -> tuple[dict[str, list[Option]], int]:
    """Each tensor's choices: every candidate type with the bytes it takes in that candidate's file (a type
    llama.cpp could not use there fell back to another, as it will in the plan's file), and keep (its float
    bytes). With the weights of all these tensors."""
    module = gguf.gguf_module()
    sizes = {kind: {tensor.name: int(tensor.n_bytes) for tensor in module.GGUFReader(str(path)).tensors}
             for kind, path in candidates.items()}
    floats = {tensor.name: (int(tensor.n_bytes), int(tensor.n_elements)) for tensor in module.GGUFReader(str(source)).tensors}
    options = {name: [Option(kind, sizes[kind][name], kld) for kind, kld in by_kind.items()] + [Option("keep", floats[name][0], 0.0)]
               for name, by_kind in predictions.items()}
    return options, sum(floats[name][1] for name in predictions)


def _write_plan(source: Path, out_file: Path, plan: dict[str, Option], keep: str, matrix: Path | None, threads: int,
                log: Path) -> None:
    """llama-quantize with each tensor's type from the plan (keep: the float GGUF's own type)."""
    types = {name: keep if option.name == "keep" else option.name for name, option in plan.items()}
    common = Counter(kind for kind in types.values() if kind != keep).most_common(1)
    output = types.pop("output.weight", None)
    embedding = types.pop(TIED, None)
    gguf.quantize(source, out_file, common[0][0] if common else "Q8_0", types, output, embedding, matrix, threads, log, pure=True)


def _llama_cpp_kld(path: Path, windows: np.ndarray, reference, threads: int) -> tuple[float, float]:
    """The plan's KLD measured in llama.cpp on the selection windows against the float reference."""
    from compress.runtimes.llama_cpp import LlamaCppRuntime

    runtime = LlamaCppRuntime(path, "cpu", threads, context_tokens=windows.shape[1])
    try:
        return blocks_kld(reference, runtime.window_logprobs(windows), windows)
    finally:
        runtime.llm.close()
