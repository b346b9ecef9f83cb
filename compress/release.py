"""Manifests and release: an artifact reaches release/ whole, verified, and described, or not at all.

The manifest is written last inside the staging folder; the folder is then moved into release/ by one
rename on the same file system, so release/ never holds a partial artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from compress.results import Outcome

KEY_PACKAGES = (
    "compress", "torch", "transformers", "llmcompressor", "compressed-tensors", "onnxruntime",
    "onnxruntime-genai", "onnx", "numpy", "safetensors", "tokenizers",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest itself, by relative path."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            hashes[str(path.relative_to(folder))] = digest.hexdigest()
    return hashes


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers see the old or the new file whole."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def build_manifest(outcome: Outcome, context: dict, files: dict[str, str] | None = None) -> dict:
    """Everything needed to know what an artifact is and how it was proven; written into its folder. `files`:
    its files' hashes where they were taken elsewhere (on the cluster node that wrote the folder)."""
    artifact = outcome.artifact
    return {
        "variant": artifact.variant,
        "method": artifact.method,
        "format": artifact.format,
        "runtime": artifact.runtime,
        "released": outcome.released,
        "not_released_because": outcome.reasons,
        "size_bytes": artifact.size_bytes,
        **artifact.bits,
        "quantization": artifact.details,
        "verdicts": {target: asdict(verdict) for target, verdict in outcome.verdicts.items()},
        **context,  # recipe (resolved), recipe sha256, model, data hashes, versions
        "files": file_hashes(artifact.path) if files is None else files,
    }


def release(staging: Path, destination: Path, trash: Path) -> Path:
    """Move a verified staging folder into release/ by atomic rename, replacing an older release.

    An older release is first moved out of release/ into `trash` (same file system), so a kill between the
    two renames leaves release/ without that artifact, never with a stale or partial one beside it.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        trash.mkdir(parents=True, exist_ok=True)
        retired = trash / f"{destination.parent.name}-{destination.name}-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(destination, retired)
        os.rename(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, destination)
    return destination


def release_is_current(folder: Path, stamp: str) -> dict | None:
    """The manifest of a released artifact made from the same inputs, whose files still match it; else None."""
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("inputs_stamp") != stamp or manifest.get("files") != file_hashes(folder):
        return None
    return manifest
