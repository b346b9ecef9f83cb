"""Read tensors from a folder of safetensors files one at a time, whatever dtype they are stored in.

Every read of a checkpoint or artifact goes through here. safetensors' numpy reader has no bfloat16 (every
published Phi-4 checkpoint is bf16), so files are opened with the torch reader, which maps the file and
copies only the tensor asked for; `array` turns bf16 into float32 (numpy has no bf16) and keeps every other
dtype as stored.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

INDEX_FILE = "model.safetensors.index.json"


class TensorFolder:
    """Every tensor of `folder`'s *.safetensors files by name; files stay memory-mapped, nothing is read
    until asked for. Use as a context manager."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._stack = ExitStack()
        self.files = sorted(self.folder.glob("*.safetensors"))
        handles = [self._stack.enter_context(safe_open(str(file), framework="pt")) for file in self.files]
        self._where = {name: handle for handle in handles for name in handle.keys()}

    def __enter__(self) -> TensorFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str, dtype=None):
        """One tensor as torch, stored dtype unless `dtype` is given."""
        tensor = self._where[name].get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def array(self, name: str) -> np.ndarray:
        """One tensor as numpy: bf16 read as float32, every other dtype as stored."""
        import torch

        tensor = self.tensor(name)
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()

    def shape_and_dtype(self, name: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype such as "BF16") from the header, reading no data."""
        sliced = self._where[name].get_slice(name)
        return list(sliced.get_shape()), sliced.get_dtype()


def read_arrays(folder: Path, keep) -> dict[str, np.ndarray]:
    """{name: array} of every tensor in `folder` whose name satisfies `keep(name)`."""
    with TensorFolder(folder) as tensors:
        return {name: tensors.array(name) for name in tensors.keys() if keep(name)}
