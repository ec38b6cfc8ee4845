"""The demo's pictures: training curves of every stage, speedup per branch count."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any


def _rows(folder: str) -> list[dict[str, Any]]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(dirs: Mapping[str, str], png: str) -> str:
    """dirs: base / zero / beta / npr / sr folders (each with metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(13, 6.5))
    base = _rows(dirs["base"])
    ax[0, 0].plot(*_series(base, "loss_ema"))
    ax[0, 0].set_title("base: pretraining loss")
    zero = _rows(dirs["zero"])
    for key in ("format_rate", "accuracy"):
        ax[0, 1].plot(*_series(zero, key), marker=".", label=key)
    ax[0, 1].set_title("stage 1 NPR-ZERO (DAPO): rollouts")
    ax[0, 1].legend()
    ax[0, 2].plot(*_series(zero, "reward"), marker=".")
    ax[0, 2].set_title("stage 1: mean reward")
    ax[1, 0].plot(*_series(_rows(dirs["beta"]), "nll"), marker=".")
    ax[1, 0].set_title("stage 2 NPR-BETA: parallel SFT nll")
    npr_, sr = _rows(dirs["npr"]), _rows(dirs["sr"])
    ax[1, 1].plot(*_series(npr_, "accuracy"), marker=".", label="NPR (PAPO, native)")
    ax[1, 1].plot(*_series(sr, "accuracy"), marker=".", label="SR (sequential)")
    ax[1, 1].set_title("stage 3 vs SR: rollout accuracy")
    ax[1, 1].legend()
    ax[1, 2].plot(*_series(npr_, "rollout_tok_s"), marker=".", label="NPR")
    ax[1, 2].plot(*_series(sr, "rollout_tok_s"), marker=".", label="SR")
    ax[1, 2].set_title("stage 3 vs SR: rollout tokens/s")
    ax[1, 2].legend()
    for a in ax.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_speedup(rows: Sequence[Mapping[str, Any]], png: str) -> str:
    """rows: {"branches", "ideal", "achieved"} per branch count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["branches"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(b, [r["ideal"] for r in rows], marker="o", label="ideal (tokens / critical path)")
    ax.plot(b, [r["achieved"] or 0 for r in rows], marker="s", label="achieved (sequential / native)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("branches per block")
    ax.set_ylabel("speedup")
    ax.set_xticks(b)
    ax.set_title("NPR: native vs sequential decoding")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
