"""compressed-tensors folders: what vLLM and plain transformers load unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

# Files of the source checkpoint that a runnable folder needs besides weights and config.
CARRIED_FILES = ("generation_config.json",)


def write_compressed_tensors(model, tokenizer, source: Path, out: Path) -> Path:
    """Save a quantized model as a `pack-quantized` compressed-tensors folder with tokenizer and generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    for name in CARRIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


EXPORTERS = {"compressed-tensors": write_compressed_tensors}
