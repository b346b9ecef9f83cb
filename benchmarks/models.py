"""Random-weight Phi-3-architecture checkpoints at real Phi-4 / Phi-4-mini widths, built once and cached.

Weights are written one shard per decoder layer (bf16 or fp32, normal(0, 0.02), norms at 1), so a model
of N layers is a folder of symlinks to the first N shards of a pool: 1-, 2- and 4-layer slices cost the
disk of the 4-layer one. The tokenizer is the embedded model's (vocabulary 4096): it is never used to
tokenize here (benchmarks feed token ids), only to satisfy loaders that expect one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.common import CACHE

TINY = Path(__file__).resolve().parents[1] / "compress" / "assets" / "tiny-phi4-mini"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Phi-4-mini: hidden 3072, 24 heads / 8 KV heads (head_dim 128), intermediate 8192, vocab 200064, tied.
PHI4_MINI_WIDTH = {
    "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
    "vocab_size": 200064, "tie_word_embeddings": True, "partial_rotary_factor": 0.75,
}
# Phi-4: hidden 5120, 40 heads / 10 KV heads (head_dim 128), intermediate 17920, vocab 100352, untied.
PHI4_WIDTH = {
    "hidden_size": 5120, "intermediate_size": 17920, "num_attention_heads": 40, "num_key_value_heads": 10,
    "vocab_size": 100352, "tie_word_embeddings": False, "partial_rotary_factor": 1.0,
}
# The real models' depths and parameter counts (from their configs), for extrapolation.
FULL_LAYERS = {"phi4-mini": 32, "phi4": 40}
WIDTHS = {"phi4-mini": PHI4_MINI_WIDTH, "phi4": PHI4_WIDTH}


def phi3_config(width: dict, layers: int, dtype: str = "bf16"):
    from transformers import Phi3Config

    # bos/eos/pad explicitly: Phi3Config defaults them to 32000. A short context keeps rotary caches small.
    config = Phi3Config(**width, num_hidden_layers=layers, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        max_position_embeddings=4096, architectures=["Phi3ForCausalLM"])
    config.dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    return config


def _in_shard(name: str, index: int | None) -> bool:
    """Shard `index` holds layer `index`; shard None holds everything outside the layers."""
    return name.startswith(f"model.layers.{index}.") if index is not None else not name.startswith("model.layers.")


def _shard_tensors(model, index: int | None, dtype, generator) -> dict:
    import torch

    tensors = {}
    for name, meta in model.state_dict().items():
        if not _in_shard(name, index) or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue  # a tied head is stored once, as model.embed_tokens.weight
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(meta.shape, generator=generator) * 0.02).to(dtype)
    return tensors


def _write_pool(width: dict, layers: int, dtype_name: str, pool: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3ForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    with torch.device("meta"):
        model = Phi3ForCausalLM(phi3_config(width, layers, dtype_name))
    generator = torch.Generator().manual_seed(0)
    staging = pool.with_name(pool.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for index in [None, *range(layers)]:
        name = "shared.safetensors" if index is None else f"layer-{index:03d}.safetensors"
        save_file(_shard_tensors(model, index, dtype, generator), str(staging / name), metadata={"format": "pt"})
    staging.rename(pool)


def random_model(family: str, layers: int, dtype: str = "bf16", pool_layers: int | None = None) -> Path:
    """A cached folder holding a random `family`-width model with `layers` layers (symlinked shards)."""
    pool_layers = max(layers, pool_layers or layers)
    pools = sorted((p for p in CACHE.glob(f"pool-{family}-{dtype}-L*") if p.name.rsplit("L", 1)[1].isdigit()),
                   key=lambda p: int(p.name.rsplit("L", 1)[1]))  # not a pool still being written (.tmp)
    pool = next((p for p in pools if int(p.name.rsplit("L", 1)[1]) >= layers), None)
    if pool is None:
        pool = CACHE / f"pool-{family}-{dtype}-L{pool_layers}"
        _write_pool(WIDTHS[family], pool_layers, dtype, pool)
    folder = CACHE / f"{family}-{dtype}-{layers}L"
    if (folder / "config.json").is_file() and all(link.exists() for link in folder.glob("*.safetensors")):
        return folder  # (a link made through another checkout of the cache may dangle: rebuilt below)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weight_map = {}
    for shard in ["shared.safetensors", *(f"layer-{i:03d}.safetensors" for i in range(layers))]:
        (folder / shard).symlink_to(Path("..") / pool.name / shard)  # relative: the cache may be reached by another path
        weight_map.update({name: shard for name in _shard_names(pool / shard)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    phi3_config(WIDTHS[family], layers, dtype).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(TINY / name, folder / name)
    return folder


def _shard_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return list(handle.keys())
