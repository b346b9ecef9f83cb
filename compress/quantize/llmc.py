"""Quantize with llm-compressor: GPTQ, AWQ and RTN on a Phi-3-architecture model.

The model is calibrated in this process on the recipe's seeded calibration windows. Each quantizer takes
the model folder, the variant and the calibration samples, and returns (model, tokenizer, details), where
details hold what the search found or decided (per-layer plan, AWQ mappings applied and skipped, time).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from compress.quantize.plan import KEEP, plan_summary, resolve_plan


def weight_scheme(bits: int, group_size: int, symmetric: bool, targets: list[str] | None = None) -> dict:
    """A compressed-tensors weight quantization scheme for integer weights."""
    strategy = "channel" if group_size == -1 else "group"
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy}
    if strategy == "group":
        weights["group_size"] = group_size
    return {"group_0": {"targets": targets or ["Linear"], "weights": weights}}


def plan_groups(plan: dict[str, int], group_size: int, symmetric: bool) -> tuple[dict, list[str]]:
    """config_groups with one group per bit width (exact layer names), and the layers left unquantized."""
    groups = {}
    for bits in sorted({b for b in plan.values() if b != KEEP}):
        names = [f"re:^{re.escape(name)}$" for name, b in plan.items() if b == bits]
        groups[f"group_{bits}bit"] = weight_scheme(bits, group_size, symmetric, names)["group_0"]
    return groups, [name for name, bits in plan.items() if bits == KEEP]


def _load(model_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


def _linear_names(model) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _calibration_dataset(samples: np.ndarray):
    from datasets import Dataset

    ids = samples.astype(np.int64).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def _quantize(model_path: Path, variant, samples: np.ndarray | None, make_modifiers, before=None) -> tuple:
    """Load, resolve the layer plan, run oneshot with the modifiers `make_modifiers(groups, ignore)` builds.

    `before(model, plan)`, when given, changes the loaded model first and returns details to keep."""
    import torch
    from llmcompressor import oneshot

    model, tokenizer = _load(model_path)
    plan = resolve_plan(_linear_names(model), variant.bits, list(variant.ignore), variant.layer_overrides())
    groups, ignore = plan_groups(plan, variant.group_size, variant.symmetric)
    if not groups:
        raise ValueError(f"variant {variant.name}: every linear layer is ignored or skipped; nothing to quantize")
    started = time.perf_counter()
    found = before(model, plan) if before else {}
    data = {} if samples is None else {
        "dataset": _calibration_dataset(samples),
        "max_seq_length": samples.shape[1],
        "num_calibration_samples": len(samples),
        "shuffle_calibration_samples": False,
    }
    with torch.no_grad():
        oneshot(model=model, recipe=make_modifiers(groups, ignore), **data)
    details = {"seconds": round(time.perf_counter() - started, 2), "layer_plan": plan, "layer_bits": plan_summary(plan),
               **found}
    return model, tokenizer, details


def quantize_gptq(model_path: Path, variant, samples: np.ndarray):
    from llmcompressor.modifiers.quantization import GPTQModifier

    return _quantize(model_path, variant, samples, lambda groups, ignore: GPTQModifier(
        config_groups=groups, ignore=ignore, dampening_frac=variant.dampening))


def quantize_rtn(model_path: Path, variant, samples: np.ndarray):
    """Plain round-to-nearest with min-max scales: the reference row every report compares against."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return _quantize(model_path, variant, None, lambda groups, ignore: QuantizationModifier(
        config_groups=groups, ignore=ignore))


def quantize_awq(model_path: Path, variant, samples: np.ndarray):
    """AWQ scale search, then RTN on the scaled weights: Phi-aware (all four rescalings of a Phi-3 block,
    quantize/phi_awq.py) unless the variant asks for llm-compressor's stock mappings."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if variant.awq_mappings == "stock":
        return _stock_awq(model_path, variant, samples)
    return _quantize(model_path, variant, None, lambda groups, ignore: QuantizationModifier(
        config_groups=groups, ignore=ignore), before=_phi_awq(variant, samples, clip=True))


def quantize_awq_gptq(model_path: Path, variant, samples: np.ndarray):
    """Phi-aware AWQ scales, then GPTQ on the scaled weights."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    return _quantize(model_path, variant, samples, lambda groups, ignore: GPTQModifier(
        config_groups=groups, ignore=ignore, dampening_frac=variant.dampening), before=_phi_awq(variant, samples, clip=False))


def _phi_awq(variant, samples: np.ndarray, clip: bool):
    """A `before` step: search and apply the Phi-3 scales (and, before RTN, clip each group's range; GPTQ
    chooses its own rounding); the tensors travel under "awq_scales" for saving."""
    from compress.quantize.awq_search import phi_awq

    def search(model, plan):
        scales, details = phi_awq(model, plan, variant.group_size, variant.symmetric, variant.n_grid, samples, clip)
        return {"awq": details, "awq_scales": scales}

    return search


def _stock_awq(model_path: Path, variant, samples: np.ndarray):
    """llm-compressor's AWQ (its mapping table and search, then RTN); records the mappings it skipped."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from loguru import logger

    from compress.quantize.cpu_fixes import awq_on_cpu

    skipped: list[str] = []
    sink = logger.add(lambda message: skipped.append(message.record["message"]), level="DEBUG",
                      filter=lambda record: record["message"].startswith(("Skipping", "AWQ")) or "skipped" in record["message"])
    try:
        with awq_on_cpu():
            model, tokenizer, details = _quantize(model_path, variant, samples, lambda groups, ignore: [
                AWQModifier(n_grid=variant.n_grid),
                QuantizationModifier(config_groups=groups, ignore=ignore),
            ])
    finally:
        logger.remove(sink)
    details["awq"] = {"search": "stock", "n_grid": variant.n_grid, "skipped": _skipped_mappings(skipped)}
    return model, tokenizer, details


def _skipped_mappings(messages: list[str]) -> list[str]:
    """'Skipping model.layers.0.self_attn.qkv_proj for mapping ... because X' -> 'layer: reason' sentences."""
    found = []
    for message in messages:
        match = re.match(r"Skipping (\S+) for mapping .*?because (.+)", message)
        if match:
            found.append(f"{match.group(1)}: {match.group(2).rstrip('.')}")
    return found


QUANTIZERS = {"gptq": quantize_gptq, "awq": quantize_awq, "awq-gptq": quantize_awq_gptq, "rtn": quantize_rtn}


def needs_whole_model(variant) -> bool:
    """Stock AWQ runs inside llm-compressor on the loaded model; every other method streams layer by layer."""
    return variant.method == "awq" and variant.awq_mappings == "stock"


def calibrate_whole_model(model_path: Path, variant, samples: np.ndarray, out: Path, work: Path,
                          budget_bytes: int | None = None) -> dict:
    """Load the whole model, quantize it in llm-compressor, save the compressed-tensors folder `out`."""
    from compress.export.compressed_tensors import write_compressed_tensors

    model, tokenizer, details = QUANTIZERS[variant.method](model_path, variant, samples)
    write_compressed_tensors(model, tokenizer, model_path, out)
    return details
