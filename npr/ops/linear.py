"""Linear layer entry point used by the models: y = x @ W^T (+ b).

Today this is torch's linear. Issue 5 puts a weight-streaming CPU kernel behind this same call
for small row counts (decode), so the models never change when the kernel lands.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K], weight: [N, K], bias: [N] or None -> [..., N]."""
    return F.linear(x, weight, bias)
