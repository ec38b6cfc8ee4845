"""The outer training loop the SFT and RL trainers share: step until the total, log each step's
metrics, checkpoint every train.save_every steps and at the end, draw the curves."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from npr.train.dist import DistContext
from npr.train.metrics import MetricsLog


class Trainer(Protocol):
    cfg: Any                   # .stage and .train (out_dir, progress, save_every, plot)
    ctx: DistContext
    step: int                  # steps done (a resumed run starts past 0)
    resumed_from: str | None   # the checkpoint it resumed from

    def train_step(self) -> dict[str, float]: ...
    def save(self) -> str: ...


def run_steps(trainer: Trainer, total_steps: int,
              on_step: Callable[[int, dict[str, float]], None] | None = None
              ) -> list[dict[str, float]]:
    """Steps until total_steps (resumed runs continue); metrics per step in out_dir/metrics.jsonl,
    checkpoints every train.save_every steps and at the end, the curves in out_dir/metrics.png.
    on_step(step, metrics) runs after each step. Returns this run's metrics, one dict a step."""
    T = trainer.cfg.train
    log = MetricsLog(os.path.join(T.out_dir, "metrics.jsonl"), enabled=trainer.ctx.is_main,
                     progress=T.progress, total_steps=total_steps, start_step=trainer.step,
                     desc=trainer.cfg.stage)
    history = []
    try:
        while trainer.step < total_steps:
            m = trainer.train_step()
            log.log(trainer.step, m)
            history.append({"step": trainer.step, **m})
            if T.save_every and trainer.step % T.save_every == 0 and trainer.step < total_steps:
                trainer.save()
            if on_step is not None:
                on_step(trainer.step, m)
        if trainer.resumed_from is None or history:
            trainer.save()
    finally:
        log.close(os.path.join(T.out_dir, "metrics.png") if T.plot else None)
    return history
