"""SamplingParams: what one prompt asks of the engine (names follow vLLM where they exist)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

PARALLEL_MODES = ("native", "sequential", "off")
MODE_IDS = {"native": 0, "sequential": 1, "off": 2}


@dataclass
class SamplingParams:
    """temperature=0 is greedy. parallel: "native" (fork at </guideline>, branches decode as rows
    of one batch), "sequential" (same structure, mask and positions, one branch after another: the
    speed baseline) or "off" (plain decoding; tags are ordinary tokens).

    max_new_tokens counts every token of every branch, injected tags included; max_branch_tokens
    caps one step (injected tokens included). step_repetition_penalty applies, HF-style, to the
    tokens a step has already sampled, inside steps only. logprobs are those of the distribution
    actually sampled from (after processors, penalty, temperature, top-k/top-p); for greedy rows,
    of the processed logits at temperature 1.
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

        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.top_k == -1 or (isinstance(self.top_k, int) and self.top_k >= 1)):
            raise bad(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise bad(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.max_branch_tokens is not None and not (
            isinstance(self.max_branch_tokens, int) and self.max_branch_tokens >= 1
        ):
            raise bad(f"max_branch_tokens must be None or an int >= 1, got {self.max_branch_tokens!r}")
        if not (isinstance(self.n, int) and self.n >= 1):
            raise bad(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an int or None, got {self.seed!r}")
        if self.parallel not in PARALLEL_MODES:
            raise bad(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if not self.step_repetition_penalty > 0:
            raise bad(f"step_repetition_penalty must be > 0, got {self.step_repetition_penalty!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if self.stop_token_ids is not None and any(not isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of ints")
        if self.logits_processors is not None and any(not callable(f) for f in self.logits_processors):
            raise bad("logits_processors must be callables fn(visible_token_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
