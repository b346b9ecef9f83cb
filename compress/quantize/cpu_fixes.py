"""The one workaround llm-compressor 0.14 needs to run AWQ on a machine without CUDA.

Its IntermediatesCache pins calibration activations in page-locked memory (`Tensor.pin_memory()`), which
raises "Cannot access accelerator device when none is available" on a CPU-only machine. Pinning only
speeds host-to-GPU copies, so without CUDA it is a no-op to skip it. tests/test_cpu_fixes.py fails when the
workaround stops being needed (the library fixed it) or stops working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def awq_needs_fix() -> bool:
    import torch

    return not torch.cuda.is_available()


@contextlib.contextmanager
def awq_on_cpu() -> Iterator[None]:
    """Make IntermediatesCache.pin_memory a no-op while AWQ runs, only when CUDA is absent."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not awq_needs_fix():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original
