"""The policy-gradient loss: one function; PAPO, DAPO and GRPO are presets of it (spec §4).

    loss = - sum_t w_t * min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t)
    ratio_t = pi(y_t) / pi_old(y_t)          pi_old = sg(pi) when no old log-probs are given

With old = sg(pi) the ratio is 1 in value and its gradient is grad log pi: PAPO's strict
on-policy gradient, -sum_t w_t A_t grad log pi(y_t). The weights w_t make the normaliser GLOBAL
(`token_weights`): token-mean gives every scored token of the whole batch, all micro-batches
on all ranks, the weight 1 / (their count), so summing the micro-batch losses of every rank
gives the loss of the whole batch, however it was split.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")

# Preset -> the knobs of the advantage, the loss and the batch filter.
#   scale: npr.train.advantages scale; clip_*: None = no clipping; drop_equal_groups: DAPO's
#   dynamic sampling (groups with all-equal rewards dropped and refilled); overlong: DAPO's soft
#   overlong penalty added to the reward (its lengths are set in the config).
PRESETS: dict[str, dict[str, object]] = {
    "papo": dict(scale="batch", clip_low=None, clip_high=None, drop_equal_groups=False,
                 aggregation="token-mean", overlong=False, drop_invalid=True),
    "dapo": dict(scale="group", clip_low=0.2, clip_high=0.28, drop_equal_groups=True,
                 aggregation="token-mean", overlong=True, drop_invalid=False),
    "grpo": dict(scale="group", clip_low=0.2, clip_high=0.2, drop_equal_groups=False,
                 aggregation="seq-mean-token-mean", overlong=False, drop_invalid=False),
}


def token_weights(scored_per_seq: Sequence[int], aggregation: str, global_tokens: int,
                  global_seqs: int) -> list[float]:
    """Per-sequence weight of each of its scored tokens. token-mean: 1 / global_tokens;
    seq-mean-token-mean: 1 / (|y_i| * global_seqs) (each sequence counts once). global_*: the
    counts over the whole batch on all ranks."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "token-mean":
        return [1.0 / global_tokens if global_tokens else 0.0] * len(scored_per_seq)
    return [1.0 / (n * global_seqs) if n and global_seqs else 0.0 for n in scored_per_seq]


def policy_loss(logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                old_logp: torch.Tensor | None = None, clip_low: float | None = None,
                clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logp: [T] fp32 (differentiable, 0 where not scored), advantages: [T] (per token, 0 where
    not scored), weights: [T] (0 where not scored), old_logp: [T] or None -> (loss scalar,
    stats: ratio_sum / ratio_min / ratio_max / clipped (count) / tokens (count) over tokens
    with weight > 0)."""
    if not (logp.shape == advantages.shape == weights.shape) or logp.dim() != 1:
        raise ValueError(f"policy_loss: logp, advantages, weights must be [T] alike, got "
                         f"{list(logp.shape)}, {list(advantages.shape)}, {list(weights.shape)}")
    if (clip_low is None) != (clip_high is None):
        raise ValueError("policy_loss: give both clip_low and clip_high, or neither")
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    ratio = torch.exp(logp - old)
    a = advantages.to(logp.dtype)
    surr = ratio * a
    clipped = torch.zeros_like(logp, dtype=torch.bool)
    if clip_low is not None:
        capped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * a
        clipped = capped < surr
        surr = torch.minimum(surr, capped)
    loss = -(weights.to(logp.dtype) * surr).sum()
    live = weights > 0
    r = ratio.detach()[live]
    stats = {"ratio_sum": r.sum(), "tokens": live.sum(),
             "ratio_min": r.min() if r.numel() else torch.tensor(float("inf")),
             "ratio_max": r.max() if r.numel() else torch.tensor(float("-inf")),
             "clipped": (clipped & live).sum()}
    return loss, stats
