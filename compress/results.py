"""The few frozen types that carry a run's data from stage to stage and into the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PASS, FAIL, NOT_VERIFIED, NOT_APPLICABLE = "pass", "fail", "not-verified", "not-applicable"


@dataclass(frozen=True)
class Artifact:
    variant: str
    method: str
    format: str  # "compressed-tensors" | "gptq" | "awq" | "onnx" | "onnx-cuda"
    path: Path  # staging folder; the release folder once released
    runtime: str  # how it is loaded and run: "transformers" | "onnxruntime-genai" (or a sentence saying how)
    size_bytes: int
    bits: dict[str, float]  # bits_per_weight, bits_per_weight_all
    details: dict = field(default_factory=dict)  # what quantization decided (layer plan, AWQ mappings, time, log)
    runnable: Path | None = None  # the folder the runtime loads: `path`, or an ONNX build made from it
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)  # target -> (status, why) where not run


@dataclass(frozen=True)
class Verdict:
    target: str
    status: str  # PASS | FAIL | NOT_VERIFIED
    metrics: dict[str, float]
    failures: list[str]  # human sentences: "KLD 0.031 > max_kld 0.02"
    environment: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == PASS


@dataclass(frozen=True)
class Outcome:
    """One artifact with its verdict on every target and whether it was released."""

    artifact: Artifact
    verdicts: dict[str, Verdict]
    released: bool
    reasons: list[str]  # why it was not released, as sentences; empty when released
