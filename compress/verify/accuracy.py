"""Accuracy figures from log-probabilities, as ../shared/METRICS.md defines them. Pure numpy, no I/O.

Shapes: W windows, T scored positions per window (seq_len - 1), K reference tokens kept, V vocabulary.
Runtimes give a window's log-probs a block of rows at a time (BLOCK_ROWS positions, [rows, V]), so no
[T, V] array of a 200k vocabulary (0.8 GB at 1024 positions) is ever held whole.
The baseline is summarised once as a `Reference` (its top-K log-probabilities per position plus what
perplexity, top-1 and delta-p need); every artifact is then scored against it from its own log-probs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 128  # positions per block of a window's log-probs, as every runtime yields them


@dataclass(frozen=True)
class Reference:
    top_ids: np.ndarray  # [W, T, K] int32: baseline's K most likely tokens, most likely first
    top_logprobs: np.ndarray  # [W, T, K] float32: their log-probabilities
    target_logprobs: np.ndarray  # [W, T] float32: log p_base(correct next token)

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def window(self, index: int) -> Reference:
        """The reference of one window: arrays [T, ...]."""
        return Reference(self.top_ids[index], self.top_logprobs[index], self.target_logprobs[index])

    def rows(self, start: int, stop: int) -> Reference:
        """Positions start:stop of a window's reference."""
        return Reference(self.top_ids[start:stop], self.top_logprobs[start:stop], self.target_logprobs[start:stop])

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"top_ids": self.top_ids, "top_logprobs": self.top_logprobs, "target_logprobs": self.target_logprobs}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [..., V] float64, stable."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def make_reference(logprobs: np.ndarray, targets: np.ndarray, k: int) -> Reference:
    """Summarise baseline log-probs [W, T, V] for next tokens targets [W, T]."""
    k = min(k, logprobs.shape[-1])
    top_ids = np.argsort(-logprobs, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logprobs, top_ids, axis=-1)
    target = np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return Reference(top_ids.astype(np.int32), top.astype(np.float32), target.astype(np.float32))


def _join_rows(blocks: Iterable[np.ndarray], per_block: Callable[[int, int, np.ndarray], dict]) -> dict[str, np.ndarray]:
    """per_block(start, stop, block) for each block of one window's rows, in order; its arrays joined."""
    parts, start = [], 0
    for block in blocks:
        parts.append(per_block(start, start + len(block), block))
        start += len(block)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def window_reference(blocks: Iterable[np.ndarray], targets: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """make_reference's arrays for one window whose log-probs come in blocks of rows [rows, V]."""
    return _join_rows(blocks, lambda start, stop, block: make_reference(block, targets[start:stop], k).as_arrays())


def window_figures(reference: Reference, blocks: Iterable[np.ndarray], targets: np.ndarray) -> dict[str, np.ndarray]:
    """position_figures of one window whose log-probs come in blocks of rows [rows, V] (reference: [T, ...])."""
    return _join_rows(blocks, lambda start, stop, block: position_figures(reference.rows(start, stop), block, targets[start:stop]))


def _log1mexp(log_mass: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf."""
    x = np.minimum(log_mass, -1e-12)
    return np.where(x > -0.693, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def kld_topk(reference: Reference, logprobs: np.ndarray) -> np.ndarray:
    """KL(base || artifact) per position [W, T] over the base's top-K tokens plus one bucket for the rest.

    Merging the tail into one bin can only lower KL, so with K < V this is a lower bound; with K = V it
    is exact (the bucket is empty).
    """
    base = reference.top_logprobs.astype(np.float64)
    art = np.take_along_axis(logprobs, reference.top_ids.astype(np.int64), axis=-1).astype(np.float64)
    p_base = np.exp(base)
    kl = (p_base * (base - art)).sum(axis=-1)
    base_rest = _log1mexp(np.logaddexp.reduce(base, axis=-1))
    art_rest = _log1mexp(np.logaddexp.reduce(art, axis=-1))
    rest_mass = np.exp(base_rest)
    tail = np.where(rest_mass > 1e-12, rest_mass * (base_rest - art_rest), 0.0)
    return np.maximum(kl + tail, 0.0)


def standard_error(samples: np.ndarray) -> float:
    """std / sqrt(n) of per-window samples; NaN with fewer than two windows."""
    return float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def window_stats(per_position: np.ndarray) -> tuple[float, float]:
    """Mean over all positions and its standard error over windows (each window's mean is one sample)."""
    return float(per_position.mean()), standard_error(per_position.mean(axis=-1))


def perplexity(target_logprobs: np.ndarray) -> tuple[float, float]:
    """exp(mean NLL) [W, T] and the standard error of the mean NLL (nats) over windows."""
    nll, nll_se = window_stats(-target_logprobs.astype(np.float64))
    return float(np.exp(nll)), nll_se


def position_figures(reference: Reference, logprobs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position figures of artifact log-probs [..., T, V] against the matching slice of the reference.

    Works on one window at a time as well as on all of them, so a large vocabulary never needs every
    window's full log-probs in memory at once.
    """
    art_target = np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0].astype(np.float64)
    return {
        "target_logprobs": art_target,
        "kld": kld_topk(reference, logprobs),
        "agree": (logprobs.argmax(axis=-1) == reference.top_ids[..., 0]).astype(np.float64),
        "delta_p": np.exp(art_target) - np.exp(reference.target_logprobs.astype(np.float64)),
    }


def stack_windows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-window figures (window_reference, window_figures) stacked into [W, ...] arrays, key by key."""
    return {key: np.stack([part[key] for part in parts]) for key in parts[0]}


def summarise(reference: Reference, figures: dict[str, np.ndarray]) -> dict[str, float]:
    """Every accuracy figure from per-position figures [W, T] (see position_figures)."""
    ppl, nll_se = perplexity(figures["target_logprobs"])
    base_ppl, _ = perplexity(reference.target_logprobs)
    kld, kld_se = window_stats(figures["kld"])
    top1, top1_se = window_stats(figures["agree"])
    delta_p = figures["delta_p"]
    rms_per_window = np.sqrt((delta_p**2).mean(axis=-1))
    return {
        "ppl": ppl,
        "nll_se": nll_se,
        "ppl_ratio": ppl / base_ppl,
        "kld": kld,
        "kld_se": kld_se,
        "kld_top_k": float(reference.k),
        "top1": top1,
        "top1_se": top1_se,
        "delta_p_rms": float(np.sqrt((delta_p**2).mean())),
        "delta_p_rms_se": standard_error(rms_per_window),
        "delta_p_p99": float(np.quantile(np.abs(delta_p), 0.99)),
    }


def score(reference: Reference, logprobs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Every accuracy figure of an artifact's log-probs [W, T, V] against the baseline reference."""
    return summarise(reference, position_figures(reference, logprobs, targets))
