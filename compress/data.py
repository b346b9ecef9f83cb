"""Text sets: the built-in CPython documentation splits and user files, cut into token windows.

Evaluation windows follow ../shared/METRICS.md: documents are tokenized with the baseline's tokenizer,
joined with the EOS token, and the first `windows` non-overlapping windows of `seq_len` tokens are used.
Calibration samples are drawn from the same kind of token stream with a seeded generator.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

BUILTIN_PREFIX = "builtin:"
# Characters of text each built-in held-out split gets; the rest of the topics train the embedded model.
HELD_OUT_CHARS = {"eval": 70_000, "calib": 60_000}


class DataError(ValueError):
    """A text set that cannot be used; the message is one sentence for the user."""


def pydoc_splits() -> dict[str, list[str]]:
    """CPython's pydoc topics split by document into disjoint train / calib / eval sets.

    The order is fixed by a hash of each topic's name, so the split does not depend on dict order; the
    evaluation and calibration sets take whole documents until they reach HELD_OUT_CHARS.
    """
    from pydoc_data.topics import topics

    names = sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    splits: dict[str, list[str]] = {"eval": [], "calib": [], "train": []}
    filled = {"eval": 0, "calib": 0}
    for name in names:
        text = topics[name].strip()
        part = next((p for p in ("eval", "calib") if filled[p] < HELD_OUT_CHARS[p]), "train")
        splits[part].append(text)
        if part in filled:
            filled[part] += len(text)
    return splits


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of CPython's standard library (modules, classes, functions), read with ast, never imported.

    Extra training text for the embedded model: pydoc's topics alone (~80k tokens) are memorised by a
    1.5M-parameter model long before it generalises. Held-out sets stay pydoc topics, so they are disjoint.
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip", "__pycache__"}
    documents = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in skipped or part.startswith("test") for part in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) >= min_chars:
                    documents.append(docstring)
    return documents


BUILTIN_SETS = {"pydoc-calib": "calib", "pydoc-eval": "eval", "pydoc-train": "train"}


def load_documents(spec: str) -> list[str]:
    """Documents of a text set: `builtin:NAME`, a `.txt` file (blank-line separated) or `.jsonl` (`text`)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_SETS:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS)
            raise DataError(f"unknown built-in data set {spec!r}; known: {known}")
        return pydoc_splits()[BUILTIN_SETS[name]]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data set file {spec} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"data set file {spec} is not UTF-8 text (byte {error.start})") from None
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                documents.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{spec}:{number}: each line must be a JSON object with a 'text' field") from None
    else:
        documents = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not documents:
        raise DataError(f"data set file {spec} holds no text")
    return documents


def token_stream(documents: list[str], tokenizer) -> np.ndarray:
    """All documents tokenized and joined with the EOS token between them. -> [tokens] int64"""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for index, document in enumerate(documents):
        if index:
            ids.append(eos)
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def evaluation_windows(stream: np.ndarray, seq_len: int, windows: int, spec: str = "") -> np.ndarray:
    """The first `windows` non-overlapping windows of `seq_len` tokens. -> [windows, seq_len]"""
    available = len(stream) // seq_len
    if available < windows:
        raise DataError(
            f"evaluation set {spec} has {len(stream)} tokens: {available} windows of {seq_len}, "
            f"fewer than the {windows} asked for"
        )
    return stream[: windows * seq_len].reshape(windows, seq_len)


def calibration_samples(stream: np.ndarray, seq_len: int, samples: int, seed: int, spec: str = "") -> np.ndarray:
    """`samples` windows of `seq_len` tokens at seeded random offsets. -> [samples, seq_len]"""
    if len(stream) < seq_len:
        raise DataError(f"calibration set {spec} has {len(stream)} tokens, shorter than one window of {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq_len + 1, size=samples)
    return np.stack([stream[start : start + seq_len] for start in starts])


def selection_windows(stream: np.ndarray, seq_len: int, count: int, calibration_samples_: int, seed: int) -> np.ndarray:
    """`count` windows of the calibration stream that overlap none of the calibration samples (the same seeded
    draw as calibration_samples), evenly spread over what is left: text calibration never fitted, for choosing
    a mixed-precision plan. -> [count, seq_len]"""
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(stream) + 1, dtype=np.int64)
    for start in rng.integers(0, len(stream) - seq_len + 1, size=calibration_samples_):
        taken[start] += 1
        taken[start + seq_len] -= 1
    free = np.cumsum(taken)[: len(stream)] == 0
    starts, position = [], 0
    while position + seq_len <= len(stream):  # non-overlapping free windows, left to right
        blocked = np.flatnonzero(~free[position:position + seq_len])
        if blocked.size:
            position += int(blocked[-1]) + 1
            continue
        starts.append(position)
        position += seq_len
    if len(starts) < count:
        raise DataError(f"the calibration set leaves {len(starts)} windows of {seq_len} tokens outside the calibration "
                        f"samples, fewer than the {count} a selection slice needs; use more text or fewer samples")
    chosen = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, count).round()]
    return np.stack([stream[start:start + seq_len] for start in chosen])


def array_hash(array: np.ndarray) -> str:
    """sha256 of an array's bytes, to name exactly which tokens were used."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def chat_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as a user turn in the model's chat template (plain text if it has none), as token ids."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template else prompt
        for prompt in prompts
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def stop_token_ids(model_folder: Path, tokenizer) -> list[int]:
    """Tokens that end a reply: generation_config's eos_token_id(s) and the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_file = model_folder / "generation_config.json"
    if config_file.is_file():
        eos = json.loads(config_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)
