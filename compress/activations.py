"""The hidden states between two decoder layers for every window: in memory while they fit the budget,
else in a file of the run folder, read and written a chunk of windows at a time.

A file is read with plain reads (not a memory map), so the pages it occupies are the kernel's cache and
never count in the process's resident memory; only the chunk being worked on does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

CHUNK_BYTES = 256 * 2**20  # at most this much of a spilled store is read at once


class Activations:
    """float32 [windows, seq_len, hidden] kept in memory, or in `path` when `spill` is set."""

    def __init__(self, windows: int, seq_len: int, hidden: int, spill: Path | None = None):
        self.shape = (windows, seq_len, hidden)
        self.path = spill
        self._row_bytes = seq_len * hidden * 4
        if spill is None:
            self._memory = torch.empty(self.shape, dtype=torch.float32)
        else:
            spill.parent.mkdir(parents=True, exist_ok=True)
            with spill.open("wb") as handle:
                handle.truncate(windows * self._row_bytes)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    @property
    def in_memory(self) -> bool:
        return self.path is None

    def chunks(self, limit_bytes: int = CHUNK_BYTES):
        """(start, stop) ranges of windows that together hold at most `limit_bytes` (at least one window)."""
        step = max(1, limit_bytes // self._row_bytes)
        for start in range(0, self.shape[0], step):
            yield start, min(start + step, self.shape[0])

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.path is None:
            return self._memory[start:stop]
        with self.path.open("rb") as handle:
            handle.seek(start * self._row_bytes)
            data = np.frombuffer(handle.read((stop - start) * self._row_bytes), dtype=np.float32)
        return torch.from_numpy(data.copy()).view(stop - start, *self.shape[1:])

    def write(self, start: int, values: torch.Tensor) -> None:
        values = values.detach().to(torch.float32).contiguous()
        if self.path is None:
            self._memory[start:start + len(values)] = values
            return
        with self.path.open("r+b") as handle:
            handle.seek(start * self._row_bytes)
            handle.write(values.numpy().tobytes())

    def delete(self) -> None:
        if self.path is not None and self.path.exists():
            os.unlink(self.path)
        self._memory = None


def allocate(windows: int, seq_len: int, hidden: int, budget_bytes: int | None, spill_dir: Path | None,
             name: str) -> Activations:
    """In memory when two stores (a layer's inputs and outputs) fit `budget_bytes`, else spilled to disk."""
    needed = 2 * windows * seq_len * hidden * 4
    if budget_bytes is None or spill_dir is None or needed <= budget_bytes:
        return Activations(windows, seq_len, hidden)
    return Activations(windows, seq_len, hidden, spill_dir / f"{name}.f32")
