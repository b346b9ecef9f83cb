"""Run a Phi-3-architecture checkpoint one decoder layer at a time, straight from its files on disk.

Peak memory is one decoder layer in float32, the hidden states between layers (spilled to disk when
they do not fit, compress/activations.py) and, at the ends, the embedding table or the head in their
stored dtype. The layers are transformers' own modules (Phi3DecoderLayer, its rotary embedding and causal
mask), so a layer-sequential forward computes what `from_pretrained(...)(ids)` computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from compress.activations import Activations, allocate
from compress.tensors import TensorFolder
from compress.verify.accuracy import BLOCK_ROWS

HEAD_ROWS = 16384  # vocabulary rows of the head upcast to float32 at once
BATCH_BYTES = 512 * 2**20  # a layer's largest intermediate per forward chunk, roughly


class LayerwiseModel:
    """A checkpoint folder read a piece at a time: embedding, decoder layer i, final norm and head."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
        self.config._attn_implementation = "sdpa"  # what from_pretrained picks on CPU and CUDA
        self.tensors = TensorFolder(self.folder)
        self.rotary = Phi3RotaryEmbedding(config=self.config)
        self._norm: torch.Tensor | None = None
        self._head: torch.Tensor | None = None

    def close(self) -> None:
        self._norm = self._head = None
        self.tensors.close()

    def __enter__(self) -> LayerwiseModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def layer_names(self, index: int) -> list[str]:
        prefix = f"model.layers.{index}."
        return [name for name in self.tensors.keys() if name.startswith(prefix)]

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index` in float32 with its weights from disk (every other layer stays on disk)."""
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

        with torch.device("meta"):
            layer = Phi3DecoderLayer(self.config, index)
        prefix = f"model.layers.{index}."
        state = {name[len(prefix):]: self.tensors.tensor(name, torch.float32) for name in self.layer_names(index)}
        layer.load_state_dict(state, assign=True, strict=True)
        return layer.eval()

    def embed(self, windows: np.ndarray, store: Activations) -> None:
        """store[w] = the embedding rows of windows[w] [seq_len] in float32."""
        table = self.tensors.tensor("model.embed_tokens.weight")  # [vocab, hidden] stored dtype
        for start, stop in store.chunks():
            ids = torch.as_tensor(windows[start:stop], dtype=torch.long)
            store.write(start, torch.nn.functional.embedding(ids, table).float())
        del table

    def batches(self, store: Activations, most: int | None = None) -> Iterator[tuple[int, int]]:
        """Window ranges whose forward through one layer stays near BATCH_BYTES of intermediates (and holds at
        most `most` windows)."""
        seq_len = store.shape[1]
        per_window = seq_len * (2 * int(self.config.intermediate_size) + int(self.config.num_attention_heads) * seq_len) * 4
        count = min(max(1, BATCH_BYTES // per_window), most or store.shape[0])
        return store.chunks(count * store.shape[1] * store.shape[2] * 4)

    def forward(self, layer: torch.nn.Module, inputs: Activations, outputs: Activations | None,
                most: int | None = None) -> None:
        """outputs = layer(inputs), batch by batch (at most `most` windows each); with outputs None the layer
        just sees the inputs (for hooks that collect statistics)."""
        from transformers.masking_utils import create_causal_mask

        seq_len = inputs.shape[1]
        positions = torch.arange(seq_len).unsqueeze(0)
        with torch.inference_mode():
            for start, stop in self.batches(inputs, most):
                hidden = inputs.read(start, stop)
                rotary = self.rotary(hidden, position_ids=positions)
                mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                          past_key_values=None, position_ids=positions)
                result = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
                if outputs is not None:
                    outputs.write(start, result)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm of [..., hidden] float32 (differentiable; its weight read once)."""
        if self._norm is None:
            self._norm = self.tensors.tensor("model.norm.weight", torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self._norm * (hidden * torch.rsqrt(variance + float(self.config.rms_norm_eps)))

    def head_weight(self) -> torch.Tensor:
        """The LM head [vocab, hidden] in its stored dtype (the embedding table where tied), read from disk once
        and kept for the head's calls that follow (one copy, as one call needs it anyway)."""
        if self._head is None:
            name = "lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"
            self._head = self.tensors.tensor(name)
        return self._head

    def replace_head(self, weight: torch.Tensor) -> None:
        """Compute the logits with `weight` [vocab, hidden] instead of the stored head (a quantized head's values)."""
        self._head = weight

    def release_head(self) -> None:
        """Let the kept head go (when what follows needs its memory)."""
        self._head = None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [..., hidden] float32 -> [..., vocab] float32. The head stays in its
        stored dtype; HEAD_ROWS rows at a time are upcast."""
        normed = self.final_norm(hidden)
        head = self.head_weight()
        logits = torch.empty(*hidden.shape[:-1], head.shape[0], dtype=torch.float32)
        for row in range(0, head.shape[0], HEAD_ROWS):
            logits[..., row:row + HEAD_ROWS] = normed @ head[row:row + HEAD_ROWS].float().T
        return logits


def run_all_layers(model: LayerwiseModel, windows: np.ndarray, budget_bytes: int | None = None,
                   spill_dir: Path | None = None,
                   each_layer: Callable[[int, torch.nn.Module, Activations], torch.nn.Module] | None = None) -> Activations:
    """The last decoder layer's outputs for every window [W, seq_len]. `each_layer(index, layer, inputs)`,
    when given, sees each float layer and its inputs first and returns the layer to run (changed or not)."""
    count, seq_len = windows.shape
    inputs = allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, "hidden-a")
    model.embed(windows, inputs)
    for index in range(model.layers):
        layer = model.layer(index)
        if each_layer is not None:
            layer = each_layer(index, layer, inputs)
        outputs = allocate(count, seq_len, model.hidden_size, budget_bytes, spill_dir, f"hidden-{'ab'[(index + 1) % 2]}")
        model.forward(layer, inputs, outputs)
        del layer
        inputs.delete()
        inputs = outputs
    return inputs


def window_logprobs(folder: Path, windows: np.ndarray, budget_bytes: int | None = None,
                    spill_dir: Path | None = None,
                    each_layer: Callable[[int, torch.nn.Module, Activations], torch.nn.Module] | None = None,
                    head: Callable[[], torch.Tensor] | None = None) -> Iterator[Iterator[np.ndarray]]:
    """Next-token log-probs of each window, as a plain forward of the whole model gives them, computed one
    decoder layer at a time: blocks of BLOCK_ROWS rows [rows, vocab] float32, in order. `each_layer` as in
    run_all_layers and `head` (made once the decoder layers are done) in place of the stored head, to run the
    model with some layers changed."""
    with LayerwiseModel(folder) as model:
        hidden = run_all_layers(model, windows, budget_bytes, spill_dir, each_layer)
        if head is not None:
            model.replace_head(head())
        for index in range(len(windows)):
            yield _head_blocks(model, hidden.read(index, index + 1)[0, :-1])
        hidden.delete()


def _head_blocks(model: LayerwiseModel, hidden: torch.Tensor) -> Iterator[np.ndarray]:
    for block in hidden.split(BLOCK_ROWS):
        with torch.inference_mode():
            logprobs = torch.log_softmax(model.head_logits(block), dim=-1).numpy()
        yield logprobs
