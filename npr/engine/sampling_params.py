"""SamplingParams: what one prompt asks of the engine (names follow vLLM where they exist)."""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

PARALLEL_MODES = ("native", "sequential", "off")
MODE_IDS = {"native": 0, "sequential": 1, "off": 2}
# vLLM's rule: 0 < temperature < MIN_TEMPERATURE is raised to it (with a warning); below it,
# logits / temperature overflow or make the softmax degenerate.
MIN_TEMPERATURE = 1e-2
# Token ids are int32 in the C++ scheduler.
MAX_TOKEN_ID = 2**31 - 1


def is_int(v: Any) -> bool:
    """An integer (int, numpy / 0-d torch integer), not a bool or a float."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def token_ids(ids: Any, what: str) -> list[int]:
    """ids as a list of Python ints in [0, MAX_TOKEN_ID]; a clear error naming `what` and the
    position of the first bad entry (floats are never truncated, bools are not ids)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{what} must be a sequence of token ids (ints), got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if not is_int(t):
            raise TypeError(f"{what}[{i}] must be an int token id, got {type(t).__name__} "
                            f"{repr(t)[:60]}")
        t = operator.index(t)
        if not 0 <= t <= MAX_TOKEN_ID:
            raise ValueError(f"{what}[{i}] = {t} is not a token id (0 .. 2**31 - 1)")
        out.append(t)
    return out


@dataclass
class SamplingParams:
    """temperature=0 is greedy. parallel: "native" (fork at </guideline>, branches decode as rows
    of one batch), "sequential" (same structure, mask and positions, one branch after another: the
    speed baseline) or "off" (plain decoding; tags are ordinary tokens). As in vLLM, a
    temperature in (0, 0.01) is raised to 0.01 with a warning (smaller ones overflow).

    max_new_tokens counts every token of every branch, injected tags included; max_branch_tokens
    caps one step (injected tokens included). step_repetition_penalty applies, HF-style, to the
    tokens a step has already sampled, inside steps only. logprobs are those of the distribution
    actually sampled from (after processors, penalty, temperature, top-k/top-p); for greedy rows,
    of the processed logits at temperature 1.

    A logits processor is fn(visible_token_ids, logits [V] fp32) -> logits [V]; logits is the
    engine's own copy of the row, so fn may change it in place and return it (as vLLM's do).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    max_branch_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stop: Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    parallel: str = "native"
    step_repetition_penalty: float = 1.0
    logits_processors: Sequence[LogitsProcessor] | None = field(default=None, repr=False)
    logprobs: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"SamplingParams: {msg}")

        def number(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        if not (number(self.temperature) and self.temperature >= 0):
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            warnings.warn(f"SamplingParams: temperature {self.temperature!r} is below "
                          f"{MIN_TEMPERATURE}, which overflows the logits; raised to "
                          f"{MIN_TEMPERATURE} (use 0 for greedy)", stacklevel=3)
            self.temperature = MIN_TEMPERATURE
        if not (number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1)):
            raise bad(f"top_k must be -1 (off) or an int >= 1, got {self.top_k!r}")
        if not (is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_TOKEN_ID):
            raise bad(f"max_new_tokens must be an int in [1, 2**31 - 1], "
                      f"got {self.max_new_tokens!r}")
        if self.max_branch_tokens is not None and not (
            is_int(self.max_branch_tokens) and 1 <= self.max_branch_tokens <= MAX_TOKEN_ID
        ):
            raise bad(f"max_branch_tokens must be None or an int >= 1, got {self.max_branch_tokens!r}")
        if not (is_int(self.n) and 1 <= self.n <= MAX_TOKEN_ID):
            raise bad(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and not is_int(self.seed):
            raise bad(f"seed must be an int or None, got {self.seed!r}")
        for name in ("top_k", "max_new_tokens", "max_branch_tokens", "n", "seed"):
            v = getattr(self, name)  # numpy / 0-d tensor ints -> int (what the scheduler takes)
            if v is not None:
                setattr(self, name, operator.index(v))
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if self.parallel not in PARALLEL_MODES:
            raise bad(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if not (number(self.step_repetition_penalty) and self.step_repetition_penalty > 0):
            raise bad(f"step_repetition_penalty must be > 0, got {self.step_repetition_penalty!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if self.stop_token_ids is not None:
            try:
                self.stop_token_ids = token_ids(self.stop_token_ids, "stop_token_ids")
            except (TypeError, ValueError) as e:
                raise bad(str(e)) from None
        if self.logits_processors is not None and any(not callable(f) for f in self.logits_processors):
            raise bad("logits_processors must be callables fn(visible_token_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
