"""Calibrate a checkpoint one decoder layer at a time, straight from disk into a compressed-tensors folder.

For each decoder layer, as llm-compressor's sequential pipeline does for GPTQ: read the layer from the
checkpoint (float32 working copy), let it see its inputs (the previous layers' quantized outputs) while
hooks collect statistics, quantize it, run it again to give the next layer its inputs, and write its
tensors as a shard of its own. Nothing but that layer, its statistics and the hidden states between layers
(spilled to disk beyond the memory budget) is ever in memory, whatever the depth.

The maths is the libraries': compressed-tensors' min-max scales, rounding and packing, llm-compressor's
GPTQ (`quantize_weight`, `accumulate_hessian`), and Phi-aware AWQ's search (awq_search.search_layer).
Methods: rtn, gptq, awq (scale search, clipping, RTN) and awq-gptq (scale search, GPTQ).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from compress import interrupts
from compress.activations import allocate
from compress.export.compressed_tensors import CARRIED_FILES
from compress.export.shards import ShardWriter
from compress.layerwise import HEAD_ROWS, LayerwiseModel
from compress.memory import activation_budget
from compress.quantize import rounding
from compress.quantize.plan import KEEP, plan_summary, resolve_plan

BLOCK_LINEARS = ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")  # named_modules order
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "*.model")
GPTQ_BLOCK = 128
# Calibration runs one window per forward, as llm-compressor's pipeline does (batch size 1): batched attention
# rounds differently, and GPTQ turns such last-bit differences into different integer weights.
CALIBRATION_BATCH = 1


def linear_names(layers: int) -> list[str]:
    """Every linear layer of a Phi-3 model, in the order transformers lists its modules."""
    return [f"model.layers.{i}.{suffix}" for i in range(layers) for suffix in BLOCK_LINEARS] + ["lm_head"]


def quantization_config(plan: dict[str, int], group_size: int, symmetric: bool, actorder: str | None) -> dict:
    """config.json's quantization_config, as llm-compressor writes it for the same layer plan."""
    return mixed_quantization_config({layer: (bits, group_size) for layer, bits in plan.items() if bits != KEEP},
                                     [layer for layer, bits in plan.items() if bits == KEEP], symmetric, actorder)


def mixed_quantization_config(schemes: dict[str, tuple[int, int]], kept: list[str], symmetric: bool,
                              actorder: str | None) -> dict:
    """quantization_config for layers of several (bits, group size) settings: one config group per setting,
    naming its layers exactly; `kept` layers stay in floating point."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    settings = sorted(set(schemes.values()), key=lambda setting: (setting[0], setting[1] == -1, setting[1]))
    groups = {}
    for number, (bits, group_size) in enumerate(settings):
        targets = [f"re:^{re.escape(layer)}$" for layer, setting in schemes.items() if setting == (bits, group_size)]
        groups[f"group_{number}"] = QuantizationScheme(targets=targets, format="pack-quantized",
                                                       weights=rounding.weight_args(bits, group_size, symmetric, actorder))
    config = QuantizationConfig(config_groups=groups, ignore=kept, format="pack-quantized", quantization_status="compressed")
    return {**config.model_dump(mode="json"), "sparsity_config": {}, "transform_config": {},
            "version": compressed_tensors.__version__}


class _OneBlock:
    """What the AWQ search reads of a model (config, model.layers[i], get_submodule) for one loaded block."""

    def __init__(self, config, index: int, block: torch.nn.Module):
        self.config, self.index = config, index
        self.model = SimpleNamespace(layers={index: block})

    def get_submodule(self, name: str) -> torch.nn.Module:
        return self.model.layers[self.index].get_submodule(name.removeprefix(f"model.layers.{self.index}."))


def calibrate_streaming(model_path: Path, variant, samples: np.ndarray | None, out: Path, work: Path,
                        budget_bytes: int | None = None) -> dict:
    """Write the calibrated compressed-tensors folder `out` for `variant`; hidden states go to files in `work`
    beyond their share of `budget_bytes`. -> details (plan, timings, AWQ scales under "awq_scales")."""
    started = time.perf_counter()
    method = variant.method
    budget_bytes = None if budget_bytes is None else activation_budget(budget_bytes)  # the hidden states' share
    gptq, awq = method in ("gptq", "awq-gptq"), method in ("awq", "awq-gptq")
    with LayerwiseModel(model_path) as model:
        plan = resolve_plan(linear_names(model.layers), variant.bits, list(variant.ignore), variant.layer_overrides())
        if all(bits == KEEP for bits in plan.values()):
            raise ValueError(f"variant {variant.name}: every linear layer is ignored or skipped; nothing to quantize")
        head = plan["lm_head"] != KEEP
        stored = model.tensors.torch_dtype("model.embed_tokens.weight")
        actorder = "static" if gptq else None
        details: dict = {"layer_plan": plan, "layer_bits": plan_summary(plan), "streamed": True, "layers_seconds": []}
        if awq:
            from compress.quantize.awq_search import search_layer, statistics_hooks
            from compress.quantize.phi_awq import KINDS, Shape, phi3_mappings

            shape = Shape.from_config(model.config)
            mappings, skipped = phi3_mappings(model.layers, plan)
            found: tuple[dict, list, dict] = ({}, [], {})
        writer = ShardWriter(out / ".partial-shards")
        windows = samples if samples is not None and (gptq or awq) else None
        inputs = None
        if windows is not None:
            inputs = allocate(len(windows), windows.shape[1], model.hidden_size, budget_bytes, work, "calibration-a")
            model.embed(windows, inputs)
        for index in range(model.layers):
            interrupts.check()
            layer_started = time.perf_counter()
            block = model.layer(index)
            modules = {f"model.layers.{index}.{suffix}": block.get_submodule(suffix) for suffix in BLOCK_LINEARS}
            if awq:
                in_layer = sorted((m for m in mappings if m.layer == index), key=lambda m: KINDS.index(m.kind))
                stats, handles = statistics_hooks({m.consumer: modules[m.consumer] for m in in_layer})
                model.forward(block, inputs, None, CALIBRATION_BATCH)
                for handle in handles:
                    handle.remove()
                search_started = time.perf_counter()
                search_layer(_OneBlock(model.config, index, block), in_layer, stats, plan, variant.group_size,
                             variant.symmetric, variant.n_grid, method == "awq", shape, found)
                details.setdefault("search_seconds", []).append(round(time.perf_counter() - search_started, 2))
                del stats
            hessians = _hessians(model, block, inputs, {n: m for n, m in modules.items() if plan[n] != KEEP}) if gptq else {}
            for name, module in modules.items():
                if plan[name] == KEEP:
                    continue
                args = rounding.weight_args(plan[name], variant.group_size, variant.symmetric, actorder)
                for part, tensor in _quantize_linear(module, args, hessians.pop(name, None), variant, stored).items():
                    writer.add(f"{name}.{part}", tensor)
            for name, tensor in block.state_dict().items():
                full = f"model.layers.{index}.{name}"
                if full.rsplit(".", 1)[0] not in modules or plan[full.rsplit(".", 1)[0]] == KEEP:
                    writer.add(full, tensor.to(stored))
            if inputs is not None and (index + 1 < model.layers or (head and gptq)):
                outputs = allocate(len(windows), windows.shape[1], model.hidden_size, budget_bytes, work,
                                   f"calibration-{'ab'[(index + 1) % 2]}")
                model.forward(block, inputs, outputs, CALIBRATION_BATCH)
                inputs.delete()
                inputs = outputs
            del block
            writer.flush()
            details["layers_seconds"].append(round(time.perf_counter() - layer_started, 2))
        if head:
            interrupts.check()
            hessian = _head_hessian(model, inputs) if gptq else None
            args = rounding.weight_args(plan["lm_head"], variant.group_size, variant.symmetric, actorder)
            for part, tensor in _quantize_head(model, args, hessian, variant, stored).items():
                writer.add(f"lm_head.{part}", tensor)
            writer.flush()
        if inputs is not None:
            inputs.delete()
        for name in model.tensors.keys():
            if name == "lm_head.weight" and head:
                continue
            if not name.startswith("model.layers."):  # embedding, final norm, head: one at a time, as stored
                writer.add(name, model.tensors.tensor(name))
                if len(model.tensors.shape_and_dtype(name)[0]) > 1:  # a table: a shard of its own
                    writer.flush()
        shards = writer.close()
    publish_folder(shards, out / ".partial-shards", out, model_path,
                   quantization_config(plan, variant.group_size, variant.symmetric, actorder), untie=head)
    details["seconds"] = round(time.perf_counter() - started, 2)
    if awq:
        scales, applied, clipped = found
        details["awq"] = {"search": "phi", "n_grid": variant.n_grid, "applied": applied, "skipped": skipped,
                          "clip": {name: round(ratio, 3) for name, ratio in clipped.items()} if method == "awq" else None,
                          "seconds": details["seconds"], "search_seconds": details.get("search_seconds", [])}
        details["awq_scales"] = scales
    return details


def _hessians(model: LayerwiseModel, block, inputs, modules: dict) -> dict[str, torch.Tensor]:
    """GPTQ's normalized Hessian of each module's inputs, accumulated as llm-compressor's hook does."""
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    sums = {name: [make_empty_hessian(module), torch.zeros(())] for name, module in modules.items()}

    def hook(name):
        def record(module, args, _output):
            sums[name][0], sums[name][1] = accumulate_hessian(args[0], module, *sums[name])
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        model.forward(block, inputs, None, CALIBRATION_BATCH)
    finally:
        for handle in handles:
            handle.remove()
    return {name: hessian.div_(count) for name, (hessian, count) in sums.items()}  # in place: 1.3 GB less for down_proj


def _quantize_linear(module: torch.nn.Linear, args, hessian: torch.Tensor | None, variant, stored: torch.dtype) -> dict:
    """Quantize one Linear in place (its weight becomes the dequantized grid values the artifact computes
    with) -> its pack-quantized tensors."""
    weight = module.weight.data.float()
    scale, zero = rounding.minmax_qparams(weight, args, stored)
    module.weight.data = _rounded(weight, scale, zero, args, hessian, variant.dampening)
    codes = rounding.integer_codes(module.weight.data, scale, zero, args)
    return rounding.packed_tensors(codes, scale, zero, args, stored)


def _rounded(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args, hessian: torch.Tensor | None,
             dampening: float) -> torch.Tensor:
    """`weight` on its grid: rounded to nearest, or by GPTQ with `hessian` (which GPTQ changes in place)."""
    if hessian is None:
        return rounding.fake_quantize(weight, scale, zero, args)
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    quantized, _loss, _fallback = quantize_weight(weight[None].clone(), hessian[None], scale[None], zero[None],
                                                  None, args, blocksize=GPTQ_BLOCK, percdamp=dampening)
    return quantized[0]


def _head_hessian(model: LayerwiseModel, hidden) -> torch.Tensor:
    """GPTQ's normalized Hessian of the head's inputs — the final norm of the last layer's outputs `hidden` —
    accumulated one window at a time, as llm-compressor's hook on lm_head does."""
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    shape = torch.nn.Linear(model.hidden_size, 1, bias=False, device="meta")  # accumulate_hessian reads the kind
    hessian, count = torch.zeros(model.hidden_size, model.hidden_size), torch.zeros(())
    with torch.inference_mode():
        for window in range(hidden.shape[0]):
            hessian, count = accumulate_hessian(model.final_norm(hidden.read(window, window + 1)), shape, hessian, count)
    return hessian.div_(count)


def _quantize_head(model: LayerwiseModel, args, hessian: torch.Tensor | None, variant, stored: torch.dtype) -> dict:
    """The head's pack-quantized tensors (the embedding table's, untied, where the two are tied), HEAD_ROWS rows
    at a time in float32: each output row's groups, scales and GPTQ updates are its own, so rows in blocks give
    what the whole matrix gives. Each block is packed on its own (packing the whole head at once made int32
    copies of it: 8.6 GB at Phi-4-mini's vocabulary); zero points, packed across rows, once at the end."""
    head = model.head_weight()
    packed, scales, zeros = [], [], []
    for row in range(0, head.shape[0], HEAD_ROWS):
        weight = head[row:row + HEAD_ROWS].float()
        scale, zero = rounding.minmax_qparams(weight, args, stored)
        block_hessian = None if hessian is None else hessian.clone()  # GPTQ dampens and factors its copy
        codes = rounding.integer_codes(_rounded(weight, scale, zero, args, block_hessian, variant.dampening), scale, zero, args)
        packed.append(rounding.packed_tensors(codes, scale, zero, args, stored)["weight_packed"])
        scales.append(scale.to(stored))
        zeros.append(zero)
    model.release_head()
    tensors = {"weight_packed": torch.cat(packed), "weight_scale": torch.cat(scales),
               "weight_shape": torch.tensor([head.shape[0], head.shape[1]], dtype=torch.int64)}
    if not args.symmetric:
        tensors["weight_zero_point"] = rounding.packed_zero_points(torch.cat(zeros), args)
    return tensors


def publish_folder(shards: list[Path], partial: Path, out: Path, model_path: Path, quantization: dict,
                   untie: bool = False) -> None:
    """Make `out` a whole compressed-tensors folder: the shards (and their index) moved in from `partial`, the
    source's tokenizer and generation files, and config.json with `quantization` written last, so a folder with
    a config.json is complete. `untie`: the head is quantized, so a tied embedding stays float on its own."""
    out.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        shutil.move(str(shard), out / shard.name)
    if (partial / "model.safetensors.index.json").is_file():
        shutil.move(str(partial / "model.safetensors.index.json"), out / "model.safetensors.index.json")
    shutil.rmtree(partial, ignore_errors=True)
    _carry_files(model_path, out)
    config = json.loads((Path(model_path) / "config.json").read_text())
    config["quantization_config"] = quantization
    if untie and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _carry_files(source: Path, out: Path) -> None:
    """Tokenizer and generation files of the source checkpoint, unchanged."""
    for pattern in (*TOKENIZER_PATTERNS, *CARRIED_FILES):
        for path in Path(source).glob(pattern):
            if path.is_file():
                shutil.copy2(path, out / path.name)
