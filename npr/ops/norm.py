"""RMSNorm: torch.ops.npr.rms_norm where built, else the reference."""
from __future__ import annotations

import torch

from npr import _ext, env, ref

if _ext.available():

    @torch.library.register_fake("npr::rms_norm")
    def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] -> [..., D]."""
    if (
        _ext.available()
        and not env.force_reference()
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
    ):
        return torch.ops.npr.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)
