"""Recipes: the YAML contract, validated whole before any model is loaded.

Errors name the file, the line and the field, in one sentence:
    recipes/x.yaml:14: variants[0].bits: must be one of 2, 3, 4, 8
This module imports no torch, so a typo fails in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.sweeps import expand_matrix
from compress.verify.generation import DEFAULT_PROMPTS

# method -> formats it can write; the first is the default.
FORMATS_BY_METHOD = {
    "gptq": ("compressed-tensors", "gptq", "awq"),
    "awq": ("compressed-tensors", "awq", "gptq"),
    "awq-gptq": ("compressed-tensors", "gptq", "awq"),
    "rtn": ("compressed-tensors", "gptq", "awq"),
    "onnx-int4": ("onnx",),
    "onnx-int8": ("onnx",),
    "onnx-int8-dynamic": ("onnx",),
    "gguf": ("gguf",),
    "auto": ("compressed-tensors", "gguf", "onnx"),
}
METHODS = tuple(FORMATS_BY_METHOD)
ONNX_METHODS = ("onnx-int4", "onnx-int8", "onnx-int8-dynamic")
ONNX_BITS = {"onnx-int4": 4, "onnx-int8": 8, "onnx-int8-dynamic": 8}
CALIBRATED_METHODS = ("gptq", "awq", "awq-gptq", "rtn")  # their integer weights can be carried into ONNX and GGUF with `from:`
# llama-quantize's types (llama-cpp-python 0.3.36's llama.cpp, `llama-quantize --help`).
GGUF_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K", "Q4_K_S",
    "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
    "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "F16", "BF16", "F32",
)
AUTO_BASES = ("gptq", "rtn")  # awq: each setting's own AWQ scales are folded into the norms, so its layers do not mix
# compressed-tensors' default menu (issue 14's measurements: 3g128, 5g64 and 6g128 beside the rest saved another 5-9%)
AUTO_CANDIDATES = ("3g64", "3g128", "4g64", "4g128", "5g64", "6g128", "8g128", "keep")
# ONNX auto variants: MatMulNBits holds 2, 4 and 8 bits in blocks of 16 to 256; every decoder layer is quantized
# (the builder's GPTQ reader needs them all), keep applies to the head only.
ONNX_AUTO_CANDIDATES = ("4g32", "4g64", "4g128", "8g128", "keep")
ONNX_BLOCKS = (16, 32, 64, 128, 256)
# GGUF auto variants choose each tensor's llama.cpp type: block types llama-quantize writes whole (--pure).
GGUF_AUTO_CANDIDATES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "keep")
GGUF_TENSOR_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
CANDIDATE = re.compile(r"^(?:(?P<bits>[234568])g(?P<group>-1|\d+)|keep)$")
# The IQ1/IQ2 types are unusable without an importance matrix: llama-quantize refuses them.
GGUF_NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S")
TARGETS = ("cpu", "cuda")
NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # recipe, variant and target names: safe as folder names
BITS = (2, 3, 4, 5, 6, 8)  # pack-quantized holds any width; transformers runs them all, vLLM's kernels 4 and 8
ONNX_ALGORITHMS = ("default", "rtn", "k_quant")
# Kept at higher precision: lm_head and embeddings at 8 bits and mlp.down_proj at 8 bits, the fixes reported
# for degenerate int4 Phi-4-mini output (see DEPENDENCIES.md).
PRESETS = {
    "phi4-safe": [
        {"match": r"(^|\.)lm_head$", "bits": 8},
        {"match": r"embed_tokens$", "bits": 8},
        {"match": r"mlp\.down_proj$", "bits": 8},
    ],
}


class RecipeError(ValueError):
    """A recipe that cannot be used; str() is the one sentence the user sees."""


class LocatedError(Exception):
    """A cross-field mistake with the recipe location it belongs to; not a ValueError, so pydantic lets it through."""

    def __init__(self, location: tuple, message: str):
        super().__init__(message)
        self.location, self.message = location, message


def _one_of(value, allowed: tuple):
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(Strict):
    dataset: str = "builtin:pydoc-calib"
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)
    seed: int = 0


class Evaluation(Strict):
    dataset: str = "builtin:pydoc-eval"
    seq_len: int = Field(256, ge=8)
    windows: int = Field(32, ge=2)  # the standard error needs at least two windows
    top_k: int = Field(64, ge=1)  # reference log-probabilities kept per position for KLD
    prompt_tokens: int = Field(64, ge=1)  # speed: fixed prompt length
    new_tokens: int = Field(32, ge=2)  # speed: greedy tokens generated
    speed_runs: int = Field(3, ge=3)  # speed: timed runs after one warm-up; the median is reported
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)  # generation sanity
    generation_tokens: int = Field(48, ge=4)  # greedy tokens generated per prompt at most
    agreement_tokens: int = Field(16, ge=1)  # how many first tokens are compared with the baseline's
    sensitivity_samples: int = Field(4, ge=0)  # calibration windows for the per-layer SQNR table (0: skip it)


class Target(Strict):
    """A place artifacts are verified: a device, and on a cluster the labels of the nodes that are that place."""

    device: Literal["cpu", "cuda"] | None = None  # default: the target's name, where it is cpu or cuda
    required: bool = False
    node_labels: dict[str, str] = {}  # on a cluster (`--cluster`), the labels a node must carry to be this target

    def where(self) -> str:
        return labels_text(self.node_labels)


def labels_text(labels: dict[str, str]) -> str:
    """Node labels as the report and the errors say them: {place: laptop}."""
    return "{" + ", ".join(f"{key}: {value}" for key, value in labels.items()) + "}"


class Gates(Strict):
    max_kld: float | None = Field(None, ge=0)
    min_top1: float | None = Field(None, ge=0, le=1)
    max_ppl_ratio: float | None = Field(None, gt=0)
    max_size_ratio: float | None = Field(None, gt=0)
    min_decode_speedup: float | None = Field(None, gt=0)
    max_repetition: float | None = Field(None, ge=0, le=1)  # share of repeated 4-grams in generations
    min_eos_rate: float | None = Field(None, ge=0, le=1)  # share of prompts answered with EOS in time

    def merged(self, override: Gates | None) -> Gates:
        """These gates with every field the override sets replacing ours."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_unset=True))


# Options only some methods take: (fields) -> (those methods, who they are in the error sentence).
METHOD_OPTIONS = {
    ("algorithm",): (ONNX_METHODS, "ONNX methods"),
    ("accuracy_level",): ((*ONNX_METHODS, "auto"), "ONNX methods and auto variants writing onnx"),
    ("quant", "imatrix"): (("gguf",), "gguf variants"),
    ("budget", "base", "candidates", "selection"): (("auto",), "auto variants"),
}


def _group_problem(value: int) -> str | None:
    """Why `value` cannot be a group size (a power of two of at least 8, or -1), or None."""
    return None if value == -1 or (value >= 8 and not value & (value - 1)) else \
        "must be a power of two of at least 8, or -1 for one group per row"


class Budget(Strict):
    max_kld: float | None = Field(None, gt=0)  # mean KL divergence per token from the original, nats, on held-out text
    max_bits_per_weight: float | None = Field(None, gt=0)  # quantized-layer bits (METRICS.md) the plan may use at most

    @model_validator(mode="after")
    def one_at_least(self) -> Budget:
        if self.max_kld is None and self.max_bits_per_weight is None:
            raise ValueError("name max_kld (the KLD the plan must meet), max_bits_per_weight (the size it must fit) or both")
        return self


class Override(Strict):
    """Layers whose name matches `match` (a regular expression, searched) get `bits` instead; first match wins."""

    match: str
    bits: Literal[8, 16, "skip"]

    @field_validator("match")
    @classmethod
    def valid_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{value!r} is not a valid regular expression: {error}") from None
        return value


class Variant(Strict):
    name: str = Field(pattern=f"^{NAME}$")
    method: str
    bits: int = 4
    group_size: int = 128  # for ONNX methods: the builder's block size
    symmetric: bool = True
    ignore: list[str] = ["lm_head"]
    formats: list[str] = []  # default: the method's first format
    dampening: float = Field(0.01, gt=0, lt=1)  # GPTQ: fraction of the Hessian's mean diagonal added
    n_grid: int = Field(20, ge=1, le=100)  # AWQ: scales tried per mapping (its search cost)
    # AWQ's mappings: phi = every exact rescaling of a Phi-3 block, fused slices included (quantize/phi_awq.py);
    # stock = llm-compressor's own AWQModifier and mapping table (skips qkv_proj -> o_proj under GQA)
    awq_mappings: Literal["phi", "stock"] = "phi"
    accuracy_level: int = Field(4, ge=0, le=4)  # ONNX: MatMulNBits compute type (4 int8, 1 fp32, 0 EP default)
    algorithm: str = "default"  # ONNX builder's own weight algorithm: default, rtn, k_quant
    from_: str | None = Field(None, alias="from")  # ONNX int4, GGUF: carry this earlier variant's integer weights
    quant: str = "Q4_K_M"  # GGUF: llama-quantize's type
    imatrix: bool | None = None  # GGUF: llama.cpp's importance matrix on the calibration tokens (default: K- and IQ-quants)
    budget: Budget | None = None  # auto: the smallest plan whose KLD meets this
    base: str = "gptq"  # auto: the quantizer every layer's candidates come from
    candidates: list[str] = list(AUTO_CANDIDATES)  # auto: settings each layer may take, "<bits>g<group>" or keep
    selection: int = Field(8, ge=2)  # auto: calibration-length windows, disjoint from the calibration samples, to choose on
    overrides: list[Override] = []
    preset: Literal["phi4-safe"] | None = None
    gates: Gates | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def is_onnx(self) -> bool:
        return self.method in ONNX_METHODS

    @property
    def calibrated(self) -> bool:
        """Whether compress itself calibrates this variant (a compressed-tensors folder comes of it)."""
        return self.method in CALIBRATED_METHODS

    @property
    def uses_imatrix(self) -> bool:
        if self.method == "auto" and self.writes_gguf:  # llama.cpp's importance matrix, as for its K-quants
            return any(re.match(r"^(Q\d_K|IQ)", name) for name in self.candidates)
        if self.method != "gguf" or self.from_:
            return False
        return self.imatrix if self.imatrix is not None else bool(re.match(r"^(Q\d_K|IQ)", self.quant))

    @property
    def writes_gguf(self) -> bool:
        """A gguf variant, or an auto variant choosing llama.cpp tensor types."""
        return self.method == "gguf" or (self.method == "auto" and self.formats == ["gguf"])

    @property
    def quantizes_head(self) -> bool:
        """Whether this calibrated variant's plan quantizes lm_head (every variant ignores it unless told)."""
        from compress.quantize.plan import KEEP, resolve_plan

        return self.calibrated and resolve_plan(["lm_head"], self.bits, list(self.ignore), self.layer_overrides())["lm_head"] != KEEP

    @property
    def asks_float_head(self) -> bool:
        """Whether this variant's own settings keep lm_head in floating point (the default ignore list aside)."""
        from compress.quantize.plan import KEEP, resolve_plan

        explicit = "ignore" in self.model_fields_set or any(re.search(rule.match, "lm_head") for rule in self.layer_overrides())
        return explicit and resolve_plan(["lm_head"], self.bits, list(self.ignore), self.layer_overrides())["lm_head"] == KEEP

    def layer_overrides(self) -> list[Override]:
        """The variant's own overrides, then its preset's: first match wins."""
        return list(self.overrides) + [Override(**rule) for rule in PRESETS.get(self.preset or "", [])]

    @field_validator("method")
    @classmethod
    def known_method(cls, value: str) -> str:
        return _one_of(value, METHODS)

    @field_validator("bits")
    @classmethod
    def known_bits(cls, value: int) -> int:
        return _one_of(value, BITS)

    @field_validator("group_size")
    @classmethod
    def power_of_two(cls, value: int) -> int:
        if problem := _group_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("ignore")
    @classmethod
    def valid_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
        return value

    @field_validator("algorithm")
    @classmethod
    def known_algorithm(cls, value: str) -> str:
        return _one_of(value, ONNX_ALGORITHMS)

    @model_validator(mode="after")
    def consistent(self) -> Variant:
        allowed = FORMATS_BY_METHOD[self.method]
        if "formats" in self.model_fields_set and not self.formats:
            raise ValueError("formats: list at least one format")
        if not self.formats:
            object.__setattr__(self, "formats", [allowed[0]])
        for index, fmt in enumerate(self.formats):
            if fmt not in allowed:
                raise ValueError(f"formats[{index}]: method {self.method} cannot write {fmt!r}; it writes {', '.join(allowed)}")
        if {"gptq", "awq"} & set(self.formats) and any(rule.bits == 8 for rule in self.layer_overrides()):
            raise ValueError("formats: gptq and awq folders hold one bit width; 8-bit layer overrides need compressed-tensors")
        if {"gptq", "awq"} & set(self.formats) and self.quantizes_head:
            raise ValueError("formats: gptq and awq folders keep lm_head in floating point; ignore it (ignore: [lm_head]) "
                             "or write compressed-tensors only")
        if "gptq" in self.formats and self.bits not in (2, 4, 8):
            raise ValueError(f"formats: the gptq format holds 2-, 4- or 8-bit weights, not {self.bits}-bit")
        if "awq" in self.formats and self.bits != 4:
            raise ValueError(f"formats: the awq format holds 4-bit weights only, not {self.bits}-bit")
        if self.is_onnx:
            implied = ONNX_BITS[self.method]
            if "bits" in self.model_fields_set and self.bits != implied:
                raise ValueError(f"bits: method {self.method} quantizes to {implied} bits, not {self.bits}")
            object.__setattr__(self, "bits", implied)
            if self.group_size not in (16, 32, 64, 128, 256) and self.method != "onnx-int8-dynamic":
                raise ValueError(f"group_size: the ONNX builder's block size must be 16, 32, 64, 128 or 256, not {self.group_size}")
            if any(rule.bits == 8 and not _only_lm_head(rule.match) for rule in self.layer_overrides()):
                raise ValueError(
                    "overrides: the ONNX builder can keep only lm_head at 8 bits; "
                    "use bits: 16 (or skip) to keep other layers unquantized"
                )
        for fields, (methods, who) in METHOD_OPTIONS.items():
            for field in fields:
                if self.method not in methods and field in self.model_fields_set:
                    raise ValueError(f"{field}: only {who} take this option, not {self.method}")
        if self.method == "gguf":
            self._check_gguf()
        if self.method == "auto":
            self._check_auto()
        if self.from_ is not None and self.method not in ("onnx-int4", "gguf"):
            raise ValueError(f"from: only onnx-int4 and gguf can carry an earlier variant's weights, not {self.method}")
        if self.n_grid != 20 and not self.method.startswith("awq"):
            raise ValueError(f"n_grid: only awq and awq-gptq search a grid, not {self.method}")
        if "awq_mappings" in self.model_fields_set and self.method != "awq":
            raise ValueError(f"awq_mappings: only awq takes this option, not {self.method} (awq-gptq always uses phi)")
        return self

    def candidate_settings(self) -> dict[str, tuple[int, int] | None]:
        """{candidate: (bits, group size)}, None for keep (none for a GGUF auto variant: its candidates are types)."""
        if self.writes_gguf:
            return {}
        settings = {}
        for name in self.candidates:
            match = CANDIDATE.match(name)
            settings[name] = None if name == "keep" else (int(match["bits"]), int(match["group"]))
        return settings

    def _check_auto(self) -> None:
        if self.budget is None:
            raise ValueError("budget: an auto variant needs budget: {max_kld: X} (the KLD its plan must meet) "
                             "and/or {max_bits_per_weight: B} (the size it must fit)")
        for field in ("bits", "group_size", "overrides", "preset"):
            if field in self.model_fields_set:
                raise ValueError(f"{field}: an auto variant chooses each layer's setting from its candidates; it takes no {field}")
        if "ignore" not in self.model_fields_set:  # the head is a candidate like every linear layer
            object.__setattr__(self, "ignore", [])
        if len(self.formats) > 1:
            raise ValueError("formats: an auto variant writes one format; give each format an auto variant of its own")
        if "accuracy_level" in self.model_fields_set and self.formats != ["onnx"]:
            raise ValueError("accuracy_level: only an auto variant writing onnx (MatMulNBits' compute type) takes it")
        if self.formats == ["gguf"]:
            self._check_gguf_auto()
            return
        if self.formats == ["onnx"]:
            self._check_onnx_auto()
        if self.base not in AUTO_BASES:
            why = " (each setting's AWQ scales are folded into the norms, so layers of different settings do not mix)" \
                if self.base.startswith("awq") else ""
            raise ValueError(f"base: {self.base!r} cannot be an auto variant's base{why}; use one of {', '.join(AUTO_BASES)}")
        for index, name in enumerate(self.candidates):
            match = CANDIDATE.match(name)
            if not match:
                raise ValueError(f"candidates[{index}]: {name!r} is not <bits>g<group> (bits 2, 3, 4, 5, 6 or 8; e.g. 4g128) or keep")
            if name != "keep" and (problem := _group_problem(int(match["group"]))):
                raise ValueError(f"candidates[{index}]: group size {match['group']} {problem}")
        if len(set(self.candidates) - {"keep"}) < 1 or len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates: list each setting once, at least one besides keep")

    def _check_onnx_auto(self) -> None:
        if "candidates" not in self.model_fields_set:
            object.__setattr__(self, "candidates", list(ONNX_AUTO_CANDIDATES))
        for index, name in enumerate(self.candidates):
            match = CANDIDATE.match(name)
            if match and name != "keep" and (int(match["bits"]) not in (2, 4, 8) or int(match["group"]) not in ONNX_BLOCKS):
                raise ValueError(f"candidates[{index}]: onnxruntime's MatMulNBits holds 2-, 4- or 8-bit weights in blocks of "
                                 f"{', '.join(map(str, ONNX_BLOCKS))}, not {name}")
        if any(pattern not in ("lm_head", "re:^lm_head$") for pattern in self.ignore):
            raise ValueError("ignore: an auto variant writing onnx quantizes every decoder layer (the ONNX builder reads "
                             "a quantized folder only whole); only lm_head may be ignored")

    def _check_gguf_auto(self) -> None:
        if "base" in self.model_fields_set:
            raise ValueError("base: a GGUF auto variant's candidates are llama-quantize's own types; it takes no base")
        if "ignore" in self.model_fields_set:
            raise ValueError("ignore: a GGUF auto variant chooses every tensor's type (keep among its candidates)")
        if "candidates" not in self.model_fields_set:
            object.__setattr__(self, "candidates", list(GGUF_AUTO_CANDIDATES))
        for index, name in enumerate(self.candidates):
            if name not in (*GGUF_TENSOR_TYPES, "keep"):
                raise ValueError(f"candidates[{index}]: {name!r} is not a llama.cpp tensor type a GGUF auto variant can "
                                 f"choose; known: {', '.join(GGUF_TENSOR_TYPES)} or keep")
        if len(set(self.candidates) - {"keep"}) < 1 or len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates: list each type once, at least one besides keep")

    def _check_gguf(self) -> None:
        for field in ("bits", "group_size", "symmetric"):
            if field in self.model_fields_set:
                raise ValueError(f"{field}: a gguf variant's precision is its quant: (one of llama-quantize's types), not {field}")
        if self.from_ is not None:
            for field in ("quant", "imatrix", "ignore", "overrides", "preset"):
                if field in self.model_fields_set:
                    raise ValueError(f"{field}: a gguf variant with from: writes that variant's integer weights and its "
                                     "float layers as they are; it takes no {field}".replace("{field}", field))
            return
        if self.quant not in GGUF_TYPES:
            raise ValueError(f"quant: {self.quant!r} is not a llama-quantize type; known: {', '.join(GGUF_TYPES)}")
        if self.quant in GGUF_NEEDS_IMATRIX and self.imatrix is False:
            raise ValueError(f"imatrix: llama-quantize refuses {self.quant} without an importance matrix")


class Recipe(Strict):
    name: str = Field(pattern=f"^{NAME}$")
    model: str
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    targets: dict[str, Target] = {"cpu": Target(device="cpu", required=True)}
    gates: Gates = Gates()
    variants: list[Variant]

    @model_validator(mode="before")
    @classmethod
    def expand_sweeps(cls, data):
        if isinstance(data, dict) and isinstance(data.get("variants"), list):
            expanded = []
            for index, variant in enumerate(data["variants"]):
                try:
                    expanded += expand_matrix(variant) if isinstance(variant, dict) else [variant]
                except ValueError as error:
                    raise LocatedError(("variants", index, "matrix"), str(error).removeprefix("matrix: ")) from None
            data = {**data, "variants": expanded}
        return data

    @field_validator("targets")
    @classmethod
    def known_targets(cls, value: dict[str, Target]) -> dict[str, Target]:
        placed = {}
        for name, target in value.items():
            if not re.fullmatch(NAME, name):
                raise ValueError(f"target name {name!r}: use letters, digits, '.', '_' and '-'")
            if target.device is None and name not in TARGETS:
                raise ValueError(f"{name}: say which device it is, device: cpu or device: cuda (only the names "
                                 f"{' and '.join(TARGETS)} imply theirs)")
            placed[name] = target if target.device else target.model_copy(update={"device": name})
        if not any(target.device == "cpu" for target in placed.values()):
            raise ValueError("list a target with device: cpu (cpu: {} will do): every artifact is verified on a CPU")
        return placed

    def device(self, target: str) -> str:
        """The device of the target named `target`: cpu or cuda."""
        return self.targets[target].device

    def devices(self) -> list[str]:
        """The devices the targets name, in the order they are first listed."""
        return list(dict.fromkeys(self.device(name) for name in self.targets))

    @field_validator("variants")
    @classmethod
    def unique_names(cls, value: list[Variant]) -> list[Variant]:
        if not value:
            raise ValueError("list at least one variant")
        seen = set()
        for variant in value:
            if variant.name in seen:
                raise ValueError(f"variant name {variant.name!r} is used twice")
            seen.add(variant.name)
        return value

    @model_validator(mode="after")
    def sources_exist(self) -> Recipe:
        earlier: dict[str, Variant] = {}
        for index, variant in enumerate(self.variants):
            if variant.from_ is not None:
                source = earlier.get(variant.from_)
                where = ("variants", index, "from")
                if source is None:
                    raise LocatedError(where, f"no earlier variant is named {variant.from_!r}")
                if source.quantizes_head and variant.method == "gguf":
                    raise LocatedError(where, f"{variant.from_!r} quantizes lm_head, and only a float head is carried into "
                                              "GGUF; give it ignore: [lm_head]")
                if variant.method == "gguf":
                    if reason := _gguf_source_problem(source):
                        raise LocatedError(where, f"{variant.from_!r} cannot go into GGUF blocks exactly: {reason}")
                    earlier[variant.name] = variant
                    continue
                if source.method not in CALIBRATED_METHODS or source.bits != 4:
                    raise LocatedError(where, f"{variant.from_!r} is {source.method} at {source.bits} bits; "
                                              "only 4-bit gptq, awq or rtn weights can go into an ONNX int4 graph")
                if source.quantizes_head and variant.asks_float_head:
                    raise LocatedError(where, f"{variant.from_!r} quantizes lm_head and its ONNX graph carries that head; "
                                              "drop ignore: [lm_head] here, or give the source ignore: [lm_head]")
            earlier[variant.name] = variant
        return self

    def gates_for(self, variant: Variant) -> Gates:
        return self.gates.merged(variant.gates)

    def digest(self) -> str:
        """sha256 of the resolved recipe, so a manifest names exactly what produced it."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True).encode()).hexdigest()


def _gguf_source_problem(source: Variant) -> str | None:
    """Why a variant's integer weights cannot be written as exact GGUF blocks, or None."""
    from compress.export.gguf_blocks import why_not_exact

    if not source.calibrated:
        return f"it is a {source.method} variant; only gptq, awq, awq-gptq and rtn variants have integer weights to carry"
    if reason := why_not_exact(source.bits, source.group_size, source.symmetric):
        return reason
    if any(rule.bits == 8 for rule in source.layer_overrides()) and why_not_exact(8, source.group_size, source.symmetric):
        return "its 8-bit layers are asymmetric, and Q8_0 has no zero point"
    return None


# Canonical layer names of a Phi-3 block, to tell statically what an override's pattern reaches.
_PHI3_LAYER_NAMES = (
    "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj", "model.embed_tokens",
)


def _only_lm_head(pattern: str) -> bool:
    return bool(re.search(pattern, "lm_head")) and not any(re.search(pattern, name) for name in _PHI3_LAYER_NAMES)


def _line_of(node: yaml.Node, location: tuple) -> int:
    """1-based line of the deepest YAML node along a pydantic error location."""
    line = node.start_mark.line + 1
    for key in location:
        if isinstance(node, yaml.MappingNode):
            pair = next(((name, value) for name, value in node.value if name.value == key), None)
            if pair is None:
                break
            name, node = pair
            # A scalar is reported on its own line; a block mapping or list where its key is.
            scalar = isinstance(node, yaml.ScalarNode)
            line = (node if scalar else name).start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field_path(location: tuple) -> str:
    path = ""
    for key in location:
        path += f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
    return path


def _message(error: dict) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required but missing"
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    return message[0].lower() + message[1:]


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate recipe text; raise RecipeError with `source:line: field: problem` on the first mistake."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict) or node is None:
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with name, model and variants")
    try:
        return Recipe.model_validate(data)
    except LocatedError as error:
        raise RecipeError(f"{source}:{_line_of(node, error.location)}: {_field_path(error.location)}: {error.message}") from None
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(first["loc"])
        line = _line_of(node, location)
        field = _field_path(location) or "recipe"
        raise RecipeError(f"{source}:{line}: {field}: {_message(first)}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    return parse_recipe(text, str(path))
