"""Issue 14's measurements on a selection slice (text neither calibration nor the verdict sees): each linear
layer's predicted KLD at every candidate setting, and the KLD a whole mixed plan really causes.

Candidates are calibrated compressed-tensors folders of the same model (one per setting, every decoder layer
at that setting); a plan names, per layer, the candidate whose weights it takes. Both passes run one decoder
layer at a time (compress.layerwise, compress.quantize.fisher), within the hidden states' budget.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from compress.export.repack import dequantize, unpack_compressed_tensors, unpack_int32
from compress.layerwise import HEAD_ROWS, window_logprobs
from compress.quantize.fisher import quadratic_klds
from compress.tensors import TensorFolder
from compress.verify.accuracy import Reference, stack_windows, summarise, window_figures, window_reference
from compress.verify.layers import stored_linear


def candidate_predictions(model_folder: Path, candidates: dict[str, Path], windows: np.ndarray, seed: int = 0,
                          budget_bytes: int | None = None, spill_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """{layer: {candidate: predicted KLD per token}} for every layer a candidate quantizes (the head too): the
    Fisher's quadratic form token by token (compress.quantize.fisher) for the change from the float weights to
    the candidate's own dequantized ones."""
    folders = {name: TensorFolder(path) for name, path in candidates.items()}

    def deltas(layer: str, weight: torch.Tensor, _rows) -> dict[str, torch.Tensor]:
        return {name: weight_change(tensors, layer, weight) for name, tensors in folders.items()
                if f"{layer}.weight_packed" in tensors}

    head = any("lm_head.weight_packed" in tensors for tensors in folders.values())
    try:
        predictions, _labels = quadratic_klds(model_folder, windows, deltas, seed=seed, budget_bytes=budget_bytes,
                                              spill_dir=spill_dir, head=head)
    finally:
        for tensors in folders.values():
            tensors.close()
    return predictions


def weight_change(tensors: TensorFolder, layer: str, weight: torch.Tensor) -> torch.Tensor | PackedRows:
    """A compressed-tensors layer's dequantized weights minus `weight`: float16 [out, in] for a decoder layer's
    linear; for the head, PackedRows that make it a block of rows at a time from the packed codes (seven
    candidates' float16 changes to Phi-4-mini's head were 8.6 GB, and the sensitivity pass ran out of memory)."""
    change = PackedRows(tensors, layer, weight)
    if layer == "lm_head":
        return change
    return change[0:weight.shape[0]].half()


class PackedRows:
    """A compressed-tensors matrix, rows [start:stop] at a time in float32: its packed codes held (half a byte per
    weight at 4 bits), unpacked and dequantized per block, less the original's rows where `weight` is given (one
    candidate's change to it)."""

    def __init__(self, tensors: TensorFolder, layer: str, weight: torch.Tensor | None = None):
        self.packed = tensors.array(f"{layer}.weight_packed")
        rows, self.columns = (int(size) for size in tensors.array(f"{layer}.weight_shape"))
        self.scale = tensors.array(f"{layer}.weight_scale").reshape(rows, -1)
        self.bits, self.group = self.packed.shape[1] * 32 // self.columns, self.columns // self.scale.shape[1]
        zero = f"{layer}.weight_zero_point"
        # asymmetric zero points are packed across rows: unpacked once ([rows, groups], small)
        self.zeros = unpack_int32(tensors.array(zero).T, self.bits, rows).T if zero in tensors else None
        self.weight, self.shape = weight, (rows, self.columns)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        linear = unpack_compressed_tensors(self.packed[start:stop], self.scale[start:stop], None, (stop - start, self.columns),
                                           self.bits, self.group, True)
        if self.zeros is not None:
            linear = replace(linear, zeros=np.ascontiguousarray(self.zeros[start:stop]))
        values = torch.from_numpy(dequantize(linear))
        return values if self.weight is None else values - self.weight[start:stop].float()


def float_reference(model_folder: Path, windows: np.ndarray, budget_bytes: int | None = None,
                    spill_dir: Path | None = None, top_k: int = 64) -> Reference:
    """The float model's top-k reference on `windows` (as the verdict's: compress.verify.accuracy)."""
    parts = [window_reference(blocks, windows[index, 1:], top_k)
             for index, blocks in enumerate(window_logprobs(model_folder, windows, budget_bytes, spill_dir))]
    return Reference(**stack_windows(parts))


def plan_kld(model_folder: Path, plan: dict[str, Path], windows: np.ndarray, budget_bytes: int | None = None,
             spill_dir: Path | None = None, reference: Reference | None = None) -> tuple[float, float]:
    """(KLD, its standard error over windows) of the float model with each layer in `plan` replaced by that
    candidate folder's dequantized weights (the head too, "lm_head"), against the float model's top-k `reference` (float_reference, where
    already computed), on `windows`: the verdict's own figure, window by window, so no window's full log-probs
    outlive it."""
    reference = reference if reference is not None else float_reference(model_folder, windows, budget_bytes, spill_dir)
    folders = {path: TensorFolder(path) for path in set(plan.values())}

    def each_layer(index: int, layer: torch.nn.Module, _inputs) -> torch.nn.Module:
        prefix = f"model.layers.{index}."
        for name, path in plan.items():
            if name.startswith(prefix):
                weight = layer.get_submodule(name[len(prefix):]).weight
                weight.data = torch.from_numpy(dequantize(stored_linear(folders[path], name))).to(weight.dtype)
        return layer

    def head() -> torch.Tensor:  # float32, dequantized a block of rows at a time (its logits are taken many times)
        rows = PackedRows(folders[plan["lm_head"]], "lm_head")
        values = torch.empty(rows.shape)
        for row in range(0, rows.shape[0], HEAD_ROWS):
            values[row:row + HEAD_ROWS] = rows[row:row + HEAD_ROWS]
        return values

    try:
        return blocks_kld(reference, window_logprobs(model_folder, windows, budget_bytes, spill_dir, each_layer,
                                                     head if "lm_head" in plan else None), windows)
    finally:
        for tensors in folders.values():
            tensors.close()


def blocks_kld(reference: Reference, blocks, windows: np.ndarray) -> tuple[float, float]:
    """(KLD, its standard error over windows) of a runtime's log-probs (window by window, blocks of rows)
    against the float model's top-k `reference`, as the verdict computes it."""
    parts = [window_figures(reference.window(index), window, windows[index, 1:]) for index, window in enumerate(blocks)]
    figures = summarise(reference, stack_windows(parts))
    return figures["kld"], figures["kld_se"]
