"""A gguf variant's artifact: a release folder with the .gguf, the tokenizer and Ollama's Modelfile.

Without `from:`: llama.cpp's converter makes a float GGUF of the model (once per run, shared by every gguf
variant), llama-imatrix computes an importance matrix on the recipe's calibration tokens where the variant
uses one, and llama-quantize writes the variant's type, with the variant's ignore/overrides as per-tensor
types. With `from:`: the earlier variant's integer weights go into Q4_0/Q4_1/Q8_0 blocks exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from compress import memory
from compress.data import array_hash
from compress.export import gguf
from compress.export.gptq_v1 import CARRIED_PATTERNS
from compress.export.onnx_genai import phi3_linear_names
from compress.model import ModelInfo
from compress.produce import Workspace, calibrated_folder, unmade_artifact
from compress.quantize.plan import KEEP, resolve_plan
from compress.results import FAIL, NOT_VERIFIED, Artifact
from compress.verify.size import folder_bytes, gguf_bits

RUNTIME = "llama.cpp"


def float_gguf(info: ModelInfo, run_dir: Path, log: Path) -> Path:
    """The model as a float GGUF in its own dtype (F32 for float32 checkpoints), converted once per run."""
    from compress.pipeline import model_fingerprint

    path = run_dir / "work" / "gguf" / f"{model_fingerprint(info)[:16]}-{float_outtype(info)}.gguf"
    if not path.is_file():
        partial = path.with_suffix(".partial")
        gguf.convert(info.path, partial, float_outtype(info), log)
        os.replace(partial, path)
    return path


def float_outtype(info: ModelInfo) -> str:
    """The converter's --outtype for the checkpoint's own float type: f32, bf16 or f16."""
    return gguf.OUTTYPE.get(info.stored_dtype, "f16")


def tensor_types(plan: dict[str, int], config: dict, float_type: str) -> tuple[dict[str, str], str | None]:
    """The plan's exceptions as llama-quantize options: (GGUF tensor -> type, the output tensor's type).
    8 bits -> Q8_0; kept layers -> the float GGUF's own type."""
    names = gguf.gguf_name_map(config)
    kind = {8: "Q8_0", KEEP: float_type}
    per_tensor, output = {}, None
    for layer, bits in plan.items():
        if bits not in kind:
            continue
        if layer == "lm_head":
            output = kind[bits]
        else:
            per_tensor[gguf.tensor_name(names, layer + ".weight")] = kind[bits]
    return per_tensor, output


def embedding_type(variant, float_type: str) -> str | None:
    """The token embedding's type where an ignore or override names embed_tokens."""
    plan = resolve_plan(["model.embed_tokens"], 4, list(variant.ignore), variant.layer_overrides())
    return {8: "Q8_0", KEEP: float_type}.get(plan["model.embed_tokens"])


def gguf_artifacts(variant, recipe, info: ModelInfo, samples: np.ndarray, run_dir: Path, space: Workspace,
                   stop_ids: list[int], budget_bytes: int | None) -> list[Artifact]:
    """The variant's GGUF folder in staging/; where a llama.cpp tool fails, the variant is reported failed with
    its sentence (nothing to verify or release) and the run goes on with the other variants."""
    folder = space.staging("gguf")
    folder.mkdir(parents=True)
    details: dict = {"log": str(space.log)}
    try:
        return [_gguf_artifact(variant, recipe, info, samples, run_dir, space, stop_ids, budget_bytes, folder, details)]
    except gguf.GgufError as error:
        return [unmade_artifact(variant, space, "gguf", RUNTIME, details, {target: (FAIL, str(error)) for target in recipe.targets})]


def _gguf_artifact(variant, recipe, info: ModelInfo, samples: np.ndarray, run_dir: Path, space: Workspace,
                   stop_ids: list[int], budget_bytes: int | None, folder: Path, details: dict) -> Artifact:
    threads = int(os.environ.get("COMPRESS_THREADS", os.cpu_count() or 1))
    source = float_gguf(info, run_dir, space.log)
    float_type = float_outtype(info).upper()
    out_file = folder / f"{variant.name}.gguf"
    described: dict = {"float_gguf": float_type}
    if variant.from_:
        calibrated = calibrated_folder(run_dir, variant.from_)
        written = gguf.carry_exact(source, calibrated, out_file, info.config)
        details["from"] = f"integer weights of {variant.from_} written exactly as GGUF blocks (its float layers as it keeps them)"
    else:
        plan = resolve_plan(phi3_linear_names(info.config), 4, list(variant.ignore), variant.layer_overrides())
        per_tensor, output = tensor_types(plan, info.config, float_type)
        types = {layer: {4: variant.quant, 8: "Q8_0"}.get(bits, KEEP) for layer, bits in plan.items()}
        details["layer_plan"] = types
        details["layer_bits"] = {str(kind): count for kind, count in Counter(types.values()).items()}
        matrix = importance_matrix(variant, info, samples, run_dir, space, source, threads, budget_bytes, described)
        quantized = gguf.quantize(source, out_file, variant.quant, per_tensor, output, embedding_type(variant, float_type),
                                  matrix, threads, space.log)
        described.update(quant=variant.quant, fell_back=quantized["fell_back"])
        written = gguf.tensor_types(out_file)
    described["tensor_types"] = dict(sorted(Counter(written.values()).items()))
    details["gguf"] = described
    return release_folder(variant, recipe, info, out_file, stop_ids, details)


def release_folder(variant, recipe, info: ModelInfo, out_file: Path, stop_ids: list[int], details: dict) -> Artifact:
    """The GGUF file's folder made whole (the tokenizer files, Ollama's Modelfile) and its artifact."""
    folder = out_file.parent
    for pattern in CARRIED_PATTERNS:
        for path in info.path.glob(pattern):
            if path.is_file():
                shutil.copy2(path, folder / path.name)
    gguf.write_modelfile(folder, out_file.name, info.path, stop_ids)
    skipped = {target: (NOT_VERIFIED, "compress builds llama.cpp for the CPU only") for target in recipe.targets if recipe.device(target) != "cpu"}
    return Artifact(variant.name, variant.method, "gguf", folder, RUNTIME, folder_bytes(folder), gguf_bits(out_file),
                    details, runnable=folder, skipped=skipped)


def importance_matrix(variant, info: ModelInfo, samples: np.ndarray, run_dir: Path, space: Workspace, source: Path,
                       threads: int, budget_bytes: int | None, details: dict) -> Path | None:
    """llama-imatrix's file for this run's calibration tokens (computed once, shared by the gguf variants)."""
    if not variant.uses_imatrix:
        details["imatrix"] = "none"
        return None
    needed = memory.gguf_imatrix(source.stat().st_size, memory.Shapes.from_info(info), samples.shape[1])
    if budget_bytes is not None and needed > budget_bytes:
        details["imatrix"] = f"not computed: llama-imatrix {memory.describe(needed, budget_bytes)}"
        return None
    path = run_dir / "work" / "gguf" / f"imatrix-{source.stem}-{array_hash(samples)[:16]}.gguf"
    record = path.with_suffix(".json")
    if not path.is_file():
        seen = gguf.imatrix(source, samples, info.path, path.with_suffix(".partial.gguf"), threads, space.log)
        os.replace(path.with_suffix(".partial.gguf"), path)
        record.write_text(json.dumps(seen))
    seen = json.loads(record.read_text())
    details["imatrix"] = (f"llama-imatrix on the calibration set, decoded: {seen['chunks']} chunks of {samples.shape[1]} tokens; "
                          f"llama.cpp's {seen['tokens']} tokens of it are "
                          + ("exactly our tokenizer's" if seen["same_as_our_tokenizer"] else "NOT our tokenizer's")
                          + f" (the calibration set is {seen['calibration_tokens']} tokens)")
    return path
