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
        and x.dtype == weight.dtype
        and x.device == weight.device
        and ((x.device.type == "cpu" and x.dtype == torch.float32)
             or (x.device.type == "cuda" and _ext.with_cuda()))
        # The compiled op has no backward: training goes through the reference.
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return torch.ops.npr.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)
