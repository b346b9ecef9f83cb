"""onnxruntime-genai: scoring a window in chunks gives the same log-probs as one append of the whole window;
preflight's prediction of a graph's weights matches the graph the builder writes."""

from __future__ import annotations

import numpy as np
import pytest

from compress import memory
from compress.export.onnx_genai import PLAIN_BUILDER, run_builder
from compress.model import inspect_model, resolve_model
from compress.runtimes import ort_genai
from compress.runtimes.ort_genai import GenaiRuntime
from compress.verify.size import onnx_weight_bytes


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory):
    work = tmp_path_factory.mktemp("ort-genai")
    return run_builder(resolve_model("builtin:tiny-phi4-mini"), work / "int4", "int4", "cpu",
                       {"accuracy_level": "1", "hf_token": "false", "block_size": "32", "is_symmetric": "true"}, work / "cache", work / "builder.log", PLAIN_BUILDER)


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
    blocks = [list(window) for window in runtime.window_logprobs(windows)]
    assert [[len(block) for block in window] for window in blocks] == [{97: [96], 300: [128, 128, 43]}[length]] * 2
    chunked = [np.concatenate(window) for window in blocks]
    assert [part.shape for part in chunked] == [(length - 1, 4096)] * 2
    for window, ours in zip(windows, chunked, strict=True):
        reference = _whole_window(runtime, window)
        assert np.abs(ours - reference).max() < 1e-4
        assert np.allclose(np.exp(ours).sum(axis=-1), 1.0, atol=1e-4)


def test_preflight_predicts_the_graphs_weights(int4_folder):
    """The builder rounded every linear layer, the tied head included, to int4 in blocks of 32: what preflight
    predicts from the config alone is what the graph holds, by how onnxruntime holds it."""
    shapes = memory.Shapes.from_info(inspect_model("builtin:tiny-phi4-mini"))
    assert shapes.tied
    graph = onnx_weight_bytes(int4_folder)
    predicted = memory.predicted_onnx_weights(shapes, 4, 32, True, 4)
    assert graph.shared > 0 and predicted.shared > 0  # the head's weights also feed the embedding's gather
    for field in ("prepacked", "shared"):
        assert abs(getattr(predicted, field) / getattr(graph, field) - 1) < 0.03, field
    # no float embedding table: what else the graph holds are norms and rotary caches, small at any width
    assert predicted.other == 0 and graph.other < graph.prepacked / 2
