"""Rollouts: prompts -> npr.Engine (same process, same model object) -> Rollout records ->
the trainer's PackedBatch (npr.format.layout + npr.train.logprobs.pack).

Which tokens learn (spec §4): exactly the tokens the engine sampled, i.e. the response tokens
with CompletionOutput.injected False; each is scored from the logits of its predecessor in
canonical order, which for a step's first sampled token is the step's injected label. Injected
tokens (<step>, the "k:" labels, <takeaway>) carry no loss; the tags the model writes itself
(</plan>, </guideline>, </step>, ...) learn like any other token. The ids are the engine's
sampled ids: nothing is re-tokenised from text.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from npr import format as fmt
from npr.format import FormatError, Layout
from npr.train.logprobs import PackedBatch, pack


@dataclass
class Rollout:
    group: int                  # the prompt's global draw number: rollouts of a prompt share it
    sample: int
    prompt_ids: list[int]
    token_ids: list[int]        # response, canonical order (spec §2)
    logprobs: list[float | None]  # engine's sampled log-probs, None where injected
    injected: list[bool]
    finish_reason: str
    structure_valid: bool
    text: str
    parallel: str               # the SamplingParams.parallel it was decoded with
    stats: dict[str, Any] = field(default_factory=dict)
    layout: Layout | None = None  # filled by `lay_out` (None: structure invalid)

    @property
    def num_sampled(self) -> int:
        return sum(1 for x in self.injected if not x)

    @property
    def forked_parallel(self) -> bool:
        """>= 1 executed block with >= 2 branches (the parallel rate's event)."""
        return self.layout is not None and any(n >= 2 for n in self.layout.branches)


def from_outputs(request_outputs: Sequence[Any], groups: Sequence[int],
                 parallel: str) -> list[Rollout]:
    """Engine RequestOutputs (one per prompt, n samples each) -> Rollouts."""
    if len(request_outputs) != len(groups):
        raise ValueError(f"from_outputs: {len(request_outputs)} outputs but {len(groups)} groups")
    out = []
    for ro, g in zip(request_outputs, groups):
        for c in ro.outputs:
            if c.logprobs is None:
                raise ValueError("from_outputs: rollouts need logprobs=True in SamplingParams")
            out.append(Rollout(group=int(g), sample=c.index, prompt_ids=list(ro.prompt_token_ids),
                               token_ids=list(c.token_ids), logprobs=list(c.logprobs),
                               injected=list(c.injected), finish_reason=c.finish_reason,
                               structure_valid=bool(c.structure_valid), text=c.text,
                               parallel=parallel, stats=dict(c.stats)))
    return out


def generate(engine: Any, prompt_ids: Sequence[Sequence[int]], params: Any,
             groups: Sequence[int], max_branches: int | None = None) -> list[Rollout]:
    """prompts (token ids) -> engine.generate (one SamplingParams or one per prompt, logprobs
    on) -> laid-out Rollouts, n per prompt, group = groups[i] for prompt i."""
    outs = engine.generate(input_ids=[list(p) for p in prompt_ids], sampling_params=params)
    plist = params if isinstance(params, (list, tuple)) else [params] * len(outs)
    rollouts: list[Rollout] = []
    for o, g, sp in zip(outs, groups, plist):
        rollouts += from_outputs([o], [g], sp.parallel)
    mb = max_branches if max_branches is not None else engine.max_branches
    for r in rollouts:
        lay_out(r, engine.tag_ids, mb)
    return rollouts


def causal_layout(total: int, prompt_len: int) -> Layout:
    """The layout of a plain (parallel="off") trajectory: positions 0..L-1, no steps, no holes."""
    z = torch.zeros(total, dtype=torch.long)
    return Layout(position_ids=torch.arange(total), step_ids=z, block_ids=z.clone(),
                  hole_start=z.clone(), hole_end=z.clone(), prompt_len=prompt_len,
                  step_lengths=[])


def lay_out(r: Rollout, tag_ids: dict[str, int] | None, max_branches: int) -> Layout | None:
    """Sets and returns r.layout: the §2 layout for native/sequential rollouts, causal for
    parallel="off"; None when the structure is invalid (no layout can be built)."""
    ids = r.prompt_ids + r.token_ids
    if r.parallel == "off":
        r.layout = causal_layout(len(ids), len(r.prompt_ids))
        return r.layout
    if tag_ids is None:
        raise ValueError("lay_out: parallel rollouts need the tag ids")
    if not r.structure_valid or r.finish_reason in ("invalid_structure", "abort"):
        r.layout = None
        return None
    try:
        r.layout = fmt.layout(ids, tag_ids, prompt_len=len(r.prompt_ids),
                              max_branches=max_branches)
    except FormatError:
        r.layout = None
    return r.layout


def loss_mask(r: Rollout) -> list[bool]:
    """[L] over prompt + response: True on the sampled (not injected) response tokens."""
    return [False] * len(r.prompt_ids) + [not x for x in r.injected]


def pack_rollouts(rollouts: Sequence[Rollout]) -> PackedBatch:
    """Rollouts with a layout -> one PackedBatch (canonical order, several per row)."""
    items = []
    for r in rollouts:
        if r.layout is None:
            raise ValueError(f"pack_rollouts: rollout (group {r.group}, sample {r.sample}) has "
                             "no layout (structure invalid, or lay_out not called)")
        items.append((r.prompt_ids + r.token_ids, r.layout, loss_mask(r)))
    return pack(items)


def engine_logprobs(rollouts: Sequence[Rollout]) -> torch.Tensor:
    """[T] fp32 in pack_rollouts' order: the engine's sampled log-prob on each scored token,
    0 elsewhere."""
    out: list[float] = []
    for r in rollouts:
        out += [0.0] * len(r.prompt_ids)
        out += [0.0 if inj else float(lp) for lp, inj in zip(r.logprobs, r.injected)]
    return torch.tensor(out, dtype=torch.float32)


def split_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy, order-keeping split of sequences into micro-batches of <= max_tokens tokens (a
    longer sequence goes alone). -> lists of indices."""
    if max_tokens < 1:
        raise ValueError(f"split_by_tokens: max_tokens must be >= 1, got {max_tokens}")
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        out.append(cur)
    return out
