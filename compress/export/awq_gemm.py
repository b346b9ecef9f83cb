"""AutoAWQ GEMM folders, converted from a compressed-tensors `pack-quantized` folder.

The ONNX GenAI model builder reads this layout as a pre-quantized input (`quant_method: awq`).
AutoAWQ GEMM is 4-bit only and always carries qzeros: a symmetric scheme is written with zero point 8.
"""

from __future__ import annotations

from pathlib import Path

from compress.export.gptq_v1 import read_scheme, repack_folder, require_groups
from compress.export.repack import AWQ_BITS, pack_awq_gemm


def write_awq_gemm(ct_folder: Path, out: Path) -> Path:
    """Convert a compressed-tensors folder into an AutoAWQ GEMM folder (`quant_method: awq`)."""
    scheme = read_scheme(Path(ct_folder))
    if scheme.bits not in AWQ_BITS:
        raise ValueError(f"AutoAWQ GEMM folders hold 4-bit weights only; this checkpoint has {scheme.bits}-bit weights")
    require_groups(scheme, "AutoAWQ GEMM")
    # zero_point: qzeros are always written (AutoAWQ GEMM has no layout without them)
    config = {"quant_method": "awq", "bits": scheme.bits, "group_size": scheme.group_size, "zero_point": True, "version": "gemm"}
    return repack_folder(ct_folder, out, pack_awq_gemm, config, scheme)

