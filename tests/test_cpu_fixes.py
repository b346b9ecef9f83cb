"""The AWQ-on-CPU workaround: fails if llm-compressor stops needing it, or if it stops working."""

import pytest
import torch

from compress.quantize.cpu_fixes import awq_needs_fix, awq_on_cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the workaround applies only without CUDA")


def _pin_a_cached_tensor():
    from llmcompressor.pipelines.cache import IntermediatesCache

    cache = IntermediatesCache.from_dataloader([{"x": torch.ones(2, 2)}])
    cache.pin_memory(0)


def test_llm_compressor_still_pins_memory_without_cuda():
    """When this starts passing without the error, the library fixed it: delete compress/quantize/cpu_fixes.py."""
    assert awq_needs_fix()
    with pytest.raises(RuntimeError, match="accelerator"):
        _pin_a_cached_tensor()


def test_workaround_makes_pinning_a_no_op_and_restores_it():
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    with awq_on_cpu():
        _pin_a_cached_tensor()
    assert IntermediatesCache.pin_memory is original
