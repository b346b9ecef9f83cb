"""Run an ONNX GenAI folder in onnxruntime-genai: the runtime ONNX artifacts ship for.

Full-sequence logits come from `Generator.get_output("logits")` after `append_tokens`, so perplexity and
KLD are computed on the ONNX artifact itself. The execution provider comes from verify/targets.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from compress.verify.accuracy import BLOCK_ROWS

PROVIDERS = {"cpu": None, "cuda": "cuda"}
CHUNK = BLOCK_ROWS  # tokens per append_tokens while scoring a window


def session_threads(threads: int) -> dict:
    """genai_config overlay giving the decoder session `threads` intra-op threads, as torch gets."""
    return {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}


class GenaiRuntime:
    name = "onnxruntime-genai"

    def __init__(self, folder: Path, device: str, threads: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()  # the folder's genai_config may name a provider; the target decides
        if threads:  # else onnxruntime's own default: half the logical CPUs (1 on a 2-vCPU VM, half speed)
            config.overlay(json.dumps(session_threads(threads)))
        if PROVIDERS[device]:
            config.append_provider(PROVIDERS[device])
        self.model = og.Model(config)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def window_logprobs(self, windows: np.ndarray) -> Iterator[Iterator[np.ndarray]]:
        """Next-token log-probs of each window [seq_len]: blocks of CHUNK rows [rows, V] float32, in order.

        The window goes in CHUNK tokens at a time (each append runs on the cache the earlier ones left), so
        onnxruntime's logits output, genai's copy of it and numpy's are a chunk's, not the window's (at
        Phi-4-mini's vocabulary a 512-token window's logits are 0.4 GB), and each is scored and let go
        before the next is appended."""
        for window in windows:
            yield self._window_blocks(window)

    def _window_blocks(self, window: np.ndarray) -> Iterator[np.ndarray]:
        generator = self._generator(len(window) + 1)
        for start in range(0, len(window) - 1, CHUNK):
            generator.append_tokens(window[None, start:start + CHUNK].astype(np.int32))
            # get_output hands over a fresh float32 array of its own: normalised in place, no further copy
            block = np.asarray(generator.get_output("logits"), dtype=np.float32)[0, : len(window) - 1 - start]
            block -= block.max(axis=-1, keepdims=True)
            block -= np.log(np.exp(block).sum(axis=-1, keepdims=True))
            yield block

    def timed_generation(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        """Greedy decode. -> (prefill seconds, seconds from first to last new token, tokens).

        append_tokens runs the prompt; each generate_next_token picks a token from the logits it has, then
        runs the model on that token at the next call. So the first pick closes prefill, and the remaining
        new_tokens - 1 calls are the decode steps, the same count of forward passes as the torch runtime.
        """
        generator = self._generator(len(prompt) + new_tokens)
        start = time.perf_counter()
        generator.append_tokens(prompt[None].astype(np.int32))
        generator.generate_next_token()
        generated = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
            generated.append(int(generator.get_next_tokens()[0]))
        last = time.perf_counter()
        return first - start, last - first, generated

    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of `prompt`, ending with the first stop token or after max_new_tokens."""
        generator = self._generator(len(prompt) + max_new_tokens)
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        tokens: list[int] = []
        while len(tokens) < max_new_tokens and not (tokens and tokens[-1] in stop_ids):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if generator.is_done():
                break
        return tokens

    def peak_device_memory_mb(self) -> float | None:
        return None  # onnxruntime-genai does not report it; peak RSS covers the CPU
