"""The baseline's evaluation, cached on disk by everything it depends on, so reruns and sweeps reuse it.

Key: model fingerprint, evaluation settings, the exact token windows and prompts, target, and the versions
of the libraries that produce the figures. Location: $COMPRESS_CACHE, else ~/.cache/compress.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def baseline_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_baseline(key: str, reference: Path) -> dict | None:
    """The cached worker result, with its reference copied to `reference`; None when not cached."""
    entry = cache_root() / "baselines" / key
    if not (entry / "result.json").is_file() or not (entry / "reference.npz").is_file():
        return None
    reference.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(entry / "reference.npz", reference)
    return json.loads((entry / "result.json").read_text())


def store_baseline(key: str, result: dict, reference: Path) -> None:
    """Save a finished baseline; written to a temporary folder and renamed, so a reader never sees half."""
    entry = cache_root() / "baselines" / key
    if entry.exists():
        return
    temporary = entry.with_name(f"{key}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    shutil.copy2(reference, temporary / "reference.npz")
    (temporary / "result.json").write_text(json.dumps(result))
    try:
        os.rename(temporary, entry)
    except OSError:  # another run stored the same key first
        shutil.rmtree(temporary, ignore_errors=True)
