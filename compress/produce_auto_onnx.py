"""An auto variant in ONNX: its plan (compress.produce_auto) built by onnxruntime-genai's model builder.

The plan's layers keep their candidates' calibrated integers: the mixed compressed-tensors folder becomes one
AutoGPTQ v1 folder whose `dynamic` overrides give each layer its width and group size (and the head its own),
which the builder writes as MatMulNBits of that width and block. The builder reads such a folder only with every
decoder layer quantized, so `keep` is a choice for the head alone. The plan is chosen on the selection slice in
transformers (the same integers; MatMulNBits' compute type aside) and the graph is then verified, like every ONNX
artifact, in onnxruntime-genai on the evaluation windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress import memory
from compress.export.onnx_genai import carried_source, excluded_nodes, run_builder, ties_table
from compress.model import ModelInfo
from compress.produce import Workspace, onnx_builds
from compress.produce_auto import choose, unmet, write_mixed
from compress.quantize.automix import BudgetTooSmall
from compress.quantize.plan import KEEP
from compress.results import Artifact

RUNTIME = "onnxruntime-genai"


def auto_onnx_artifacts(variant, recipe, info: ModelInfo, samples: np.ndarray, space: Workspace, stamp: str,
                        budget_bytes: int | None) -> list[Artifact]:
    try:
        chosen = choose(variant, recipe, info, samples, space, stamp, budget_bytes)
    except BudgetTooSmall as error:
        return [unmet(variant, recipe, space, "onnx", RUNTIME, error)]
    settings = variant.candidate_settings()
    bits = {layer: KEEP if name == "keep" else settings[name][0] for layer, name in chosen.plan.items()}
    options = {"accuracy_level": str(variant.accuracy_level), "hf_token": "false"}
    if excluded := excluded_nodes(bits):  # a float head (and then the embedding, which the builder would round)
        options["nodes_to_exclude"] = ",".join(excluded)
    tie = ties_table(info.config, bits.get("lm_head", KEEP))
    if tie:  # the embedding gathers from the 8-bit head's integers, not from a float32 copy of the table
        options["shared_embeddings"] = "true"
    details = {**chosen.details, "builder_options": options,
               "from": "calibrated integers of its plan (a GPTQ v1 folder, each layer's width and group under `dynamic`)"}
    needed = memory.onnx_build(memory.Shapes.from_info(info), "onnx-int4", head_rounded=False,
                               head_carried=bits.get("lm_head", KEEP) != KEEP)

    def source() -> Path:
        mixed = space.work("mixed")
        write_mixed(info.path, chosen.plan, chosen.candidates, variant, mixed)
        return carried_source(mixed, space.work("mixed-gptq"), tie)

    def build(source: Path, folder: Path, target: str, log: Path) -> None:
        run_builder(source, folder, "int4", target, options, space.cache, log)

    return onnx_builds(variant, recipe, space, details, needed, budget_bytes, source, build)
