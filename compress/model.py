"""Find a Phi-4-family checkpoint, check it before any weights are loaded, and estimate what it needs.

A model is `builtin:NAME` (shipped with the package), a local folder, or a Hugging Face hub id. A local
folder never touches the network; a hub id is the only thing that may. trust_remote_code is never on.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"tiny-phi4-mini": ASSETS / "tiny-phi4-mini"}
PHI3_ARCHITECTURES = {"Phi3ForCausalLM"}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The linear layers Phi-3-architecture blocks hold, by role. One table, used wherever layers are named.
PHI3_LINEARS = {
    "attention": ("self_attn.qkv_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_up_proj", "mlp.down_proj"),
}


class ModelError(ValueError):
    """A model that cannot be used; the message is one sentence for the user."""


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what the user wrote
    path: Path  # local folder holding config.json, weights and tokenizer
    config: dict
    parameters: int
    weight_bytes: int  # bytes of every tensor as stored
    stored_dtype: str

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])


def resolve_model(spec: str) -> Path:
    """A local folder for `spec`, downloading a hub id only when one is named."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ModelError(f"unknown built-in model {spec!r}; known: {', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
        return BUILTIN_MODELS[name]
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {spec} is a file; give the folder that holds config.json and the weights")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _download(spec)
    raise ModelError(f"model folder {spec} does not exist")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as error:  # the hub client raises many kinds; all mean "cannot get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or any(
            word in type(error).__name__ for word in ("Connect", "Timeout", "LocalEntryNotFound", "OfflineMode"))
        if offline:
            raise ModelError(f"cannot download {repo_id}: no network (or HF_HUB_OFFLINE is set) and it is not in the "
                             "local Hugging Face cache; download it elsewhere and give its local folder") from None
        raise ModelError(
            f"could not fetch {repo_id} from the Hugging Face hub ({type(error).__name__}); "
            "check the id and the network, or give a local folder"
        ) from None


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ModelError(f"{path.name} is not a safetensors file (bad header)")
        try:
            return json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path.name} is not a safetensors file (bad header)") from None


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise ModelError(f"{path} holds only pickle weights (.bin/.pt), which are never loaded; convert them to safetensors")
        raise ModelError(f"{path} holds no .safetensors weights")
    return files


def inspect_model(spec: str) -> ModelInfo:
    """Read config and safetensors headers (no weights) and refuse what is not a Phi-3-architecture model."""
    path = resolve_model(spec)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{spec} is not a model folder: config.json is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{config_file} is not valid JSON (line {error.lineno})") from None
    architectures = set(config.get("architectures") or [])
    if not architectures & PHI3_ARCHITECTURES and config.get("model_type") != "phi3":
        found = ", ".join(sorted(architectures)) or config.get("model_type", "unknown")
        raise ModelError(f"{spec} is a {found} model; compress handles Phi-3-architecture (Phi-4 family) checkpoints only")
    parameters = weight_bytes = 0
    dtypes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    files = weight_files(path)
    from compress.check import truncation_problems

    if problems := truncation_problems(path):
        raise ModelError(f"{spec}: {problems[0]}")
    for file in files:
        for name, entry in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            shapes[name] = entry["shape"]
            count = 1
            for dim in entry["shape"]:
                count *= dim
            parameters += count
            weight_bytes += count * DTYPE_BYTES.get(entry["dtype"], 4)
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + count
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelError(f"{spec} has no tokenizer (tokenizer.json or tokenizer.model)")
    if mismatch := config_mismatch(config, shapes):
        raise ModelError(f"{spec}: config.json does not match the weights: {mismatch}")
    stored = max(dtypes, key=dtypes.get) if dtypes else "F32"
    return ModelInfo(spec, path, config, parameters, weight_bytes, stored)


def config_mismatch(config: dict, shapes: dict[str, list[int]]) -> str | None:
    """The first way the weights' shapes contradict config.json, as words; None when they agree."""
    try:
        hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as error:
        return f"it lacks a usable {error}"
    expected = {
        "model.embed_tokens.weight": [vocab, hidden],
        "model.layers.0.self_attn.qkv_proj.weight": [(heads + 2 * kv_heads) * head_dim, hidden],
        "model.layers.0.mlp.gate_up_proj.weight": [2 * int(config.get("intermediate_size", 0)), hidden],
    }
    for name, shape in expected.items():
        if name in shapes and list(shapes[name]) != shape:
            return f"{name} is {list(shapes[name])}, but the config implies {shape}"
        if name not in shapes:
            return f"{name} is missing from the weights"
    found = {int(name.split(".")[2]) for name in shapes if name.startswith("model.layers.")}
    if found != set(range(layers)):
        return f"it says {layers} layers but the weights hold {len(found)}"
    return None


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes for each stage; see benchmarks/ for how these were checked."""

    baseline: int
    quantize: int
    verify: int
    device_verify: int  # on an accelerator: the model in its stored dtype plus one batch of logits

    def largest(self) -> int:
        return max(self.baseline, self.quantize, self.verify)


def estimate_memory(info: ModelInfo, calibration_samples: int, calibration_seq_len: int, eval_seq_len: int) -> MemoryPlan:
    """Bytes each stage needs when the whole model is loaded, from the config alone: what stock AWQ (inside
    llm-compressor) and benchmarks/scaling.py's whole-model GPTQ need. Every other stage works layer by layer
    and is estimated in compress/memory.py.

    Baseline and verification hold the model in fp32 on the CPU (stored dtype on CUDA) plus one batch of
    logits. GPTQ holds the whole model as stored (llm-compressor loads dtype="auto"), one Hessian [in, in]
    fp32 per linear layer of the current block plus two working copies of the largest (normalized, then
    stacked), and one fp32 activation of the widest layer per calibration token. benchmarks/scaling.py
    measures these: per layer, peak RSS grows by about the layer's stored bytes (666 MiB per Phi-4 layer
    against 650 MiB stored, 2026-11-26), so the weights count 1.1× as a margin; per calibration token, by
    max(hidden, 2 × intermediate) fp32. Against that run: Phi-4 slices of 1, 2, 4 layers 1.16×, 1.15×, 1.14×
    their measured peak; extrapolated to 40 layers (31.8 GiB) 1.09×.
    """
    config = info.config
    hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    model_fp32 = info.parameters * 4
    logits = 2 * eval_seq_len * vocab * 4
    hessians = 4 * (2 * hidden * hidden + intermediate * intermediate) + 4 * hidden * hidden
    gptq_copies = 2 * 4 * max(hidden, intermediate) ** 2
    activations = calibration_samples * calibration_seq_len * max(hidden, 2 * intermediate) * 4
    overhead = 600 * 2**20  # interpreter, torch, tokenizer
    return MemoryPlan(
        baseline=model_fp32 + logits + overhead,
        quantize=int(1.1 * info.weight_bytes) + hessians + gptq_copies + activations + overhead,
        verify=model_fp32 + logits + overhead,
        device_verify=info.weight_bytes + logits + 512 * 2**20,
    )
