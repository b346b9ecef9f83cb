"""The run's host-memory budget and what each stage needs of it, estimated from config.json alone.

Stages that touch the float model work one decoder layer at a time (compress/layerwise.py), so what they
need does not grow with depth: one layer in float32, its statistics, the hidden states between layers
(spilled to disk when they do not fit `activation_budget`) and, at the ends, the embedding table or head
in their stored dtype. Checks whose runtime must hold the whole model (transformers: the baseline's speed
and generations, compressed-tensors artifacts) are run only where that fits the budget; otherwise they are
reported "not verified" with both figures. benchmarks/fullsize.py measures these estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

GIB = 2**30
MARGIN = 1 * GIB  # left to the system and other programs by the default budget
OVERHEAD = 700 * 2**20  # interpreter, torch, transformers, tokenizer: measured resident before any weight
LAYER_BATCH = 512 * 2**20  # compress.layerwise.BATCH_BYTES: a layer's intermediates per forward chunk
SPILL_CHUNK = 256 * 2**20  # compress.activations.CHUNK_BYTES
HEAD_BLOCK = 16384  # compress.layerwise.HEAD_ROWS


def default_budget() -> int:
    """Available memory now, less a margin."""
    return max(psutil.virtual_memory().available - MARGIN, GIB)


def activation_budget(budget: int) -> int:
    """The share of the budget the hidden states between layers may take before they go to disk."""
    return budget // 3


@dataclass(frozen=True)
class Shapes:
    """What the estimates need from a config and the stored checkpoint."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    tied: bool
    parameters: int
    stored_bytes: int  # every tensor as stored
    element_bytes: int  # of the stored dtype

    @classmethod
    def from_info(cls, info) -> Shapes:
        config = info.config
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        element = {"BF16": 2, "F16": 2, "F32": 4}.get(info.stored_dtype, 4)
        return cls(hidden, int(config["intermediate_size"]), heads, int(config.get("num_key_value_heads") or heads),
                   int(config.get("head_dim") or hidden // heads), int(config["vocab_size"]), int(config["num_hidden_layers"]),
                   bool(config.get("tie_word_embeddings", False)), info.parameters, info.weight_bytes, element)

    @property
    def layer_parameters(self) -> int:
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim * self.hidden
        return qkv + self.heads * self.head_dim * self.hidden + 3 * self.intermediate * self.hidden + 2 * self.hidden

    @property
    def table_bytes(self) -> int:
        """The embedding table (or an untied head) in its stored dtype."""
        return self.vocab * self.hidden * self.element_bytes


def _hidden_states(windows: int, seq_len: int, hidden: int, budget: int) -> int:
    """Two stores of hidden states (a layer's inputs and outputs), or the chunks read from disk."""
    whole = 2 * windows * seq_len * hidden * 4
    return whole if whole <= activation_budget(budget) else 2 * SPILL_CHUNK + seq_len * hidden * 4


def layerwise_forward(shapes: Shapes, windows: int, seq_len: int, budget: int) -> int:
    """A layer-sequential forward: one float32 layer, its intermediates, the hidden states."""
    return OVERHEAD + 4 * shapes.layer_parameters + LAYER_BATCH + _hidden_states(windows, seq_len, shapes.hidden, budget)


def baseline_accuracy(shapes: Shapes, windows: int, seq_len: int, budget: int) -> int:
    """Layer-sequential reference log-probs: the forward, then the head (stored), a block of it upcast, and a
    block of BLOCK_ROWS positions' logits and log-probs in float32 with the reference's int64 argsort of them
    (3.3 GiB measured for Phi-4-mini's exact shape at 512 tokens with whole windows, 2026-12-02)."""
    from compress.verify.accuracy import BLOCK_ROWS

    head = shapes.table_bytes + 4 * min(BLOCK_ROWS, seq_len) * shapes.vocab * 4 + HEAD_BLOCK * shapes.hidden * 4
    return max(layerwise_forward(shapes, windows, seq_len, budget), OVERHEAD + head + _hidden_states(windows, seq_len, shapes.hidden, budget))


def calibration(shapes: Shapes, method: str, samples: int, seq_len: int, budget: int, head: bool = False) -> int:
    """Streaming calibration of one layer: the layer read as stored and in float32, then the largest of its
    steps, each beside the statistics the method keeps (GPTQ's Hessians, AWQ's Gram matrices: one float32
    matrix per linear of the block): the forward over the calibration windows (not for RTN); rounding the
    largest linear (three float32 copies: weight, rounded weight, codes); for GPTQ, llm-compressor's
    quantize_weight on down_proj (its Hessian and the act-order permuted copy, three float32 copies of the
    weight); for AWQ, the search (the scaled and clipped copies of gate_up_proj beside the rounding's, the
    bfloat16 copy of down_proj's Gram matrix). The table term is the embedding written into the quantized
    folder beside the one read. Measured at Phi-4 width, one layer, 8x256 tokens: RTN 4.5 GiB (estimate 4.6),
    GPTQ 6.04 (estimate 6.1, its peak inside quantize_weight on down_proj); Phi-4-mini's shape, 8x512: GPTQ
    2.12 (estimate 2.2); one layer, 8x128 (benchmarks/awq.py): AWQ 6.29 GiB at Phi-4 width (estimate 6.7),
    2.36 at Phi-4-mini width (estimate 2.3)."""
    largest_in = max(shapes.hidden, shapes.intermediate)
    largest_linear = 2 * shapes.intermediate * shapes.hidden  # gate_up_proj
    statistics = 4 * (3 * shapes.hidden ** 2 + shapes.intermediate ** 2)  # one float32 matrix per linear's inputs
    hessians = statistics if "gptq" in method else 0
    rounding = 3 * 4 * largest_linear
    forward = 0 if method == "rtn" else LAYER_BATCH + _hidden_states(samples, seq_len, shapes.hidden, budget)
    quantize_weight = 2 * 4 * largest_in ** 2 + 3 * 4 * shapes.intermediate * shapes.hidden if hessians else 0
    steps = max(forward + hessians, rounding + hessians, quantize_weight)
    if "awq" in method:  # the search runs first, its Gram matrices freed before any Hessian is gathered
        steps = max(steps, statistics + max(forward, rounding + 2 * largest_in ** 2))
    layer = OVERHEAD + (4 + shapes.element_bytes) * shapes.layer_parameters
    # `head`: the head quantized last, HEAD_BLOCK rows at a time (four float32 copies of a block inside GPTQ)
    # beside it as stored and its packed codes (at most a byte per weight)
    rounding_head = 4 * 4 * HEAD_BLOCK * shapes.hidden + shapes.vocab * shapes.hidden if head else 0
    return max(layer + steps, OVERHEAD + shapes.table_bytes + rounding_head)


def sensitivity(shapes: Shapes, windows: int, seq_len: int, candidates: int, budget: int, gguf: bool = False) -> int:
    """An auto variant's sensitivity pass (compress.quantize.fisher): every layer's inputs kept for the backward
    pass (within the hidden states' share of the budget, the rest on disk) and the gradients; then the larger of
    the head's step (the head as stored, each compressed-tensors candidate's packed head — at most a byte per
    weight; GGUF candidates are read from their memory-mapped files —, a window's logits and probabilities, then
    every position's head input with a block of rows of each candidate dequantized) and a decoder layer's (in
    float32, each candidate's change in float16, one window's autograd intermediates). Measured at Phi-4-mini width, 2 layers, 8 × 512 tokens, 7 candidates: 5.5 GiB
    (estimate 6.8)."""
    store = windows * seq_len * shapes.hidden * 4
    states = min((shapes.layers + 1) * store, activation_budget(budget)) + 2 * min(store, SPILL_CHUNK)
    packed_heads = 0 if gguf else candidates * shapes.vocab * shapes.hidden
    terms = windows * seq_len * shapes.hidden * 4 + (candidates + 1) * 4096 * shapes.hidden * 4 + 3 * 4096 * 4096 * 4
    head = shapes.table_bytes + packed_heads + max(2 * seq_len * shapes.vocab * 4, terms)  # fisher.TERM_ROWS, TERM_TOKENS
    layer = (4 + 2 * candidates) * shapes.layer_parameters + 3 * seq_len * (2 * shapes.intermediate + shapes.heads * seq_len) * 4
    if gguf:  # the candidates' files mapped as they are read, numpy's dequantizing copies (7.2 GiB measured at Phi-4-mini width, 2 layers, 5 candidates: estimate 7.7)
        mapped = int(candidates * (shapes.vocab * shapes.hidden + shapes.layers * shapes.layer_parameters))
        return OVERHEAD + states + mapped + max(head, layer + 8 * 4 * 2 * shapes.intermediate * shapes.hidden)
    return OVERHEAD + states + max(head, layer)


def whole_model_cpu(shapes: Shapes, seq_len: int) -> int:
    """transformers holding the whole model in float32 on the CPU (compress.runtimes.torch_hf) and one
    window's logits."""
    return OVERHEAD + 4 * shapes.parameters + 2 * seq_len * shapes.vocab * 4


def baseline_whole_model_cpu(shapes: Shapes, seq_len: int) -> int:
    """The original checkpoint loaded whole in transformers: the float32 model, plus the checkpoint's own bytes,
    which it reads through a memory map whose pages count as resident (measured 8.5 / 10.2 / 14.3 GiB at 1 / 2 / 4
    Phi-4-width bf16 layers, 2026-12-02, against 6.0 / 7.2 / 9.8 for the float32 model alone)."""
    return whole_model_cpu(shapes, seq_len) + shapes.stored_bytes


@dataclass(frozen=True)
class OnnxWeights:
    """An ONNX graph's initializer bytes by how onnxruntime holds them on the CPU."""

    prepacked: int  # read only by MatMul-like nodes: repacked at load, the mapped original then let go
    shared: int  # read by a MatMul-like node and another (a tied head's Gather): packed copy and original kept
    largest: int  # the largest prepacked initializer: while it is packed, both forms are resident
    other: int  # the rest, e.g. a table only a Gather reads: mapped, paged in by the rows gathered


def predicted_onnx_weights(shapes: Shapes, bits: int, group_size: int, symmetric: bool, head_bits: int) -> OnnxWeights:
    """The builder's graph before it exists (what compress.verify.size.onnx_weight_bytes reads off one):
    MatMulNBits weights at `bits` with a float32 scale (and a zero point unless symmetric) per `group_size`,
    the head at `head_bits` (16: float32), an int4 graph's quantized tied head shared with the embedding's
    GatherBlockQuantized, every other embedding table float32 and only gathered."""
    def nbits(parameters: int, width: int) -> int:
        return parameters * width // 8 + parameters // group_size * (4 + (0 if symmetric else 1))

    decoder = shapes.layers * (shapes.layer_parameters - 2 * shapes.hidden)
    head_parameters = shapes.vocab * shapes.hidden
    head = 4 * head_parameters if head_bits == 16 else nbits(head_parameters, head_bits)
    shared = shapes.tied and bits == 4 and head_bits != 16
    largest_layer = max(shapes.intermediate * shapes.hidden * 2, (shapes.heads + 2 * shapes.kv_heads) * shapes.head_dim * shapes.hidden)
    return OnnxWeights(prepacked=nbits(decoder, bits) + (0 if shared else head), shared=head if shared else 0,
                       largest=max(head, nbits(largest_layer, bits)), other=0 if shared else 4 * head_parameters)


def onnx_runtime(weights: OnnxWeights, shapes: Shapes, seq_len: int) -> int:
    """onnxruntime-genai holding a graph, from its weights by use (OnnxWeights).

    Measured at Phi-4-mini's width, 2 layers, 2026-12-03 (one process each; load peak / after load): an int4
    graph whose int8 head a GatherBlockQuantized shares 2.23 / 1.59 GiB (0.12 GiB of MatMul weights, 0.64
    shared); an int8 graph 1.48 / 0.91 (0.79 prepacked, a 2.3 GiB float32 table only gathered, not resident);
    an int4 graph with a float32 head and its own table 4.73 / 2.44 (2.39 prepacked, the head 2.29 of it).
    So: packed copies ~1.1x, a shared original kept beside its copy, the largest initializer twice while it is
    packed; then a KV cache and a chunk's logits four times over: onnxruntime's output, genai's, the array
    scored (compress.runtimes.ort_genai) and its exponentials."""
    from compress.runtimes.ort_genai import CHUNK

    held = int(1.1 * weights.prepacked) + 2 * weights.shared
    kv = 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * seq_len * 4
    running = held + kv + 4 * min(CHUNK, seq_len) * shapes.vocab * 4
    return OVERHEAD + max(held + weights.largest, running) + weights.other // 64


def llama_cpp_runtime(file_bytes: int, shapes: Shapes, seq_len: int) -> int:
    """llama.cpp (compress.runtimes.llama_cpp) holding a GGUF: the file memory-mapped and read whole, an F32 KV
    cache of a window, every position's logits (its own buffer and the bindings' copy) and a scored block's
    log-probs and exponentials."""
    from compress.verify.accuracy import BLOCK_ROWS

    kv = 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * seq_len * 4
    logits = 2 * seq_len * shapes.vocab * 4 + 2 * BLOCK_ROWS * shapes.vocab * 4
    return OVERHEAD + file_bytes + kv + logits


def gguf_imatrix(float_gguf_bytes: int, shapes: Shapes, seq_len: int) -> int:
    """llama-imatrix: the float GGUF mapped and read whole, a chunk's activations and logits."""
    return OVERHEAD + float_gguf_bytes + seq_len * (shapes.vocab + 4 * shapes.intermediate) * 4


def onnx_build(shapes: Shapes, method: str, from_float: bool = False, head_rounded: bool = True,
               head_carried: bool = False) -> int:
    """The ONNX GenAI builder's peak.

    From a quantized folder (`-i`) it runs through compress.export.builder_stream, one decoder layer at a
    time: the embedding table and an untied head stay loaded in their stored dtype while it unpacks and
    repacks one layer (~7 bytes per layer parameter). After the layers it rounds a float head in column
    slices read from its spill file (each slice ~5 float32 copies in the rounding pass, the int8 slices kept
    and joined); every spilled initializer is saved a chunk at a time. Measured 2026-12-04 at Phi-4-mini's
    width, 2 layers (tests' shapes aside): 2.2 GiB for int4 with an int8 head, int8, and a float head alike,
    the layer phase being the peak (it was 5.7 GiB for int8 while a tied table went through the rounding pass,
    and 3.5 for int4 while rounded slices waited for the garbage collector). From the float checkpoint it
    casts every weight to float32 in one in-memory graph (~5.3 bytes per parameter) plus the head's rounding;
    int8 also keeps a float32 embedding table. int8-dynamic holds the builder's float32 graph while
    quantize_dynamic rewrites it. A quantized head carried in the folder (`head_carried`): its packed codes and
    their MatMulNBits repacking held (up to 8 bits each), the builder's repack working on 16,384 outputs at a time
    (~15 bytes a weight; whole, it took 10.2 GiB at Phi-4-mini's width; in blocks 2.3 GiB, 2 layers, 8-bit head,
    2026-12-04)."""
    from compress.export.builder_stream import REPACK_COLUMNS, SLICE_BYTES

    head = 4 * shapes.vocab * shapes.hidden
    if method == "onnx-int8-dynamic":
        return OVERHEAD + 8 * shapes.parameters
    if from_float:
        return OVERHEAD + int(5.3 * shapes.parameters) + 2 * head + (head if method == "onnx-int8" else 0)
    tables = shapes.table_bytes * (1 if shapes.tied else 2)
    layers = tables + 7 * shapes.layer_parameters
    rounding = 2 * shapes.vocab * shapes.hidden + 5 * SLICE_BYTES if head_rounded else 0
    carried = tables + 2 * shapes.vocab * shapes.hidden + 15 * shapes.hidden * REPACK_COLUMNS if head_carried else 0
    return OVERHEAD + max(layers, rounding, carried)


def speed_server_fits_beside_every_stage(info, recipe, budget: int) -> bool:
    """Whether the baseline's speed server (the whole model in transformers) may stay loaded beside every stage of
    the run; else it is closed before each stage that touches the float model."""
    stages = run_estimates(info, recipe, budget).values()
    return baseline_whole_model_cpu(Shapes.from_info(info), recipe.evaluation.seq_len) + max(n for n, _ in stages) <= budget


def give_back_freed_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise): after a layer-by-layer stage the
    main process would go on holding its peak while the builder and workers it starts add theirs."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def describe(needed: int, budget: int) -> str:
    return f"needs {needed / GIB:.1f} GiB, {budget / GIB:.1f} GiB available"


def run_estimates(info, recipe, budget: int) -> dict[str, tuple[int, bool]]:
    """What each stage of a recipe needs -> {stage: (bytes, required)}; a required stage that does not fit
    stops the run in preflight, the others are reported "not verified" when they do not fit."""
    from compress.export.onnx_genai import variant_plan
    from compress.model import estimate_memory
    from compress.quantize.plan import KEEP, keeps_decoder_layers

    shapes = Shapes.from_info(info)
    evaluation, calibration_set = recipe.evaluation, recipe.calibration
    whole = whole_model_cpu(shapes, evaluation.seq_len)
    stages = {"baseline accuracy (layer by layer)": (baseline_accuracy(shapes, evaluation.windows, evaluation.seq_len, budget), True),
              "baseline speed and generations (whole model in transformers)": (baseline_whole_model_cpu(shapes, evaluation.seq_len), False)}
    for variant in recipe.variants:
        if variant.method == "auto":
            candidates = len([name for name in variant.candidates if name != "keep"])
            stages[f"{variant.name}: sensitivity pass ({candidates} candidates)"] = (
                sensitivity(shapes, variant.selection, calibration_set.seq_len, candidates, budget, variant.writes_gguf), True)
        if variant.writes_gguf:
            float_bytes = info.parameters * (4 if info.stored_dtype == "F32" else 2)
            if variant.uses_imatrix:
                stages["llama-imatrix (the float GGUF whole)"] = (gguf_imatrix(float_bytes, shapes, calibration_set.seq_len), False)
            stages[f"{variant.name} in llama.cpp"] = (llama_cpp_runtime(int(float_bytes * 0.35), shapes, evaluation.seq_len), False)
            continue
        if variant.is_onnx:
            # the builder rounds the head itself where the plan quantizes it (calibrated folders never do)
            plan = variant_plan(info.config, variant)
            from_float = variant.from_ is None and keeps_decoder_layers(plan)
            source = next((v for v in recipe.variants if v.name == variant.from_), None)
            carried = source is not None and source.quantizes_head
            stages[f"ONNX build, {variant.method}" + (" from the float model" if from_float else "")] = (
                onnx_build(shapes, variant.method, from_float, plan.get("lm_head", KEEP) != KEEP and not carried, carried), False)
            if variant.method in ("onnx-int4", "onnx-int8"):
                bits = 4 if variant.method == "onnx-int4" else 8
                weights = predicted_onnx_weights(shapes, bits, variant.group_size, variant.symmetric, plan.get("lm_head", KEEP))
                stages[f"{variant.name} in onnxruntime-genai"] = (onnx_runtime(weights, shapes, evaluation.seq_len), False)
            continue
        if variant.method == "awq" and variant.awq_mappings == "stock":
            needed = estimate_memory(info, calibration_set.samples, calibration_set.seq_len, evaluation.seq_len).quantize
            stages["calibration, stock AWQ (whole model)"] = (needed, True)
        else:
            method = variant.base if variant.method == "auto" else variant.method  # auto: its base, once per candidate
            needed = calibration(shapes, method, calibration_set.samples, calibration_set.seq_len, budget,
                                 variant.method == "auto" or variant.quantizes_head)
            stages[f"calibration, {method} (layer by layer)"] = (needed, True)
        if variant.method == "auto" and variant.formats == ["onnx"]:  # the plan's integers, as GPTQ, into the builder
            settings = [setting for setting in variant.candidate_settings().values() if setting]
            bits, group = max(bits for bits, _ in settings), min(group for _, group in settings)
            head_quantized = not variant.ignore  # recipe: only lm_head may be ignored here
            stages[f"ONNX build, {variant.name}"] = (onnx_build(shapes, "onnx-int4", False, False, head_quantized), False)
            head = KEEP if "keep" in variant.candidates else bits  # at most: every layer at the widest candidate
            stages[f"{variant.name} in onnxruntime-genai"] = (
                onnx_runtime(predicted_onnx_weights(shapes, bits, group, variant.symmetric, head), shapes, evaluation.seq_len), False)
        if "compressed-tensors" in variant.formats:
            stages["compressed-tensors checks (whole model in transformers)"] = (whole, False)
        for fmt in {"gptq", "awq"} & set(variant.formats):
            stages[f"{variant.name} ({fmt}) in onnxruntime-genai"] = (folder_check(info, variant, evaluation.seq_len), False)
    return stages


def folder_check(info, variant, seq_len: int) -> int:
    """onnxruntime-genai holding the int4 build a GPTQ v1 or AWQ folder is checked through (zero points as the
    folders keep them, the head as the variant's plan leaves it: float32 where it stays float)."""
    from compress.export.onnx_genai import variant_plan
    from compress.quantize.plan import KEEP

    shapes = Shapes.from_info(info)
    head_bits = variant_plan(info.config, variant).get("lm_head", KEEP)
    return onnx_runtime(predicted_onnx_weights(shapes, variant.bits, variant.group_size, False, head_bits), shapes, seq_len)
