"""Run a GGUF file in llama.cpp (its Python bindings over the library built by llama_cpp_tools): the runtime
GGUF artifacts ship for, in llama.cpp itself, Ollama and LM Studio.

Log-probs come from llama.cpp's own logits of every position (`logits_all`); generation and timing ask for
the last position's logits only, as llama.cpp's own tools do, so prefill does not pay for a head over every
prompt token. llama.cpp's CPU kernels quantize activations to 8 bits for quantized weights: that is the
runtime's doing, and it is in every figure measured here.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from compress.runtimes import llama_cpp_tools
from compress.verify.accuracy import BLOCK_ROWS


def gguf_file(folder: Path) -> Path:
    """The one .gguf file of an artifact folder (or the file itself)."""
    folder = Path(folder)
    if folder.suffix == ".gguf":
        return folder
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"{folder} holds {len(files)} .gguf files; a GGUF artifact folder holds exactly one")
    return files[0]


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(self, folder: Path, device: str, threads: int | None = None, context_tokens: int = 512):
        if device != "cpu":
            raise ValueError("llama.cpp is verified on the CPU here (its CUDA build is not made by compress)")
        llama_cpp_tools.require()
        os.environ.update(llama_cpp_tools.environment(threads))  # before the bindings load the library
        from llama_cpp import Llama

        threads = threads or os.cpu_count() or 1
        self.llm = Llama(model_path=str(gguf_file(folder)), n_ctx=context_tokens, n_batch=min(context_tokens, 512),
                         n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
        self.vocab = self.llm.n_vocab()
        atexit.register(self.llm.close)  # before interpreter shutdown, when the bindings' globals are gone

    def window_logprobs(self, windows: np.ndarray) -> Iterator[Iterator[np.ndarray]]:
        """Next-token log-probs of each window [seq_len]: blocks of BLOCK_ROWS rows [rows, V] float32, in order."""
        for window in windows:
            yield self._window_blocks(window)

    def _window_blocks(self, window: np.ndarray) -> Iterator[np.ndarray]:
        self.llm.reset()
        self.llm.eval([int(token) for token in window])
        for start in range(0, len(window) - 1, BLOCK_ROWS):
            block = np.array(self.llm.scores[start:min(start + BLOCK_ROWS, len(window) - 1)], dtype=np.float32)
            block -= block.max(axis=-1, keepdims=True)
            block -= np.log(np.exp(block).sum(axis=-1, keepdims=True))
            yield block

    @contextmanager
    def _last_logits_only(self):
        """Evaluate without copying every position's logits (the bindings read this flag at each eval)."""
        self.llm._logits_all = False
        try:
            yield
        finally:
            self.llm._logits_all = True

    def _next_token(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(np.argmax(logits))

    def timed_generation(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        """Greedy decode. -> (prefill seconds, seconds from first to last new token, tokens): the prompt's pass
        and the first pick, then new_tokens - 1 single-token passes, as the other runtimes count them."""
        with self._last_logits_only():
            self.llm.reset()
            start = time.perf_counter()
            self.llm.eval([int(token) for token in prompt])
            generated = [self._next_token()]
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                self.llm.eval([generated[-1]])
                generated.append(self._next_token())
            last = time.perf_counter()
        return first - start, last - first, generated

    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of `prompt`, ending with the first stop token or after max_new_tokens."""
        tokens: list[int] = []
        with self._last_logits_only():
            self.llm.reset()
            self.llm.eval([int(token) for token in prompt])
            while len(tokens) < max_new_tokens:
                tokens.append(self._next_token())
                if tokens[-1] in stop_ids or len(tokens) == max_new_tokens:
                    break
                self.llm.eval([tokens[-1]])
        return tokens

    def peak_device_memory_mb(self) -> float | None:
        return None  # the CPU only here; peak RSS covers it
