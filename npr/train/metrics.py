"""Runs people can watch: one JSON line per step, a tqdm bar, a PNG of the curves at the end.

Only the main rank writes. On resume, lines of steps after the checkpoint are dropped (they will
be recomputed) so the file stays one line per step.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

# Curves drawn by `plot`, when present in the file.
PLOT_KEYS = ("reward", "accuracy", "format_rate", "parallel_rate", "loss", "grad_norm",
             "adv_abs_mean", "ratio_max", "rollout_tok_s", "train_tok_s")


class MetricsLog:
    def __init__(self, path: str, *, enabled: bool = True, progress: bool = True,
                 total_steps: int = 0, start_step: int = 0, desc: str = "train") -> None:
        self.path, self.enabled = path, enabled
        self.bar = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            rows = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            show = {k: row[k] for k in ("reward", "accuracy", "loss") if isinstance(row.get(k), float)}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in show.items()}, refresh=False)
            self.bar.update(1)

    def close(self, png: str | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if png is not None and os.path.exists(self.path):
            plot(self.path, png)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(jsonl: str, png: str, keys: Sequence[str] = PLOT_KEYS) -> str | None:
    """One panel per metric against the step; returns png, or None when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl)
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not present:
        return None
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, present):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
