"""Attention used by the models' reference path, and the protocol the engine plugs into.

The decoder never owns a KV cache. `LlamaDecoder.forward_flat` hands each layer's q, k, v (after
q/k-norm and RoPE) to an attention object; the engine's paged attention writes k/v into its cache
and attends. `DenseAttention` is the reference implementation of that protocol: one dense bool
mask over the flat batch, no cache.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class FlatAttention(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        ...


def check_mask(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """mask: bool [B, L, L] or [L, L] (True = may attend) -> bool [B, 1, L, L].

    A query row with no allowed key (e.g. a padding token) is let attend to itself, so it stays
    finite: a NaN row would leak into every later layer through its value vector.
    """
    if mask.dtype != torch.bool:
        raise TypeError(
            f"attention_mask must be a bool tensor (True = may attend), got {mask.dtype}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(batch, -1, -1)
    if tuple(mask.shape) != (batch, length, length):
        raise ValueError(f"attention_mask must be [B, L, L] = [{batch}, {length}, {length}] "
                         f"(or [L, L]), got {list(mask.shape)}")
    empty = ~mask.any(-1)  # [B, L]
    if bool(empty.any()):
        eye = torch.eye(length, dtype=torch.bool, device=mask.device)
        mask = mask | (empty.unsqueeze(-1) & eye)
    return mask.unsqueeze(1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         mask: torch.Tensor | None) -> torch.Tensor:
    """q: [B, L, Hq, D], k/v: [B, L, Hkv, D], mask: bool [B, 1, L, L] or None (causal)
    -> [B, L, Hq, D]. Scale 1/sqrt(D), grouped-query heads shared as in HF (repeat_kv)."""
    hq, hkv = q.shape[-2], k.shape[-2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None,
                                         scale=q.shape[-1] ** -0.5, enable_gqa=hq != hkv)
    return out.transpose(1, 2)


class DenseAttention:
    """Reference FlatAttention over one flat batch of T tokens with a dense mask.

    mask: bool [T, T], True = query row may attend to key column. Tokens of different rows of the
    engine's batch simply never attend to each other in the mask.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
            raise ValueError(f"DenseAttention: mask must be bool [T, T], got {list(mask.shape)}")
        self.mask = check_mask(mask, 1, mask.shape[0])  # [1, 1, T, T]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        if q.shape[0] != self.mask.shape[-1]:
            raise ValueError(f"DenseAttention: mask is for {self.mask.shape[-1]} tokens, "
                             f"got q with {q.shape[0]}")
        return sdpa(q[None], k[None], v[None], self.mask.to(q.device))[0]
