"""Supervised fine-tuning under the parallel layout (spec §4 stage 2; also causal SFT).

    SFTExample(token_ids, prompt_len, parallel=True)        one trajectory, canonical order
    encode_example(tokenizer, prompt, response, parallel)  text -> SFTExample, tokenised the
                                                           way the engine decodes (tags whole,
                                                           step labels as injected)
    sft_item(example, tag_ids, labels, max_branches)       -> (ids, Layout, loss_mask) for pack()
    injected_mask(token_ids, layout, tag_ids, labels)      the tokens the engine would inject
    sft_loss(model, batch, weight)                         -> (loss, stats)
    SFTTrainer(cfg, model, tokenizer, examples).run()      epochs of global batches

Loss = mean -log pi over the scored tokens of the GLOBAL batch (all micro-batches, all ranks).
Scored: the response tokens a model writes itself. Under the parallel layout that excludes
what the engine injects at decode time (<step>, the "k:" label after it, <takeaway>): a model
never samples them, and a step's <step> has no visible predecessor to be scored from.
"""
from __future__ import annotations

import copy
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from npr import format as fmt
from npr.format import Layout
from npr.tags import TAGS
from npr.train import checkpoint as ckpt
from npr.train.config import SFTConfig, to_dict
from npr.train.dist import DistContext, gather_full_state, init_distributed, set_threads, wrap_model
from npr.train.logprobs import PackedBatch, pack, token_logprobs
from npr.train.loop import run_steps
from npr.train.rollout import causal_layout, split_by_tokens
from npr.train.update import build_optimizer, build_scheduler, dummy_batch, update


@dataclass(frozen=True)
class SFTExample:
    token_ids: tuple[int, ...]  # prompt + response, canonical order (steps one after another)
    prompt_len: int
    parallel: bool = True       # False: causal (no tags, plain positions)

    def __post_init__(self) -> None:
        if not 0 < self.prompt_len < len(self.token_ids):
            raise ValueError(f"SFTExample: need 0 < prompt_len < {len(self.token_ids)} tokens, "
                             f"got prompt_len={self.prompt_len}")


_LABEL = re.compile(r"\s*(\d+)\s*:")


def encode_example(tokenizer: Any, prompt: str | Sequence[int], response: str,
                   parallel: bool = True) -> SFTExample:
    """A trajectory from text, tokenised as the engine would produce it: each tag one token,
    each step's "k:" label the ids the engine injects (npr.tokenizer.step_label_ids), the
    text between tags encoded piece by piece, whitespace-only text between tags dropped (the
    token-level layout allows none). parallel=False: the response encoded as plain text."""
    from npr.tokenizer import step_label_ids, tag_ids

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    p_ids = enc(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not parallel:
        return SFTExample(tuple(p_ids + enc(response)), len(p_ids), parallel=False)
    tags = tag_ids(tokenizer)
    out: list[int] = []
    prev_tag = None
    for piece in re.split("(" + "|".join(re.escape(t) for t in TAGS) + ")", response):
        if piece in tags:
            out.append(tags[piece])
            prev_tag = piece
            continue
        if not piece.strip() and prev_tag is not None:
            continue  # whitespace between tags
        if prev_tag == "<step>":
            m = _LABEL.match(piece)
            if m is None:
                raise ValueError(f"encode_example: a step does not start with its 'k:' label: "
                                 f"{piece[:40]!r}")
            out += step_label_ids(tokenizer, int(m.group(1)))
            piece = piece[m.end():]
        if piece:
            out += enc(piece)
        prev_tag = None
    return SFTExample(tuple(p_ids + out), len(p_ids), parallel=True)


def injected_mask(token_ids: Sequence[int], layout: Layout, tag_ids: dict[str, int],
                  labels: Sequence[Sequence[int]]) -> list[bool]:
    """[L]: True on each step's <step> and its "k:" label tokens (labels[k-1], as
    npr.tokenizer.step_label_ids gives them) and on <takeaway>. Raises ValueError when a step
    does not start with its label (the trajectory is not what the engine would decode)."""
    ids = [int(t) for t in token_ids]
    out = [False] * len(ids)
    steps = layout.step_ids.tolist()
    k_in_block, prev_sid, prev_block = 0, 0, 0
    blocks = layout.block_ids.tolist()
    for i, sid in enumerate(steps):
        if sid and sid != prev_sid:
            k_in_block = k_in_block + 1 if blocks[i] == prev_block else 1
            prev_block = blocks[i]
            lab = list(labels[k_in_block - 1]) if k_in_block <= len(labels) else None
            if ids[i] != tag_ids["<step>"] or lab is None or ids[i + 1:i + 1 + len(lab)] != lab:
                raise ValueError(f"injected_mask: step {k_in_block} at token {i} does not start "
                                 f"with <step> and its label {lab}")
            for j in range(i, i + 1 + len(lab)):
                out[j] = True
        prev_sid = sid
    for i in range(layout.prompt_len, len(ids)):
        if ids[i] == tag_ids["<takeaway>"]:
            out[i] = True
    return out


def sft_item(ex: SFTExample, tag_ids: dict[str, int] | None = None,
             labels: Sequence[Sequence[int]] = (), max_branches: int = fmt.DEFAULT_MAX_BRANCHES
             ) -> tuple[list[int], Layout, list[bool]]:
    """-> (token ids, layout, loss mask) for npr.train.logprobs.pack. Raises FormatError when a
    parallel example's structure is invalid."""
    ids = list(ex.token_ids)
    P = ex.prompt_len
    if not ex.parallel:
        return ids, causal_layout(len(ids), P), [False] * P + [True] * (len(ids) - P)
    if tag_ids is None:
        raise ValueError("sft_item: parallel examples need the tag ids")
    lay = fmt.layout(ids, tag_ids, prompt_len=P, max_branches=max_branches)
    inj = injected_mask(ids, lay, tag_ids, labels)
    return ids, lay, [i >= P and not inj[i] for i in range(len(ids))]


def sft_loss(model: nn.Module, batch: PackedBatch, weight: float,
             temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (-weight * sum of the scored log-probs, stats: nll_sum, tokens)."""
    lp = token_logprobs(model, batch, temperature)
    s = lp[batch.loss_mask].sum()
    return -weight * s, {"nll_sum": -s.detach(), "tokens": batch.loss_mask.sum()}


class SFTTrainer:
    """Epochs over `examples` in seeded order, cfg.batch_sequences trajectories per optimizer
    step (global; each rank takes its share), micro-batches of cfg.train.micro_batch_tokens.
    Resumes from cfg.train.out_dir's latest checkpoint (cursor = examples consumed)."""

    def __init__(self, cfg: SFTConfig, model: nn.Module, tokenizer: Any,
                 examples: Sequence[SFTExample], *, ctx: DistContext | None = None,
                 max_branches: int = fmt.DEFAULT_MAX_BRANCHES) -> None:
        from npr.tokenizer import step_label_ids, tag_ids

        if not examples:
            raise ValueError("SFTTrainer: no examples")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.ctx = ctx or init_distributed(cfg.dist.backend)
        if cfg.batch_sequences % self.ctx.world_size:
            raise ValueError(f"batch_sequences ({cfg.batch_sequences}) must be a multiple of the "
                             f"world size ({self.ctx.world_size})")
        tags = labels = None
        if any(e.parallel for e in examples):
            tags = tag_ids(tokenizer)
            labels = [step_label_ids(tokenizer, k) for k in range(1, max_branches + 1)]
        self.items = [sft_item(e, tags, labels or (), max_branches) for e in examples]
        self.steps_per_epoch = max(1, len(self.items) // cfg.batch_sequences)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.step, self.cursor = 0, 0
        self.resumed_from = ckpt.latest_checkpoint(cfg.train.out_dir) if cfg.train.resume else None
        state = (ckpt.load_weights(self.resumed_from, model, self.ctx, stage=cfg.stage)
                 if self.resumed_from else None)
        self.model = model
        self.sharded = cfg.dist.strategy == "fsdp" and self.ctx.distributed
        self.full_model = copy.deepcopy(model) if self.sharded else model
        self.train_model = wrap_model(model, self.ctx, cfg.dist.strategy)
        self.optimizer = build_optimizer(self.train_model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        if state is not None:
            ckpt.load_training_state(self.resumed_from, state, optimizer=self.optimizer,
                                     scheduler=self.scheduler, ctx=self.ctx)
            self.step, self.cursor = int(state["step"]), int(state["cursor"])
        set_threads(self.ctx)

    def _batch(self, step: int) -> list[int]:
        """Item indices of this rank's share of global batch `step` (drop-last epochs)."""
        B = self.cfg.batch_sequences
        epoch, k = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.items)))
        random.Random(self.cfg.train.seed * 1_000_003 + epoch).shuffle(order)
        glob = order[k * B:(k + 1) * B]
        share = B // self.ctx.world_size
        return glob[self.ctx.rank * share:(self.ctx.rank + 1) * share]

    def train_step(self) -> dict[str, float]:
        idx = self._batch(self.step)
        n_tok = [sum(self.items[i][2]) for i in idx]
        (g_tok,) = self.ctx.sum_floats(sum(n_tok))
        w = 1.0 / g_tok if g_tok else 0.0
        parts = split_by_tokens([len(self.items[i][0]) for i in idx], self.cfg.train.micro_batch_tokens)

        def loss_fn(k: int | None):
            if k is None:
                return sft_loss(self.train_model, dummy_batch(), 0.0)
            return sft_loss(self.train_model, pack([self.items[idx[j]] for j in parts[k]]), w)

        t0 = time.perf_counter()
        st = update(self.train_model, self.optimizer, self.scheduler, len(parts), loss_fn,
                    self.ctx, self.cfg.optim.max_grad_norm)
        dt = time.perf_counter() - t0
        self.step += 1
        self.cursor += self.cfg.batch_sequences
        (tt,) = self.ctx.sum_floats(sum(len(self.items[i][0]) for i in idx))
        return {"loss": st.loss, "nll": st.sums.get("nll_sum", 0.0) / max(g_tok, 1.0),
                "grad_norm": st.grad_norm, "lr": self.scheduler.get_last_lr()[0],
                "tokens": g_tok, "train_tok_s": tt / dt if dt > 0 else 0.0,
                "forward_s": st.forward_s, "backward_s": st.backward_s, "step_s": dt,
                "epoch": self.step / self.steps_per_epoch}

    def save(self) -> str:
        if self.sharded:
            full = gather_full_state(self.train_model)
            with torch.no_grad():
                for n, p in self.full_model.named_parameters():
                    p.copy_(full[n])
        return ckpt.save_checkpoint(
            self.cfg.train.out_dir, self.step, model=self.full_model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler,
            state={"stage": self.cfg.stage, "cursor": self.cursor, "config": to_dict(self.cfg)},
            ctx=self.ctx, sharded_optimizer=self.sharded, keep_last=self.cfg.train.keep_last)

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None
            ) -> list[dict[str, float]]:
        """Steps until total_steps (npr.train.loop.run_steps)."""
        return run_steps(self, self.total_steps, on_step)


def load_sft_jsonl(path: str, tokenizer: Any, template: str = "{problem}") -> list[SFTExample]:
    """Rows {"prompt": str, "response": str, "parallel": bool (default true)}; the prompt text is
    template.format(problem=prompt). Raises ValueError naming the line of a bad row."""
    from npr.jsonl import read_rows

    out = []
    for n, row in read_rows(path, ("prompt", "response")):
        try:
            out.append(encode_example(tokenizer, template.format(problem=row["prompt"]),
                                      row["response"], bool(row.get("parallel", True))))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from e
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def run_from_config(cfg: SFTConfig, ctx: DistContext | None = None) -> list[dict[str, float]]:
    """The generic run (`python -m npr.train sft`): model.path, a JSONL data.path of
    {"prompt", "response"}; model.add_tags adds the tag tokens first."""
    import npr
    from npr.tokenizer import add_tag_tokens

    if not cfg.model.path or not cfg.data.path:
        raise ValueError("model.path and data.path are required")
    ctx = ctx or init_distributed(cfg.dist.backend, cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    model = npr.load_model(cfg.model.path, dtype=cfg.model.dtype, device=str(ctx.device))
    tok = npr.load_tokenizer(cfg.model.path)
    if cfg.model.add_tags:
        add_tag_tokens(tok, model)
    try:
        examples = load_sft_jsonl(cfg.data.path, tok, cfg.data.template)
        return SFTTrainer(cfg, model, tok, examples, ctx=ctx).run()
    finally:
        ctx.close()
