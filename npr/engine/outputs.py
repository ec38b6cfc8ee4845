"""What generate() returns (names follow vLLM's RequestOutput / CompletionOutput)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from npr.tags import GUIDELINE_OPEN, TAKEAWAY_CLOSE


@dataclass
class CompletionOutput:
    """One sample. Every per-token list is in canonical order (spec/NPR.md §2): trunk tokens, and
    at each fork the n steps one after another, then the takeaway and what follows.

    The spec §2 mask of a completion needs, per token, its step (branch_ids) and its block: the
    steps of one fork are contiguous, so a fork is a maximal run of tokens with branch_id > 0
    (`fork_ids`); `block_ids` extends each fork to its whole block, <guideline> .. </takeaway>,
    as npr.format.Layout.block_ids does (`derive_block_ids`)."""

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
    # 0 outside blocks, else the 1-based fork number over its whole block (derive_block_ids);
    # None when the engine did not record it (npr.integrations.layout derives it then).
    block_ids: list[int] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return float(sum(lp for lp in self.logprobs if lp is not None))

    @property
    def fork_ids(self) -> list[int]:
        """Per token: 0 outside steps, else the 1-based number of the fork its step belongs to."""
        return fork_ids(self.branch_ids)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def fork_ids(branch_ids: Sequence[int]) -> list[int]:
    """branch_ids [L] (0 outside steps) -> [L]: 0 outside steps, k on the steps of the k-th fork.
    A fork's steps stand back to back in canonical order (no token between them, spec §1), so a
    fork is a maximal run of step tokens; forks are separated by at least their takeaway."""
    out, k, prev = [], 0, 0
    for b in branch_ids:
        b = int(b)
        if b and not prev:
            k += 1
        out.append(k if b else 0)
        prev = b
    return out


def derive_block_ids(token_ids: Sequence[int], branch_ids: Sequence[int],
                     tag_ids: Mapping[str, int] | None) -> list[int]:
    """[L] block ids of a completion, as npr.format.Layout.block_ids on a valid structure: 0
    outside blocks, k from the k-th fork's <guideline> (the last one before its first step)
    through its </takeaway> (the first one after its last step; the end of the completion when
    it was never closed). Only the forks are read from the tokens' record; the tags only extend
    them. Raises ValueError when the completion forked but tag_ids is None."""
    forks = fork_ids(branch_ids)
    L = len(forks)
    if len(token_ids) != L:
        raise ValueError(f"derive_block_ids: {len(token_ids)} token ids but {L} branch ids")
    out = [0] * L
    if not any(forks):
        return out
    if tag_ids is None:
        raise ValueError("derive_block_ids: the completion forked; its block spans need the tag "
                         "token ids (pass tag_ids=engine.tag_ids)")
    g_open, t_close = int(tag_ids[GUIDELINE_OPEN]), int(tag_ids[TAKEAWAY_CLOSE])
    runs: list[tuple[int, int]] = []  # [first, last] token index of each fork's steps
    for i, f in enumerate(forks):
        if f and (i == 0 or forks[i - 1] != f):
            runs.append((i, i))
        elif f:
            runs[-1] = (runs[-1][0], i)
    prev_end = -1
    for k, (a, e) in enumerate(runs, 1):
        nxt = runs[k][0] if k < len(runs) else L
        start = next((j for j in range(a - 1, prev_end, -1) if int(token_ids[j]) == g_open), a)
        end = next((j for j in range(e + 1, nxt) if int(token_ids[j]) == t_close), nxt - 1)
        for j in range(start, end + 1):
            out[j] = k
        prev_end = end
    return out
