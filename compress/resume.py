"""Resuming a run: what each variant's work depends on, and the released artifacts still valid for it.

A stamp is a hash of every input of a stage (settings, model fingerprint, data hashes, library versions).
A released artifact whose manifest carries the same stamp and whose files still match its hashes is kept;
a saved calibration with the same calibration stamp is reused (compress.produce).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from compress.recipe import Recipe, Variant
from compress.release import release_is_current
from compress.results import Artifact, Outcome, Verdict
from compress.verify.targets import availability


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# What an auto variant's candidate calibrations do not depend on: auto variants alike but for these share them.
AUTO_CHOICES = {"name", "budget", "selection", "candidates"}


def calibration_stamp(variant: Variant, context: dict) -> str:
    """Everything a variant's calibration depends on: if it is unchanged, the saved calibration is reused."""
    settings = variant.model_dump(mode="json", by_alias=True,
                                  exclude={"gates", "formats"} | (AUTO_CHOICES if variant.method == "auto" else set()))
    return _digest({"variant": settings, "model": context["model"]["fingerprint"], "data": context["data"],
                    "sensitivity": context["recipe"]["evaluation"]["sensitivity_samples"], "versions": context["versions"]})


def variant_stamp(recipe: Recipe, variant: Variant, context: dict, earlier: dict[str, str]) -> str:
    """Everything a variant's released artifacts depend on, its `from:` source's stamp included."""
    return _digest({"calibration": calibration_stamp(variant, context), "formats": variant.formats,
                    "variant": variant.model_dump(mode="json", by_alias=True, exclude={"gates"}),
                    "evaluation": context["recipe"]["evaluation"], "targets": context["recipe"]["targets"],
                    "gates": recipe.gates_for(variant).model_dump(), "source": earlier.get(variant.from_ or "")})


def expected_formats(recipe: Recipe, variant: Variant, has_device: Callable[[str], bool] | None = None) -> list[str]:
    """The formats a variant makes: an ONNX variant's onnx-<device> for each target device besides the CPU that
    `has_device` (else: this machine's onnxruntime-genai has it)."""
    if not variant.is_onnx:
        return list(variant.formats)
    has_device = has_device or (lambda device: availability(device, "onnxruntime-genai") is None)
    return ["onnx"] + [f"onnx-{d}" for d in recipe.devices() if d != "cpu" and has_device(d)]


def released_outcomes(recipe: Recipe, variant: Variant, out: Path, stamp: str,
                      current: Callable[[Path, str], dict | None] = release_is_current,
                      has_device: Callable[[str], bool] | None = None) -> list[Outcome] | None:
    """The variant's outcomes from an earlier run, when every format it makes (expected_formats) was released
    from the same inputs (`current(folder, stamp)`: its manifest where the folder is current, as
    compress.release judges on disk)."""
    outcomes = []
    for fmt in expected_formats(recipe, variant, has_device):
        folder = out / "release" / variant.name / fmt
        manifest = current(folder, stamp)
        if manifest is None:
            return None
        bits = {key: manifest.get(key) for key in ("bits_per_weight", "bits_per_weight_all", "quantized_layer_bits")}
        details = {**manifest.get("quantization", {}), "resumed": "kept from an earlier run with the same inputs"}
        artifact = Artifact(variant.name, manifest["method"], fmt, folder, manifest["runtime"], manifest["size_bytes"],
                            bits, details)
        verdicts = {target: Verdict(**verdict) for target, verdict in manifest["verdicts"].items()}
        outcomes.append(Outcome(artifact, verdicts, True, []))
    return outcomes
