"""Dense reference of the training layout attention (npr.ops.layout_attention): the test oracle.

Token i may attend key j  <=>  seq_start[i] <= j <= i  and not  hole_start[i] <= j < hole_end[i].
Builds the [T, T] mask and the [Hq, T, T] scores: tests and tiny inputs only.
"""
from __future__ import annotations

import torch


def layout_mask(seq_start: torch.Tensor, hole_start: torch.Tensor,
                hole_end: torch.Tensor) -> torch.Tensor:
    """[T] long x3 -> bool [T, T], True = query row may attend key column."""
    T = seq_start.numel()
    j = torch.arange(T, device=seq_start.device)
    i = j[:, None]
    vis = (j[None, :] <= i) & (j[None, :] >= seq_start[:, None])
    hole = (j[None, :] >= hole_start[:, None]) & (j[None, :] < hole_end[:, None])
    return vis & ~hole


def layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_start: torch.Tensor,
                     hole_start: torch.Tensor, hole_end: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D] (Hq a multiple of Hkv, query head h reads kv head
    h // (Hq / Hkv)), layout [T] long x3 -> [T, Hq, D] in q.dtype, computed in
    max(q.dtype, fp32). Differentiable (plain autograd over the dense scores)."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.to(work).transpose(0, 1) for t in (q, k, v))  # [H, T, D]
    kf, vf = kf.repeat_interleave(G, 0), vf.repeat_interleave(G, 0)
    s = (qf @ kf.transpose(1, 2)) * scale  # [Hq, T, T]
    mask = layout_mask(seq_start, hole_start, hole_end)
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vf).transpose(0, 1).to(q.dtype)
