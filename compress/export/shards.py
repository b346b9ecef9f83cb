"""Write a safetensors checkpoint a piece at a time: one shard per `flush()` (a decoder layer, say), with the
index transformers and vLLM read, so no writer ever holds more than one shard's tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from compress.tensors import INDEX_FILE


class ShardWriter:
    """Collect tensors with `add`, write them out with `flush`; `close` names the shards and writes the index."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._pending: dict = {}
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        self._pending[name] = tensor.detach().contiguous()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.out / f"shard-{len(self._written):05d}.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self.total_bytes += sum(t.numel() * t.element_size() for t in self._pending.values())
        self._written.append((path, sorted(self._pending)))
        self._pending = {}

    def close(self) -> list[Path]:
        """Rename the shards model-0000i-of-0000N.safetensors (model.safetensors when there is one) and
        write the index. -> the shard files."""
        self.flush()
        count = len(self._written)
        names, weight_map = [], {}
        for index, (path, tensors) in enumerate(self._written):
            name = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.out / name)
            names.append(self.out / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
