"""onnxruntime-genai scoring a window in chunks: the same log-probs as one append of the whole window."""

from __future__ import annotations

import numpy as np
import pytest

from compress.export.onnx_genai import PLAIN_BUILDER, run_builder
from compress.model import resolve_model
from compress.runtimes import ort_genai
from compress.runtimes.ort_genai import GenaiRuntime


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory):
    work = tmp_path_factory.mktemp("ort-genai")
    return run_builder(resolve_model("builtin:tiny-phi4-mini"), work / "int4", "int4", "cpu",
                       {"accuracy_level": "1", "hf_token": "false"}, work / "cache", work / "builder.log", PLAIN_BUILDER)


def _whole_window(runtime: GenaiRuntime, window: np.ndarray) -> np.ndarray:
    """The reference: the window in one append_tokens, log-softmax in float64."""
    generator = runtime._generator(len(window) + 1)
    generator.append_tokens(window[None].astype(np.int32))
    logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0, :-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("length", [97, 300])  # one partial chunk; two whole chunks and a partial one
def test_chunked_window_equals_one_append(int4_folder, monkeypatch, length):
    monkeypatch.setattr(ort_genai, "CHUNK", 128)
    runtime = GenaiRuntime(int4_folder, "cpu", threads=2)
    windows = np.random.default_rng(0).integers(0, 4096, size=(2, length))
    chunked = list(runtime.window_logprobs(windows))
    assert [part.shape for part in chunked] == [(length - 1, 4096)] * 2
    for window, ours in zip(windows, chunked, strict=True):
        reference = _whole_window(runtime, window)
        assert np.abs(ours - reference).max() < 1e-4
        assert np.allclose(np.exp(ours).sum(axis=-1), 1.0, atol=1e-4)
