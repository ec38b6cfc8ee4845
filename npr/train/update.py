"""One optimizer update from micro-batches: forward + backward of each (DDP syncs on the last),
gradient clipping, optimizer and scheduler step. Shared by the RL loop and SFT.

Every rank runs the same number of micro-batches (short ranks run zero-weight dummies): FSDP2
gathers parameters in every forward, so the collective calls must pair up across ranks, and a
rank whose rollouts were all dropped still joins the gradient sync.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from npr.train.config import OptimSection
from npr.train.dist import DistContext, grad_scale, no_sync
from npr.train.logprobs import PackedBatch, pack

# (micro-batch index or None for a dummy) -> the micro-batch's loss (a sum over its tokens with
# global weights) and its stats (summable tensors).
LossFn = Callable[[int | None], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimSection) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimSection,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over cfg.warmup_steps, then constant / linear / cosine decay to 0 at
    total_steps (optimizer steps)."""
    warm, total = cfg.warmup_steps, max(1, total_steps)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def dummy_batch() -> PackedBatch:
    """Two tokens, the second scored: a forward/backward that touches every parameter (give it
    weight 0)."""
    from npr.train.rollout import causal_layout

    return pack([([0, 0], causal_layout(2, 0), [False, True])])


@dataclass
class UpdateStats:
    loss: float = 0.0              # summed over micro-batches and ranks: the batch's loss
    grad_norm: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    step_s: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # loss_fn stats, summed over ranks


def update(train_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
           n_micro: int, loss_fn: LossFn, ctx: DistContext, max_grad_norm: float) -> UpdateStats:
    """Runs loss_fn(i) for i < n_micro (then dummies up to the most micro-batches any rank
    has), backward each with the DDP sync on the last one, clips and steps."""
    st = UpdateStats()
    n_all = int(ctx.all_reduce_max(torch.tensor([max(n_micro, 1)]))[0])
    scale = grad_scale(ctx)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i in range(n_all):
        with no_sync(train_model, enabled=ctx.distributed and i < n_all - 1):
            t0 = time.perf_counter()
            loss, stats = loss_fn(i if i < n_micro else None)
            t1 = time.perf_counter()
            (loss * scale).backward()
            t2 = time.perf_counter()
        st.forward_s += t1 - t0
        st.backward_s += t2 - t1
        loss_sum += loss.detach().double()
        for k, v in stats.items():
            v = v.detach().double()
            if k.endswith("_min"):
                sums[k] = torch.minimum(sums[k], v) if k in sums else v
            elif k.endswith("_max"):
                sums[k] = torch.maximum(sums[k], v) if k in sums else v
            else:
                sums[k] = sums[k] + v if k in sums else v
    t0 = time.perf_counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    scheduler.step()
    st.step_s = time.perf_counter() - t0
    st.grad_norm = float(norm)
    st.loss = float(ctx.all_reduce_sum(loss_sum))
    for k, v in sums.items():
        if k.endswith("_min"):
            st.sums[k] = -float(ctx.all_reduce_max(-v))
        elif k.endswith("_max"):
            st.sums[k] = float(ctx.all_reduce_max(v))
        else:
            st.sums[k] = float(ctx.all_reduce_sum(v))
    return st
