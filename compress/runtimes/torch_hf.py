"""Run a model folder in plain transformers: the runtime of the baseline and of compressed-tensors artifacts.

Only what a user of the artifact would do: `AutoModelForCausalLM.from_pretrained(folder)`, never
trust_remote_code, local files only. The device comes from verify/targets.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from compress.verify.accuracy import BLOCK_ROWS


class TorchRuntime:
    name = "transformers"

    def __init__(self, folder: Path, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        # fp32 on the CPU (bf16 matmuls there are slow and not what a CPU user runs); stored dtype on CUDA.
        dtype = torch.float32 if device == "cpu" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, trust_remote_code=False
        ).to(device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)

    def window_logprobs(self, windows: np.ndarray) -> Iterator[Iterator[np.ndarray]]:
        """Next-token log-probs of each window [seq_len]: blocks of BLOCK_ROWS rows [rows, V] float32, in order."""
        for window in windows:
            with torch.inference_mode():
                logits = self.model(torch.as_tensor(window[None], device=self.device)).logits[0, :-1]
            yield (torch.log_softmax(block.float(), dim=-1).cpu().numpy() for block in logits.split(BLOCK_ROWS))

    def timed_generation(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        """Greedy decode with the KV cache. -> (prefill seconds, seconds from first to last new token, tokens).

        Prefill ends when the first new token's logits exist; tokenisation is outside the timed region.
        """
        from transformers import DynamicCache

        with torch.inference_mode():
            ids = torch.as_tensor(prompt[None], device=self.device)
            cache = DynamicCache(config=self.model.config)
            self._sync()
            start = time.perf_counter()
            logits = self.model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            self._sync()
            first = time.perf_counter()
            generated = [int(token)]
            for _ in range(new_tokens - 1):
                logits = self.model(token, past_key_values=cache, use_cache=True).logits[:, -1]
                token = logits.argmax(-1, keepdim=True)
                generated.append(int(token))  # int() waits for the device, as sampling would
            self._sync()
            last = time.perf_counter()
        return first - start, last - first, generated

    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of `prompt`, ending with the first stop token or after max_new_tokens."""
        from transformers import DynamicCache

        tokens: list[int] = []
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            ids = torch.as_tensor([prompt], device=self.device)
            while len(tokens) < max_new_tokens:
                token = self.model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
                if tokens[-1] in stop_ids:
                    break
                ids = token
        return tokens

    def peak_device_memory_mb(self) -> float | None:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        return None

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
