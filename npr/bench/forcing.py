"""A logits processor that forces the NPR structure: tags and labels at fixed points, content
tokens from the model. Used by tests (so forks happen with tiny random models) and by
`npr bench speedup` / `npr bench throughput` (fixed-shape workloads on real weights).

It decides from the row's visible context alone (prompt + what the row sees), so the engine, the
sequential baseline and a naive recomputing decoder all see the same decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from npr.tags import TAGS


@dataclass
class ForcedStructure:
    """Completion = (free prefix_tokens, block) x len(branches), free final_tokens, EOS.
    block = <guideline> (<plan> "k:" plan_tokens </plan>) x n </guideline> steps <takeaway>
    takeaway_tokens </takeaway>; step k holds step_tokens(block, k) content tokens."""

    tag_ids: dict[str, int]
    labels: Sequence[Sequence[int]]          # labels[k-1] = ids of "k:"
    eos_id: int
    prompt_len: int
    branches: Sequence[int]                  # n per block
    step_tokens: int | Callable[[int, int], int] = 8
    plan_tokens: int = 2
    prefix_tokens: int = 2
    takeaway_tokens: int = 4
    final_tokens: int = 4

    def __post_init__(self) -> None:
        self._banned = torch.tensor(sorted(set(self.tag_ids.values()) | {self.eos_id}), dtype=torch.long)

    def _step_len(self, block: int, k: int) -> int:
        st = self.step_tokens
        return st(block, k) if callable(st) else int(st)

    def next_token(self, visible: Sequence[int]) -> int | None:
        """The forced next token, or None when the model chooses (tags and EOS banned then)."""
        # Called for every row at every step, on contexts that grow: list methods (C loops)
        # find the last of each tag instead of a Python loop over the whole context.
        ids = list(visible[self.prompt_len:])
        T = self.tag_ids
        rev, end = ids[::-1], len(ids) - 1
        last: dict[str, int] = {}
        for name in TAGS:
            try:
                last[name] = end - rev.index(T[name])
            except ValueError:
                last[name] = -1
        blocks_done = ids.count(T["</takeaway>"])
        plans = ids[last["<guideline>"] + 1:].count(T["</plan>"])  # of the open guideline
        n_here = self.branches[blocks_done] if blocks_done < len(self.branches) else 0
        if last["<step>"] > last["</step>"]:                      # inside a step
            start = last["<step>"]
            k = self._step_index(ids, start)
            content = len(ids) - start - 1 - len(self.labels[k - 1])
            if content >= self._step_len(blocks_done, k):
                return T["</step>"]
            return None
        if last["<takeaway>"] > last["</takeaway>"]:                # inside a takeaway
            return T["</takeaway>"] if len(ids) - last["<takeaway>"] - 1 >= self.takeaway_tokens else None
        if last["<guideline>"] > last["</guideline>"]:             # inside a guideline
            if last["<plan>"] > last["</plan>"] and last["<plan>"] > last["<guideline>"]:
                label = list(self.labels[plans])                  # this plan is number plans + 1
                done = len(ids) - last["<plan>"] - 1
                if done < len(label):
                    return label[done]
                return T["</plan>"] if done - len(label) >= self.plan_tokens else None
            return T["<plan>"] if plans < n_here else T["</guideline>"]
        # free text: before a block, or the final answer
        since = len(ids) - (last["</takeaway>"] + 1)
        if blocks_done < len(self.branches):
            return T["<guideline>"] if since >= self.prefix_tokens else None
        return self.eos_id if since >= self.final_tokens else None

    def _step_index(self, ids: list[int], start: int) -> int:
        """k of the step opened at ids[start]: read from its label tokens."""
        for k, lab in enumerate(self.labels, start=1):
            if ids[start + 1: start + 1 + len(lab)] == list(lab):
                return k
        raise ValueError("ForcedStructure: a step without its injected label")

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Writes logits in place (the engine hands each processor its own copy of the row):
        a forced token keeps its logit, every other token goes to -inf; a free position bans
        the tags and EOS."""
        tok = self.next_token(visible)
        if tok is not None:
            keep = logits[tok].clone()
            logits.fill_(float("-inf"))
            logits[tok] = keep
            return logits
        logits[self._banned.to(logits.device)] = float("-inf")
        return logits
