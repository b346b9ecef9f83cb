"""ONNX GenAI folders through onnxruntime-genai's model builder (model.onnx, external data, genai_config.json,
tokenizer), plus int8 dynamic quantization of the builder's fp32 graph.

The builder runs in its own process with its log kept beside the run. It reads the original checkpoint, or
an AutoGPTQ-format folder (`-i`), whose calibrated integer weights it then carries into MatMulNBits; through
compress.export.builder_stream, which makes it hold one decoder layer at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from compress import interrupts

# Hugging Face linear layer (suffix within a block) -> the builder's MatMul node names for it. The builder
# splits the fused gate_up_proj (and, for some providers, qkv_proj) into separate MatMuls.
BUILDER_NODES = {
    "self_attn.qkv_proj": ("attn/qkv_proj/MatMul", "attn/q_proj/MatMul", "attn/k_proj/MatMul", "attn/v_proj/MatMul"),
    "self_attn.o_proj": ("attn/o_proj/MatMul",),
    "mlp.gate_up_proj": ("mlp/gate_up_proj/MatMul", "mlp/gate_proj/MatMul", "mlp/up_proj/MatMul"),
    "mlp.down_proj": ("mlp/down_proj/MatMul",),
}
EXECUTION_PROVIDERS = {"cpu": "cpu", "cuda": "cuda"}
GENAI_SIDE_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "tokenizer.model", "added_tokens.json")


class ExportError(RuntimeError):
    """An export step failed; the message says which and where its log is."""


HEAD_NODE = "/lm_head/MatMul"


def phi3_linear_names(config: dict) -> list[str]:
    """Every linear layer of a Phi-3-architecture model, by its Hugging Face name."""
    names = [f"model.layers.{i}.{suffix}" for i in range(int(config["num_hidden_layers"])) for suffix in BUILDER_NODES]
    return names + ["lm_head"]


def builder_node_names(layer: str) -> list[str]:
    """The builder's node names for one Hugging Face linear layer."""
    if layer == "lm_head":
        return [HEAD_NODE]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", layer)
    if not match or match.group(2) not in BUILDER_NODES:
        raise ValueError(f"no ONNX node is known for layer {layer}")
    return [f"/model/layers.{match.group(1)}/{node}" for node in BUILDER_NODES[match.group(2)]]


def excluded_nodes(plan: dict[str, int]) -> list[str]:
    """Builder nodes to leave in floating point: every layer the plan keeps at 16 bits.

    With a float head the embedding table stays float too: the builder would otherwise round a tied
    embedding (shared with lm_head) to int4 on its own, even when lm_head itself is excluded.
    """
    nodes = [node for layer, bits in plan.items() if bits == 16 for node in builder_node_names(layer)]
    if plan.get("lm_head") == 16:
        nodes.append("/model/embed_tokens/Gather")
    return nodes


def variant_plan(config: dict, variant) -> dict[str, int]:
    """An ONNX variant's layer plan from its own settings; with `from:`, a head the variant does not ask to keep
    float is int8 (the builder rounds it where the source left it float; produce then puts in what is carried)."""
    from compress.quantize.plan import KEEP, resolve_plan

    plan = resolve_plan(phi3_linear_names(config), variant.bits, list(variant.ignore), variant.layer_overrides())
    if variant.from_ and not variant.asks_float_head and plan["lm_head"] == KEEP:
        plan["lm_head"] = 8
    return plan


def builder_options(variant, plan: dict[str, int], carried_head: bool = False, exact: bool = False) -> dict[str, str]:
    """--extra_options for a variant and its layer plan (16 = keep in floating point; lm_head 8 = the builder
    rounds a float head to int8, unless `carried_head`: the source folder holds the head's integers)."""
    options = {"block_size": str(variant.group_size), "is_symmetric": str(variant.symmetric).lower(),
               "algo_config": variant.algorithm, "hf_token": "false"}
    level = 1 if exact else variant.accuracy_level
    if level:
        options["accuracy_level"] = str(level)
    if excluded := excluded_nodes(plan):
        options["nodes_to_exclude"] = ",".join(excluded)
    if plan.get("lm_head") == 8 and not carried_head:
        options["matmul_mixed_precision"] = "last_matmul:int8"
        # Builder 0.18 with algo_config=default and an int8 last MatMul writes a graph whose lm_head input
        # (weight_Q8G<block>) does not exist, so the model fails to load. `default` is RTN under another node
        # naming, so asking for rtn gives the same weights in a graph that loads.
        if variant.algorithm == "default":
            options["algo_config"] = "rtn"
    return options


STREAMING_BUILDER = "compress.export.builder_stream"
PLAIN_BUILDER = "onnxruntime_genai.models.builder"


def run_builder(source: Path, out: Path, precision: str, target: str, options: dict[str, str], cache: Path, log: Path,
                builder: str = STREAMING_BUILDER) -> Path:
    """The builder (`python -m builder`) in a process of its own; its output goes to `log`."""
    interrupts.check()
    shutil.rmtree(out, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp32" or HEAD_NODE in options.get("nodes_to_exclude", "").split(","):
        # With tied embeddings and a float head the builder gathers embedding rows from Transpose(lm_head
        # weight), which onnxruntime does not constant-fold at this size: Phi-4-mini transposed its 2.5 GB head
        # on every forward pass (~3.7 s per token in the fp32 graph; benchmarks/). An int4 graph with a float
        # head (a GPTQ v1 folder's check, 2 layers at Phi-4-mini's width, 2026-12-03): 4.7 GiB after load, 7.9
        # peak, 0.4 tok/s; with a table of its own, which onnxruntime maps and pages in only the rows
        # gathered: 2.4, 4.7 and 2.7 tok/s, for 2.3 GiB more on disk.
        options = {"shared_embeddings": "false", **options}
    command = [sys.executable, "-m", builder, "-i", str(source), "-o", str(out),
               "-p", precision, "-e", EXECUTION_PROVIDERS[target], "-c", str(cache),
               "--extra_options", *(f"{key}={value}" for key, value in options.items())]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, check=False)
    if completed.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise ExportError(f"the ONNX builder failed: {lines[-1] if lines else completed.returncode} (log: {log})")
    if options.get("shared_embeddings") == "true":
        reshape_shared_table_parameters(out)
    let_onnxruntime_choose_threads(out / "genai_config.json")
    return out


def let_onnxruntime_choose_threads(genai_config: Path) -> None:
    """Write intra_op_num_threads 0 ("onnxruntime picks") where the builder wrote none.

    Without the key, onnxruntime-genai 0.18 decoded on one thread of this 2-vCPU machine; with 0 it used
    both: Phi-4-mini-width int4 decode went from 70 to 33 ms per token (benchmarks/, 2026-11-26). Users who
    load the folder unchanged then get the speed the report measured.
    """
    config = json.loads(genai_config.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.setdefault("intra_op_num_threads", 0)
    genai_config.write_text(json.dumps(config, indent=4) + "\n")


def quantize_dynamic_int8(fp32_folder: Path, out: Path, excluded_layers: list[str]) -> Path:
    """int8 weights and activations (MatMulInteger) from the builder's fp32 graph, with its GenAI files."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = onnx.load(str(fp32_folder / "model.onnx"))  # with its external data
    excluded = [node for layer in excluded_layers for node in builder_node_names(layer)]
    present = {node.name for node in model.graph.node}
    quantize_dynamic(
        model, out / "model.onnx", op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
        nodes_to_exclude=[name for name in excluded if name in present], use_external_data_format=True,
    )
    for name in GENAI_SIDE_FILES:
        if (fp32_folder / name).is_file():
            shutil.copy2(fp32_folder / name, out / name)
    return out


def ties_table(config: dict, head_bits: int) -> bool:
    """Whether a head carried into the graph at `head_bits` also serves as the embedding table (tie_table_to_head)."""
    return head_bits == 8 and bool(config.get("tie_word_embeddings"))


def carried_source(ct_folder: Path, out: Path, tie: bool) -> Path:
    """The builder's input for calibrated integers: a GPTQ folder with each layer's own width (`dynamic`), its
    8-bit head tied back to the embedding table where `tie`."""
    from compress.export.gptq_v1 import write_gptq_v1

    folder = write_gptq_v1(ct_folder, out, mixed=True)
    if tie:
        tie_table_to_head(folder)
    return folder


def tie_table_to_head(folder: Path) -> None:
    """Make a GPTQ folder whose quantized head came untied from a tied model tied again: no embedding table of its
    own (the builder then gathers embedding rows from the head's integers, `shared_embeddings`, as it does for
    heads it rounds itself) instead of a float32 copy of the table in the graph (2.5 GB at Phi-4-mini's vocabulary).
    Done for 8-bit heads only: on the embedded model an 8-bit head's table left the held-out KLD as it was (0.00862
    tied, 0.00862 untied), a 4-bit GPTQ head's table nearly doubled it (0.0317 against 0.0167), so a 4-bit head
    keeps a float table beside it."""
    from safetensors.torch import save_file

    from compress.tensors import TensorFolder

    name = "model.embed_tokens.weight"
    with TensorFolder(folder) as tensors:
        if name not in tensors or "lm_head.qweight" not in tensors:
            raise ValueError(f"{folder} has no embedding table and quantized head to tie")
        shard = tensors.file_of(name)
        kept = {key: tensors.tensor(key) for key in tensors.keys() if key != name and tensors.file_of(key) == shard}
    save_file(kept, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].pop(name, None)
        index.write_text(json.dumps(data, indent=2) + "\n")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def reshape_shared_table_parameters(folder: Path) -> bool:
    """Make a graph whose embedding gathers from a pre-quantized head loadable: builder 0.18 hands
    GatherBlockQuantized the head's MatMulNBits scales and zero points as they are, flat ([N·blocks]), and
    onnxruntime refuses them ("scales must have the same rank as data"); a Reshape to [N, ·] before the gather
    is all they need. Only model.onnx changes (the weights stay in their external file). -> whether any did."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ranks = {tensor.name: len(tensor.dims) for tensor in graph.initializer}
    heads = {node.input[2]: node for node in graph.node if node.op_type == "MatMulNBits" and len(node.input) > 2}
    nodes = []
    for node in graph.node:
        if node.op_type == "GatherBlockQuantized" and ranks.get(node.input[2]) == 1 and node.input[2] in heads:
            rows = next(attribute.i for attribute in heads[node.input[2]].attribute if attribute.name == "N")
            for position in range(2, min(len(node.input), 4)):
                if not node.input[position] or ranks.get(node.input[position]) != 1:
                    continue
                shape = f"{node.name}/shape_{position}"
                graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
                reshaped = f"{node.input[position]}/per_row"
                nodes.append(helper.make_node("Reshape", [node.input[position], shape], [reshaped],
                                              name=f"{node.name}/Reshape_{position}"))
                node.input[position] = reshaped
        nodes.append(node)
    if len(nodes) == len(graph.node):
        return False
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return True
