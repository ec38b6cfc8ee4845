"""Group-relative advantages: one function, three presets (spec/NPR.md §4).

    A_i = (R_i - mean of R over i's group's surviving members) / scale

    scale  "batch": ONE std of R over every surviving rollout of the whole (global) batch,
                    computed once from the raw rewards (PAPO);
           "group": the std of R over i's group's surviving members (DAPO, GRPO);
           "none":  1 (Dr. GRPO style).

Stds are sample stds (n - 1); A = centered / (std + eps), so a batch or group whose rewards are
all equal, and a group with one survivor, give 0, never NaN. Rollouts that did not survive
(structurally invalid, stage 3) get 0 and do not enter any mean or std. Groups never span ranks,
so group statistics are local; the batch std needs the sums of all ranks (`all_reduce`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

SCALES = ("batch", "group", "none")

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # in-place-free SUM over ranks


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor, *,
                     scale: str = "batch", eps: float = 1e-6,
                     all_reduce: AllReduce | None = None) -> torch.Tensor:
    """rewards: [N] float, group_ids: [N] long (any ids; rollouts of one prompt share one),
    valid: [N] bool -> advantages [N] float64 (0 where not valid)."""
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    if not (rewards.dim() == group_ids.dim() == valid.dim() == 1
            and rewards.shape == group_ids.shape == valid.shape):
        raise ValueError(f"group_advantages: rewards, group_ids, valid must be [N] alike, got "
                         f"{list(rewards.shape)}, {list(group_ids.shape)}, {list(valid.shape)}")
    r = rewards.double()
    if not bool(torch.isfinite(r[valid]).all()):
        raise ValueError("group_advantages: a surviving reward is NaN or infinite")
    v = valid.bool()
    if r.numel() == 0:
        if scale == "batch" and all_reduce is not None:  # the other ranks still sum with us
            all_reduce(torch.zeros(3, dtype=torch.float64))
        return torch.zeros(0, dtype=torch.float64)
    w = v.double()
    rz = torch.where(v, r, torch.zeros_like(r))
    _, g = torch.unique(group_ids, return_inverse=True)
    G = int(g.max()) + 1 if g.numel() else 0
    cnt = torch.zeros(G, dtype=torch.float64).index_add_(0, g, w)
    s1 = torch.zeros(G, dtype=torch.float64).index_add_(0, g, rz)
    mean = s1 / cnt.clamp(min=1)
    # Groups whose survivors all share one reward: exactly 0 (their float mean may be off by
    # an ulp).
    inf = torch.full((G,), float("inf"), dtype=torch.float64)
    lo = inf.scatter_reduce(0, g, torch.where(v, r, inf[0]), "amin")
    hi = (-inf).scatter_reduce(0, g, torch.where(v, r, -inf[0]), "amax")
    flat = lo >= hi
    centered = torch.where(v & ~flat[g], r - mean[g], torch.zeros_like(r))
    if scale == "none":
        return centered
    if scale == "group":
        ss = torch.zeros(G, dtype=torch.float64).index_add_(0, g, centered * centered)
        std = (ss / (cnt - 1).clamp(min=1)).sqrt()
        return centered / (std[g] + eps)
    # batch: n, sum R, sum R^2 over the surviving rollouts of all ranks
    stats = torch.stack([w.sum(), rz.sum(), (rz * rz).sum()])
    if all_reduce is not None:
        stats = all_reduce(stats)
    n, s, ss = (float(x) for x in stats)
    var = max(ss - s * s / n, 0.0) / (n - 1) if n > 1 else 0.0
    return centered / (var ** 0.5 + eps)


def equal_reward_groups(rewards: torch.Tensor, group_ids: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
    """-> [N] bool, True for rollouts of a group whose surviving rewards are all equal (DAPO's
    dynamic sampling drops these groups: they carry no signal). A group with no survivor counts
    as equal."""
    out = torch.zeros_like(valid, dtype=torch.bool)
    for gid in torch.unique(group_ids):
        m = group_ids == gid
        rv = rewards[m & valid]
        out[m] = rv.numel() == 0 or bool((rv == rv[0]).all())
    return out
