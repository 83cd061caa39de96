"""Choose the autocast precision a device runs fast.

bfloat16 autocast is fast only where the hardware has bfloat16 matrix instructions: CUDA GPUs
from Ampere on, and CPUs with AVX-512 BF16 or AMX. Elsewhere PyTorch emulates it, and a
bfloat16 matrix multiplication can be 50 to 100 times slower than a float32 one (measured on
an AVX2-only AMD EPYC: 2.8 s against 0.033 s for 1024 x 1024 x 1024).
"""

from __future__ import annotations

import logging

import torch

_logger = logging.getLogger(__name__)


def has_fast_bf16(device: torch.device | str) -> bool:
    """True when ``device`` runs bfloat16 matrix multiplications in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` into ``"bf16"`` or ``"fp32"`` for ``device``; warn about an emulated ``"bf16"``.

    Other values are returned unchanged.
    """
    fast = has_fast_bf16(device)
    if precision == "auto":
        resolved = "bf16" if fast else "fp32"
        _logger.info("precision=auto: using %s on %s", resolved, device)
        return resolved

    if precision == "bf16" and not fast:
        _logger.warning(
            "precision=bf16 on %s, which has no bfloat16 matrix instructions: PyTorch emulates them and "
            "runs many times slower than fp32; use precision=auto or fp32 here",
            device,
        )
    return precision
