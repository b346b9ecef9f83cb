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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = ("gptq",)
FORMATS_BY_METHOD = {"gptq": ("compressed-tensors",)}
TARGETS = ("cpu", "cuda")
BITS = (2, 3, 4, 8)


class RecipeError(ValueError):
    """A recipe that cannot be used; str() is the one sentence the user sees."""


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


class Target(Strict):
    required: bool = False


class Gates(Strict):
    max_kld: float | None = Field(None, ge=0)
    min_top1: float | None = Field(None, ge=0, le=1)
    max_ppl_ratio: float | None = Field(None, gt=0)
    max_size_ratio: float | None = Field(None, gt=0)
    min_decode_speedup: float | None = Field(None, gt=0)

    def merged(self, override: Gates | None) -> Gates:
        """These gates with every field the override sets replacing ours."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_unset=True))


class Variant(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    method: str
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    ignore: list[str] = ["lm_head"]
    formats: list[str] = ["compressed-tensors"]
    dampening: float = Field(0.01, gt=0, lt=1)  # GPTQ: fraction of the Hessian's mean diagonal added
    gates: Gates | None = None

    @field_validator("method")
    @classmethod
    def known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)}")
        return value

    @field_validator("bits")
    @classmethod
    def known_bits(cls, value: int) -> int:
        if value not in BITS:
            raise ValueError(f"must be one of {', '.join(map(str, BITS))}")
        return value

    @field_validator("group_size")
    @classmethod
    def power_of_two(cls, value: int) -> int:
        if value != -1 and (value < 8 or value & (value - 1)):
            raise ValueError("must be a power of two of at least 8, or -1 for one group per row")
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

    @model_validator(mode="after")
    def formats_fit_method(self) -> Variant:
        if not self.formats:
            raise ValueError("formats: list at least one format")
        allowed = FORMATS_BY_METHOD[self.method]
        for index, fmt in enumerate(self.formats):
            if fmt not in allowed:
                raise ValueError(f"formats[{index}]: method {self.method} cannot write {fmt!r}; it writes {', '.join(allowed)}")
        return self


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    targets: dict[str, Target] = {"cpu": Target(required=True)}
    gates: Gates = Gates()
    variants: list[Variant]

    @field_validator("targets")
    @classmethod
    def known_targets(cls, value: dict[str, Target]) -> dict[str, Target]:
        for name in value:
            if name not in TARGETS:
                raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
        if "cpu" not in value:
            raise ValueError("cpu must be listed: every artifact is verified on the CPU")
        return value

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

    def gates_for(self, variant: Variant) -> Gates:
        return self.gates.merged(variant.gates)

    def digest(self) -> str:
        """sha256 of the resolved recipe, so a manifest names exactly what produced it."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


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
