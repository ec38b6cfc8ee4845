"""Prompt sources: what the RL loop rolls out. A source is indexable by a global draw number
(0, 1, 2, ... forever), so the data cursor of a run is one int and a resumed run draws exactly
the prompts the interrupted one would have."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from npr.jsonl import read_rows


@dataclass(frozen=True)
class Prompt:
    """One problem: the prompt as token ids (preferred: the trainer never re-tokenises) or text
    (tokenised once by the RL loop), and its gold answer."""

    answer: str
    text: str | None = None
    ids: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.ids is None):
            raise ValueError("Prompt: give exactly one of text or ids")
        if self.ids is not None and not self.ids:
            raise ValueError("Prompt: empty ids")
        if not isinstance(self.answer, str):
            raise TypeError(f"Prompt: answer must be a str, got {type(self.answer).__name__}")


class PromptSource(Protocol):
    def __call__(self, draw: int) -> Prompt: ...


class ShuffledPrompts:
    """A finite list drawn epoch by epoch, each epoch in its own seeded order."""

    def __init__(self, prompts: Sequence[Prompt], seed: int = 0, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("ShuffledPrompts: no prompts")
        self.prompts, self.seed, self.shuffle = list(prompts), seed, shuffle
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, draw: int) -> Prompt:
        if draw < 0:
            raise ValueError(f"ShuffledPrompts: draw must be >= 0, got {draw}")
        epoch, i = divmod(draw, len(self.prompts))
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self.prompts)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch cached at a time
        return self.prompts[order[i]]


def load_jsonl(path: str, template: str = "{problem}") -> list[Prompt]:
    """Rows {"problem": str, "answer": str|number}; the prompt text is template.format(problem=...).
    Raises ValueError naming the line of a bad row."""
    out = [Prompt(answer=str(row["answer"]), text=template.format(problem=row["problem"]),
                  meta=row) for _, row in read_rows(path, ("problem", "answer"))]
    if not out:
        raise ValueError(f"{path}: no rows")
    return out
