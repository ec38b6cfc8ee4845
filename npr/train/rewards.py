"""Rewards of the two RL stages (spec/NPR.md §4) and DAPO's soft overlong penalty.

A reward function maps (response texts, gold answers) to `Scored` values; the RL loop calls it
once per rollout batch. Checkers (npr.train.verify) map (answers, golds) to bools: ExactMatch for
synthetic tasks, MathVerifier (worker process, timeout per answer) for math.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npr.format import DEFAULT_MAX_BRANCHES, extract_answer, format_score
from npr.train.verify import ExactMatch, MathVerifier

__all__ = ["Scored", "RewardFn", "Checker", "Stage1Reward", "Stage3Reward", "ExactMatch",
           "MathVerifier", "soft_overlong_penalty", "make_checker"]

Checker = Callable[[Sequence[str | None], Sequence[str]], list[bool]]


@dataclass(frozen=True)
class Scored:
    reward: float
    correct: bool     # the boxed answer matches the gold answer
    format_ok: bool   # the response passes the format check (spec §1)


RewardFn = Callable[[Sequence[str], Sequence[str]], list[Scored]]


def make_checker(kind: str, timeout_s: float = 5.0) -> Checker:
    """kind: "exact" | "math"."""
    if kind == "exact":
        return ExactMatch()
    if kind == "math":
        return MathVerifier(timeout_s=timeout_s)
    raise ValueError(f"unknown checker {kind!r} (exact | math)")


class Stage1Reward:
    """NPR-ZERO: format_score(text) when the format fails (a penalty in [-2, 0)), else +1 / -1
    for a correct / wrong answer."""

    def __init__(self, checker: Checker, max_branches: int = DEFAULT_MAX_BRANCHES) -> None:
        self.checker, self.max_branches = checker, max_branches

    def __call__(self, texts: Sequence[str], golds: Sequence[str]) -> list[Scored]:
        correct = self.checker([extract_answer(t) for t in texts], golds)
        out = []
        for t, ok in zip(texts, correct):
            fs = format_score(t, max_branches=self.max_branches)
            out.append(Scored(reward=fs if fs != 0.0 else (1.0 if ok else -1.0),
                              correct=bool(ok), format_ok=fs == 0.0))
        return out


class Stage3Reward:
    """PAPO: +1 / -1 for a correct / wrong answer (invalid structures are dropped before the
    statistics by the RL loop, not scored here)."""

    def __init__(self, checker: Checker, max_branches: int = DEFAULT_MAX_BRANCHES) -> None:
        self.checker, self.max_branches = checker, max_branches

    def __call__(self, texts: Sequence[str], golds: Sequence[str]) -> list[Scored]:
        correct = self.checker([extract_answer(t) for t in texts], golds)
        return [Scored(reward=1.0 if ok else -1.0, correct=bool(ok),
                       format_ok=format_score(t, max_branches=self.max_branches) == 0.0)
                for t, ok in zip(texts, correct)]


def soft_overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment of a response of `length` tokens: 0 up to
    max_len - cache_len, then falling linearly to -1 at max_len, -1 beyond."""
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"soft_overlong_penalty: need 0 <= cache_len <= max_len, got "
                         f"cache_len={cache_len}, max_len={max_len}")
    free = max_len - cache_len
    if length <= free:
        return 0.0
    if length > max_len or cache_len == 0:
        return -1.0
    return (free - length) / cache_len
