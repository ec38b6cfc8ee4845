"""Synthetic parallel-reasoning tasks and their data sets.

A task spec names a task and optionally its knobs: "multiples" or "multiples:k=3-5,n=4" (k groups
= branches, n terms per group = step length; "a-b" draws uniformly from a..b). Training draws
unlimited fresh problems from a seed (`TaskPrompts`); evaluation sets (`eval_set`) come from the
held-out bucket of problem statements, which training never draws.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from npr.jsonl import read_rows
from npr.tasks.multiples import Multiples, Problem, is_heldout, prompt_text

TASKS = {"multiples": Multiples}
__all__ = ["TASKS", "Multiples", "Problem", "get_task", "TaskPrompts", "eval_set", "write_jsonl",
           "read_jsonl"]


def _range(key: str, value: str) -> tuple[int, int]:
    lo, sep, hi = value.partition("-")
    try:
        a = int(lo)
        b = int(hi) if sep else a
    except ValueError:
        raise ValueError(f"task spec: {key}={value} is not an int or a range a-b") from None
    return a, b


def get_task(spec: str) -> Multiples:
    """"multiples" | "multiples:k=2-4,n=2-6" -> the task; ValueError names a bad part."""
    name, _, args = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    kw: dict[str, int] = {}
    for part in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in ("k", "n"):
            raise ValueError(f"task spec {spec!r}: bad knob {part!r} (knobs: k=a-b, n=a-b)")
        kw[f"{key}_min"], kw[f"{key}_max"] = _range(key, value)
    return TASKS[name](**kw)


def task_spec(task: Multiples) -> str:
    return task.spec


def _rng(seed: int, draw: int, salt: int) -> random.Random:
    return random.Random((seed * 1_000_003 + draw) * 7 + salt)


class TaskPrompts:
    """PromptSource of npr.train.data: draw number -> a fresh training problem (never one of the
    held-out bucket), the same for the same (seed, draw) in any process."""

    def __init__(self, task: Multiples, seed: int = 0) -> None:
        self.task, self.seed = task, seed

    def problem(self, draw: int) -> Problem:
        if draw < 0:
            raise ValueError(f"TaskPrompts: draw must be >= 0, got {draw}")
        rng = _rng(self.seed, draw, 1)
        while True:
            p = self.task.sample(rng)
            if not is_heldout(p.text):
                return p

    def __call__(self, draw: int) -> Any:
        from npr.train.data import Prompt

        p = self.problem(draw)
        return Prompt(answer=p.answer, text=prompt_text(p.text), meta={"problem": p.text})


def eval_set(task: Multiples, n: int, seed: int = 0, heldout: bool = True) -> list[Problem]:
    """n distinct held-out problems (disjoint from every training draw); heldout=False draws
    from the whole task (speed measurements: small tasks have few held-out problems)."""
    if n < 1:
        raise ValueError(f"eval_set: n must be >= 1, got {n}")
    rng = _rng(seed, 0, 2)
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(1000 * n):
        p = task.sample(rng)
        if (not heldout or is_heldout(p.text)) and p.text not in seen:
            seen.add(p.text)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"eval_set: the task {task_spec(task)} has fewer than {n} distinct "
                     f"{'held-out ' if heldout else ''}problems (found {len(out)})")


def write_jsonl(path: str, problems: Sequence[Problem], task: Multiples) -> None:
    """Rows {"problem", "answer", "task"}: `npr eval --data FILE` reads them back with the
    task's prompt template and exact checker."""
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"problem": p.text, "answer": p.answer,
                                "task": task_spec(task)}) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows {"problem", "answer"[, "task"]}; ValueError names the line of a bad row."""
    rows = []
    for n, row in read_rows(path, ("problem", "answer")):
        if not isinstance(row["problem"], str):
            raise ValueError(f"{path}:{n}: 'problem' must be a string")
        rows.append({**row, "answer": str(row["answer"])})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
