"""What generate() returns (names follow vLLM's RequestOutput / CompletionOutput)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionOutput:
    """One sample. Every per-token list is in canonical order (spec/NPR.md §2): trunk tokens, and
    at each fork the n steps one after another, then the takeaway and what follows."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float | None] | None   # None where injected; the whole list None if not asked
    position_ids: list[int]
    branch_ids: list[int]                 # 0 outside steps, else a per-sample step id (1, 2, ...)
    injected: list[bool]                  # True for tags/labels the engine inserted
    finish_reason: str                    # "stop" | "length" | "abort" | "invalid_structure"
    structure_valid: bool
    stats: dict[str, Any] = field(default_factory=dict)
    finish_detail: str = ""

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return float(sum(lp for lp in self.logprobs if lp is not None))


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
