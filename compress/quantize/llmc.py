"""Quantize with llm-compressor: GPTQ (and, later, AWQ and RTN) on a Phi-3-architecture model.

The model is calibrated in this process on the recipe's seeded calibration windows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def weight_scheme(bits: int, group_size: int, symmetric: bool) -> dict:
    """A compressed-tensors weight quantization scheme for integer weights."""
    strategy = "channel" if group_size == -1 else "group"
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy}
    if strategy == "group":
        weights["group_size"] = group_size
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def _calibration_dataset(samples: np.ndarray):
    from datasets import Dataset

    ids = samples.astype(np.int64).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def quantize_gptq(model_path: Path, variant, samples: np.ndarray):
    """GPTQ-quantize the model at `model_path` with `variant`'s settings. -> (model, tokenizer, details)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    modifier = GPTQModifier(
        config_groups=weight_scheme(variant.bits, variant.group_size, variant.symmetric),
        ignore=list(variant.ignore),
        dampening_frac=variant.dampening,
    )
    started = time.perf_counter()
    with torch.no_grad():
        oneshot(
            model=model,
            dataset=_calibration_dataset(samples),
            recipe=modifier,
            max_seq_length=samples.shape[1],
            num_calibration_samples=len(samples),
            shuffle_calibration_samples=False,
        )
    details = {"seconds": round(time.perf_counter() - started, 2)}
    return model, tokenizer, details


QUANTIZERS = {"gptq": quantize_gptq}
