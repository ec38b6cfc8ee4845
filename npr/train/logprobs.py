"""Per-token log-probs of canonical trajectories under the spec §2 layout (the trainer's forward).

Several trajectories pack back to back into one row (varlen, no padding). Token i of the packed
row may attend key j  <=>  seq_start[i] <= j <= i  and not  hole_start[i] <= j < hole_end[i]
(the hole is the earlier sibling steps of i's step, npr.format.Layout.mask_holes, shifted to
packed indices). Token i is scored from the logits of token i-1 (its predecessor in canonical
order, which is always visible to it when i is a sampled token: a step's first sampled token
follows its injected label, never a sibling's last token).

This module fixes the API the trainer and the integrations use. `token_logprobs` runs npr's
decoder with npr.ops.layout_attention (the mask as three [T] tensors); `token_logprobs_reference`
is the dense-mask oracle (one [T, T] mask: tests, tiny inputs and models other than npr's).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from npr.format import Layout
from npr.ops.layout_attention import LayoutAttentionPlan
from npr.ref.layout_attention import layout_mask


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Trajectories packed into one row. All tensors are torch.long/bool on one device, [T]
    except cu_seqlens [B+1]."""

    input_ids: torch.Tensor    # [T] long
    position_ids: torch.Tensor  # [T] long, spec §2 positions within each trajectory
    seq_start: torch.Tensor    # [T] long, packed index of the first token of i's trajectory
    hole_start: torch.Tensor   # [T] long, packed index; empty hole: hole_start == hole_end
    hole_end: torch.Tensor     # [T] long
    loss_mask: torch.Tensor    # [T] bool, True = token i is scored (predicted from token i-1)
    cu_seqlens: torch.Tensor   # [B+1] long, trajectory b is [cu_seqlens[b], cu_seqlens[b+1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_scored(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    def dense_mask(self) -> torch.Tensor:
        """bool [T, T], True = may attend: the reference for the hole representation."""
        return layout_mask(self.seq_start, self.hole_start, self.hole_end)


def pack(items: Sequence[tuple[Sequence[int], Layout, Sequence[bool]]]) -> PackedBatch:
    """items: (token_ids [L] (prompt + response, canonical order), its Layout (npr.format.layout),
    loss_mask [L] (True on tokens to score: sampled response tokens, never the prompt or
    injected tokens)) -> one PackedBatch.

    Raises ValueError when lengths disagree or a scored token is the first of its trajectory or
    cannot see its predecessor (its layout would score it from a sibling)."""
    if not items:
        raise ValueError("pack: no trajectories")
    ids, pos, start, hs, he, lm, cu = [], [], [], [], [], [], [0]
    for b, (tokens, lay, mask) in enumerate(items):
        L = len(tokens)
        if lay.total_tokens != L or len(mask) != L:
            raise ValueError(f"pack: trajectory {b} has {L} tokens but its layout has "
                             f"{lay.total_tokens} and its loss mask {len(mask)}")
        m = torch.as_tensor([bool(x) for x in mask], dtype=torch.bool)
        if L and bool(m[0]):
            raise ValueError(f"pack: trajectory {b} scores its first token (nothing predicts it)")
        h0, h1 = lay.hole_start, lay.hole_end
        prev = torch.arange(L) - 1
        bad = m & (prev >= h0) & (prev < h1)
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"pack: trajectory {b} scores token {t}, whose predecessor is a "
                             f"sibling step it cannot see (an injected <step> must not be scored)")
        off = cu[-1]
        ids.append(torch.as_tensor([int(x) for x in tokens], dtype=torch.long))
        pos.append(lay.position_ids)
        start.append(torch.full((L,), off, dtype=torch.long))
        empty = h0 == h1
        hs.append(torch.where(empty, off, h0 + off))
        he.append(torch.where(empty, off, h1 + off))
        lm.append(m)
        cu.append(off + L)
    return PackedBatch(input_ids=torch.cat(ids), position_ids=torch.cat(pos),
                       seq_start=torch.cat(start), hole_start=torch.cat(hs),
                       hole_end=torch.cat(he), loss_mask=torch.cat(lm),
                       cu_seqlens=torch.tensor(cu, dtype=torch.long))


def token_logprobs_reference(model: torch.nn.Module, batch: PackedBatch,
                             temperature: float = 1.0) -> torch.Tensor:
    """Dense-mask oracle: model(input_ids [1, T], position_ids, attention_mask [T, T]) ->
    logprobs [T] fp32, lp[i] = log softmax(logits[i-1] / temperature)[input_ids[i]] where
    loss_mask[i], else 0. Differentiable; memory O(T^2 + T*V)."""
    return _forward_logprobs(model, batch, lambda: batch.dense_mask()[None], temperature)


def _forward_logprobs(model: torch.nn.Module, batch: PackedBatch, mask: Callable[[], Any],
                      temperature: float) -> torch.Tensor:
    """model(input_ids [1, T], position_ids [1, T], attention_mask=mask()) -> logprobs [T] fp32
    (gather_logprobs). mask is built only after the temperature is checked."""
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    out = model(batch.input_ids[None], position_ids=batch.position_ids[None],
                attention_mask=mask())
    logits = (out.logits if hasattr(out, "logits") else out)[0]  # [T, V]
    return gather_logprobs(logits, batch, temperature)


def gather_logprobs(logits: torch.Tensor, batch: PackedBatch, temperature: float) -> torch.Tensor:
    """logits: [T, V] (row i predicts token i+1) -> [T] fp32, scored tokens only."""
    T = batch.num_tokens
    lp = torch.zeros(T, dtype=torch.float32, device=logits.device)
    idx = batch.loss_mask.nonzero()[:, 0]
    if idx.numel():
        rows = torch.log_softmax(logits[idx - 1].float() / temperature, dim=-1)
        lp = lp.index_put((idx,), rows.gather(1, batch.input_ids[idx, None])[:, 0])
    return lp


def uses_layout_attention(model: torch.nn.Module) -> bool:
    """True when model (or the module a DDP wrapper holds) is npr's decoder, whose forward takes
    a LayoutAttentionPlan as its attention mask; other models (transformers') get the dense mask."""
    from npr.models.llama import LlamaDecoder

    return isinstance(getattr(model, "module", model), LlamaDecoder)


def token_logprobs(model: torch.nn.Module, batch: PackedBatch,
                   temperature: float = 1.0) -> torch.Tensor:
    """The trainer's forward: -> logprobs [T] fp32 (0 where not scored), differentiable.

    npr's decoder attends under the layout through npr.ops.layout_attention (no [T, T] tensor;
    memory linear in T); any other model gets token_logprobs_reference's dense mask. The call
    goes through model(...) either way, so DDP / FSDP2 wrappers see their forward."""
    if not uses_layout_attention(model):
        return token_logprobs_reference(model, batch, temperature)
    return _forward_logprobs(
        model, batch,
        lambda: LayoutAttentionPlan.build(batch.seq_start, batch.hole_start, batch.hole_end),
        temperature)
