"""Issue 14's measurements on a selection slice (text neither calibration nor the verdict sees): each linear
layer's predicted KLD at every candidate setting, and the KLD a whole mixed plan really causes.

Candidates are calibrated compressed-tensors folders of the same model (one per setting, every decoder layer
at that setting); a plan names, per layer, the candidate whose weights it takes. Both passes run one decoder
layer at a time (compress.layerwise, compress.quantize.fisher), within the hidden states' budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compress.export.repack import dequantize
from compress.layerwise import LayerwiseModel, run_all_layers
from compress.quantize.fisher import layer_fisher, predicted_kld
from compress.tensors import TensorFolder
from compress.verify.layers import stored_linear


def candidate_predictions(model_folder: Path, candidates: dict[str, Path], windows: np.ndarray, seed: int = 0,
                          budget_bytes: int | None = None, spill_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """{layer: {candidate: predicted KLD per token}} for every layer a candidate quantizes: ½ Σ F·(W − Ŵ)² with
    the Fisher of the float model on `windows` and Ŵ the candidate's own dequantized weights."""
    folders = {name: TensorFolder(path) for name, path in candidates.items()}
    predictions: dict[str, dict[str, float]] = {}

    def each_linear(layer: str, weight: torch.Tensor, fisher: torch.Tensor) -> None:
        for name, tensors in folders.items():
            if f"{layer}.weight_packed" in tensors:
                quantized = torch.from_numpy(dequantize(stored_linear(tensors, layer)))
                predictions.setdefault(layer, {})[name] = predicted_kld(fisher, weight, quantized, windows.shape[1])

    try:
        layer_fisher(model_folder, windows, each_linear, seed=seed, budget_bytes=budget_bytes, spill_dir=spill_dir)
    finally:
        for tensors in folders.values():
            tensors.close()
    return predictions


def plan_kld(model_folder: Path, plan: dict[str, Path], windows: np.ndarray, budget_bytes: int | None = None,
             spill_dir: Path | None = None, reference: list[np.ndarray] | None = None) -> tuple[float, float]:
    """(mean KLD per token, its standard error over windows) of the float model with each layer in `plan`
    replaced by that candidate folder's dequantized weights, against the float model (`reference`, from
    float_logprobs, where already computed) on `windows`."""
    reference = reference if reference is not None else float_logprobs(model_folder, windows, budget_bytes, spill_dir)
    mixed = _logprobs(model_folder, plan, windows, budget_bytes, spill_dir)
    per_window = np.array([(np.exp(r) * (r - m)).sum(-1).mean() for r, m in zip(reference, mixed, strict=True)])
    return float(per_window.mean()), float(per_window.std(ddof=1) / np.sqrt(len(per_window)))


def float_logprobs(model_folder: Path, windows: np.ndarray, budget_bytes: int | None = None,
                   spill_dir: Path | None = None) -> list[np.ndarray]:
    """The float model's next-token log-probs of each window [seq_len, vocab], layer by layer."""
    return _logprobs(model_folder, {}, windows, budget_bytes, spill_dir)


def _logprobs(model_folder: Path, plan: dict[str, Path], windows: np.ndarray, budget_bytes: int | None,
              spill_dir: Path | None) -> list[np.ndarray]:
    folders = {path: TensorFolder(path) for path in set(plan.values())}

    def each_layer(index: int, layer: torch.nn.Module, _inputs) -> torch.nn.Module:
        prefix = f"model.layers.{index}."
        for name, path in plan.items():
            if name.startswith(prefix):
                weight = layer.get_submodule(name[len(prefix):]).weight
                weight.data = torch.from_numpy(dequantize(stored_linear(folders[path], name))).to(weight.dtype)
        return layer

    try:
        with LayerwiseModel(model_folder) as model:
            hidden = run_all_layers(model, windows, budget_bytes, spill_dir, each_layer)
            result = []
            for index in range(len(windows)):
                with torch.inference_mode():
                    logits = model.head_logits(hidden.read(index, index + 1)[0])
                    result.append(torch.log_softmax(logits, dim=-1).numpy())
            hidden.delete()
    finally:
        for tensors in folders.values():
            tensors.close()
    return result
