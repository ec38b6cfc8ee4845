"""The RL loop (spec/NPR.md §4): rollouts from npr.Engine in this process -> rewards ->
group advantages -> log-probs under the §2 layout -> policy loss (PAPO / DAPO / GRPO preset) ->
optimizer step -> Engine.update_weights. A stage is a config + a reward function + a prompt
source on top of `RLTrainer`.

Distribution: each rank rolls out its share of every step's prompts with its own engine (groups
never split across ranks), the batch statistics and token counts are summed over ranks before
the loss, and DDP / FSDP2 syncs the gradients (npr.train.dist).

Determinism: request seeds derive from (train.seed, the prompt's global draw number), so the
samples of a prompt do not depend on the rank, the engine's history or a resume.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from npr import format as fmt
from npr.train import checkpoint as ckpt
from npr.train.advantages import equal_reward_groups, group_advantages
from npr.train.config import RLConfig, to_dict
from npr.train.data import Prompt, PromptSource
from npr.train.dist import DistContext, gather_full_state, init_distributed, set_threads, wrap_model
from npr.train.logprobs import token_logprobs
from npr.train.losses import policy_loss, token_weights
from npr.train.loop import run_steps
from npr.train.rewards import RewardFn, Scored, soft_overlong_penalty
from npr.train.rollout import Rollout, pack_rollouts, split_by_tokens
from npr.train.rollout import generate as rollout_gen
from npr.train.update import build_optimizer, build_scheduler, dummy_batch, update

# prompt, its token ids -> the logits processors of its request (None: none)
ProcessorsFn = Callable[[Prompt, list[int]], Sequence[Any] | None]


def request_seed(run_seed: int, draw: int) -> int:
    return (run_seed * 1_000_003 + draw * 7_919 + 17) % (2**31 - 1)


class RLTrainer:
    """cfg: RLConfig; model: an npr LlamaDecoder (this rank's copy, unwrapped); tokenizer: its
    tokenizer (tags added for parallel stages); reward_fn(texts, golds) -> [Scored];
    prompts(draw) -> Prompt. Resumes from cfg.train.out_dir's latest checkpoint when
    cfg.train.resume. The engine shares `model` (DDP / one process) or holds a full copy (FSDP)."""

    def __init__(self, cfg: RLConfig, model: nn.Module, tokenizer: Any, reward_fn: RewardFn,
                 prompts: PromptSource, *, ctx: DistContext | None = None,
                 processors: ProcessorsFn | None = None) -> None:
        import npr

        self.cfg, self.tokenizer, self.reward_fn, self.prompts = cfg, tokenizer, reward_fn, prompts
        self.ctx = ctx or init_distributed(cfg.dist.backend)
        self.processors = processors
        R = cfg.rollout
        if R.prompts_per_step % self.ctx.world_size:
            raise ValueError(f"rollout.prompts_per_step ({R.prompts_per_step}) must be a multiple "
                             f"of the world size ({self.ctx.world_size}): groups never split")
        self.step, self.cursor = 0, 0
        self.resumed_from = ckpt.latest_checkpoint(cfg.train.out_dir) if cfg.train.resume else None
        state = None
        if self.resumed_from:
            state = ckpt.load_weights(self.resumed_from, model, self.ctx, stage=cfg.stage)
        self.model = model
        fsdp = cfg.dist.strategy == "fsdp" and self.ctx.distributed
        self.engine_model = copy.deepcopy(model) if fsdp else model
        self.train_model = wrap_model(model, self.ctx, cfg.dist.strategy)
        self.sharded = fsdp
        self.optimizer = build_optimizer(self.train_model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim,
                                         cfg.train.steps * cfg.algo.minibatches)
        if state is not None:
            ckpt.load_training_state(self.resumed_from, state, optimizer=self.optimizer,
                                     scheduler=self.scheduler, ctx=self.ctx)
            self.step, self.cursor = int(state["step"]), int(state["cursor"])
        self.engine = npr.Engine(self.engine_model, tokenizer, kv_cache_tokens=R.kv_cache_tokens,
                                 max_rows=R.max_rows, max_branches=R.max_branches,
                                 decode_weights=R.decode_weights, seed=cfg.train.seed)
        if R.parallel != "off" and self.engine.tag_ids is None:
            raise ValueError(f"rollout.parallel={R.parallel!r} needs the eight tag tokens in the "
                             "tokenizer (model.add_tags = true, or npr.tokenizer.add_tag_tokens)")
        self.threads = set_threads(self.ctx)

    # ------------------------------------------------------------------ rollouts
    def _prompt_ids(self, p: Prompt) -> list[int]:
        if p.ids is not None:
            return list(p.ids)
        text = p.text
        if self.cfg.rollout.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _params(self, p: Prompt, ids: list[int], draw: int):
        import npr

        R = self.cfg.rollout
        procs = self.processors(p, ids) if self.processors else None
        return npr.SamplingParams(
            temperature=R.temperature, top_p=R.top_p, top_k=R.top_k,
            max_new_tokens=R.max_new_tokens, max_branch_tokens=R.max_branch_tokens or None,
            n=R.samples_per_prompt, seed=request_seed(self.cfg.train.seed, draw),
            parallel=R.parallel, logits_processors=list(procs) if procs else None)

    def generate(self, draws: Sequence[int]) -> tuple[list[Rollout], list[Scored], list[str]]:
        """Rollouts of the prompts `draws` (this rank's), laid out and scored."""
        if not draws:
            return [], [], []
        prompts = [self.prompts(d) for d in draws]
        ids = [self._prompt_ids(p) for p in prompts]
        params = [self._params(p, i, d) for p, i, d in zip(prompts, ids, draws)]
        rollouts = rollout_gen(self.engine, ids, params, draws, self.cfg.rollout.max_branches)
        golds = [prompts[draws.index(r.group)].answer for r in rollouts]
        scored = self.reward_fn([r.text for r in rollouts], golds)
        if len(scored) != len(rollouts):
            raise ValueError(f"reward_fn returned {len(scored)} values for {len(rollouts)} rollouts")
        return rollouts, list(scored), golds

    def _valid(self, r: Rollout) -> bool:
        if r.layout is None:  # no layout: cannot be trained on
            return False
        return r.structure_valid or not self.cfg.algo.drop_invalid

    def _reward(self, r: Rollout, s: Scored) -> float:
        A, R = self.cfg.algo, self.cfg.rollout
        if not A.overlong:
            return s.reward
        cache = A.overlong_cache or R.max_new_tokens // 4
        return s.reward + soft_overlong_penalty(len(r.token_ids), R.max_new_tokens, cache)

    def collect(self) -> tuple[list[Rollout], list[float], dict[str, float]]:
        """This rank's share of one step's groups (DAPO: equal-reward groups dropped and
        refilled from further prompts, up to algo.max_refill_rounds extra rounds). Returns the
        kept rollouts, their rewards and (local) rollout metrics."""
        cfg, ctx = self.cfg, self.ctx
        P = cfg.rollout.prompts_per_step
        share = P // ctx.world_size
        kept: list[tuple[list[Rollout], list[float]]] = []
        m = dict(n=0.0, reward=0.0, correct=0.0, format_ok=0.0, parallel=0.0, valid=0.0,
                 gen_tokens=0.0, groups_dropped=0.0, groups_surplus=0.0)
        rounds = 0
        while True:
            base = self.cursor + rounds * P + ctx.rank * share
            draws = list(range(base, base + share)) if len(kept) < share else []
            rollouts, scored, _ = self.generate(draws)
            by_group: dict[int, list[int]] = {}
            for i, r in enumerate(rollouts):
                by_group.setdefault(r.group, []).append(i)
                rew = self._reward(r, scored[i])
                m["n"] += 1
                m["reward"] += rew
                m["correct"] += scored[i].correct
                m["format_ok"] += scored[i].format_ok
                m["parallel"] += _parallel_event(r)
                m["valid"] += self._valid(r)
                m["gen_tokens"] += r.num_sampled
            for g, idx in by_group.items():
                rs = [rollouts[i] for i in idx]
                rew = [self._reward(rollouts[i], scored[i]) for i in idx]
                if cfg.algo.drop_equal_groups:
                    eq = equal_reward_groups(torch.tensor(rew), torch.zeros(len(rs), dtype=torch.long),
                                             torch.tensor([self._valid(r) for r in rs]))
                    if bool(eq[0]):
                        m["groups_dropped"] += 1
                        continue
                    if len(kept) >= share:  # enough groups with signal already
                        m["groups_surplus"] += 1
                        continue
                kept.append((rs, rew))
            rounds += 1
            if not cfg.algo.drop_equal_groups or rounds > cfg.algo.max_refill_rounds:
                break
            short = torch.tensor([float(len(kept) < share)])
            if float(ctx.all_reduce_max(short)[0]) == 0.0:
                break
        self.cursor += rounds * P
        m["rounds"] = float(rounds)
        m["groups_kept"] = float(len(kept))
        flat = [r for rs, _ in kept for r in rs]
        rewards = [x for _, rew in kept for x in rew]
        return flat, rewards, m

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        A = cfg.algo
        t0 = time.perf_counter()
        rollouts, rewards, rm = self.collect()
        t_roll = time.perf_counter() - t0

        valid = torch.tensor([self._valid(r) for r in rollouts], dtype=torch.bool)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64),
                               torch.tensor([r.group for r in rollouts], dtype=torch.long),
                               valid, scale=A.scale, eps=A.eps, all_reduce=ctx.all_reduce_sum)
        train = [i for i in range(len(rollouts)) if bool(valid[i])]
        # Mini-batches: every M-th group (a group never splits).
        groups = sorted({rollouts[i].group for i in train})
        chunks = [set(groups[k::A.minibatches]) for k in range(A.minibatches)]
        loss_total, fwd_s, bwd_s, opt_s = 0.0, 0.0, 0.0, 0.0
        sums: dict[str, float] = {}
        grad_norm, trained_tokens = 0.0, 0.0
        old = self._old_logprobs(rollouts, train, chunks) if A.clip and A.minibatches > 1 else {}
        for chunk in chunks:
            mb = [i for i in train if rollouts[i].group in chunk]
            n_tok = [rollouts[i].num_sampled for i in mb]
            g_tok, g_seq = ctx.sum_floats(sum(n_tok), len(mb))
            w = token_weights(n_tok, A.aggregation, int(g_tok), int(g_seq))
            live = [(i, wi) for i, wi in zip(mb, w) if float(adv[i]) != 0.0]  # 0 carries no loss
            groups_mb = split_by_tokens(
                [len(rollouts[i].prompt_ids) + len(rollouts[i].token_ids) for i, _ in live],
                cfg.train.micro_batch_tokens)
            micro = [[live[j] for j in g] for g in groups_mb]

            def loss_fn(k: int | None, micro=micro):
                if k is None:
                    b = dummy_batch()
                    lp = token_logprobs(self.train_model, b, cfg.rollout.temperature)
                    z = torch.zeros_like(lp)
                    return policy_loss(lp, z, z)
                items = micro[k]
                rs = [rollouts[i] for i, _ in items]
                b = pack_rollouts(rs)
                lp = token_logprobs(self.train_model, b, cfg.rollout.temperature)
                a_tok, w_tok = _per_token(b, [float(adv[i]) for i, _ in items],
                                          [wi for _, wi in items])
                o = torch.cat([old[i] for i, _ in items]) if old else None
                return policy_loss(lp, a_tok, w_tok, old_logp=o,
                                   clip_low=A.clip_low if A.clip else None,
                                   clip_high=A.clip_high if A.clip else None)

            st = update(self.train_model, self.optimizer, self.scheduler, len(micro), loss_fn,
                        ctx, cfg.optim.max_grad_norm)
            loss_total += st.loss
            fwd_s, bwd_s, opt_s = fwd_s + st.forward_s, bwd_s + st.backward_s, opt_s + st.step_s
            grad_norm = st.grad_norm
            for k, v in st.sums.items():
                sums[k] = min(sums.get(k, v), v) if k.endswith("_min") else (
                    max(sums.get(k, v), v) if k.endswith("_max") else sums.get(k, 0.0) + v)
            trained_tokens += sum(len(rollouts[i].prompt_ids) + len(rollouts[i].token_ids)
                                  for i, _ in live)
        t1 = time.perf_counter()
        self.sync_weights()
        sync_s = time.perf_counter() - t1
        self.step += 1
        return self._metrics(rm, adv[valid], loss_total, grad_norm, sums, trained_tokens,
                             dict(rollout_s=t_roll, logprobs_s=fwd_s, backward_s=bwd_s,
                                  optim_s=opt_s, sync_s=sync_s,
                                  step_s=time.perf_counter() - t0))

    @torch.no_grad()
    def _old_logprobs(self, rollouts: list[Rollout], train: list[int],
                      chunks: list[set[int]]) -> dict[int, torch.Tensor]:
        """Log-probs of the train rollouts under the weights that sampled them (before any
        update of this batch): the clip presets' pi_old when a batch takes several updates."""
        T = self.cfg.rollout.temperature
        lens = [len(rollouts[i].prompt_ids) + len(rollouts[i].token_ids) for i in train]
        parts = split_by_tokens(lens, self.cfg.train.micro_batch_tokens)
        n_all = int(self.ctx.all_reduce_max(torch.tensor([max(len(parts), 1)]))[0])
        out: dict[int, torch.Tensor] = {}
        for k in range(n_all):
            if k >= len(parts):
                token_logprobs(self.train_model, dummy_batch(), T)  # pairs FSDP's collectives
                continue
            idx = [train[j] for j in parts[k]]
            b = pack_rollouts([rollouts[i] for i in idx])
            lp = token_logprobs(self.train_model, b, T)
            cu = b.cu_seqlens.tolist()
            for n, i in enumerate(idx):
                out[i] = lp[cu[n]:cu[n + 1]].clone()
        return out

    def sync_weights(self) -> None:
        """The new weights reach the engine (KV dropped, decode copies refreshed)."""
        if self.sharded:
            full = gather_full_state(self.train_model)
            with torch.no_grad():
                for n, p in self.engine_model.named_parameters():
                    p.copy_(full[n])
        self.engine.update_weights(self.engine_model.hf_weight_map().items())

    def _metrics(self, rm: dict[str, float], adv: torch.Tensor, loss: float, grad_norm: float,
                 sums: dict[str, float], trained_tokens: float,
                 times: dict[str, float]) -> dict[str, float]:
        ctx = self.ctx
        keys = sorted(rm)
        tot = dict(zip(keys, ctx.sum_floats(*[rm[k] for k in keys])))
        a = adv.double()
        n_a, s_a, ss_a, abs_a = ctx.sum_floats(a.numel(), float(a.sum()), float((a * a).sum()),
                                               float(a.abs().sum()))
        mn = -float(ctx.all_reduce_max(torch.tensor([-float(a.min()) if a.numel() else -math.inf]))[0])
        mx = float(ctx.all_reduce_max(torch.tensor([float(a.max()) if a.numel() else -math.inf]))[0])
        (tt,) = ctx.sum_floats(trained_tokens)
        roll_s = float(ctx.all_reduce_max(torch.tensor([times["rollout_s"]]))[0])
        train_s = float(ctx.all_reduce_max(torch.tensor([times["logprobs_s"] + times["backward_s"]]))[0])
        n = max(tot["n"], 1.0)
        tokens = max(sums.get("tokens", 0.0), 1.0)
        out = {
            "reward": tot["reward"] / n, "accuracy": tot["correct"] / n,
            "format_rate": tot["format_ok"] / n, "parallel_rate": tot["parallel"] / n,
            "valid_rate": tot["valid"] / n, "rollouts": tot["n"],
            "groups_kept": tot["groups_kept"], "groups_dropped": tot["groups_dropped"],
            "groups_surplus": tot["groups_surplus"],
            "refill_rounds": rm["rounds"],
            "adv_mean": s_a / max(n_a, 1), "adv_abs_mean": abs_a / max(n_a, 1),
            "adv_std": math.sqrt(max(ss_a / max(n_a, 1) - (s_a / max(n_a, 1)) ** 2, 0.0)),
            "adv_min": mn if n_a else 0.0, "adv_max": mx if n_a else 0.0,
            "loss": loss, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
            "ratio_mean": sums.get("ratio_sum", 0.0) / tokens,
            "ratio_min": sums.get("ratio_min", 1.0), "ratio_max": sums.get("ratio_max", 1.0),
            "clip_frac": sums.get("clipped", 0.0) / tokens,
            "gen_tokens": tot["gen_tokens"], "trained_tokens": tt,
            "rollout_tok_s": tot["gen_tokens"] / roll_s if roll_s > 0 else 0.0,
            "train_tok_s": tt / train_s if train_s > 0 else 0.0,
            "cursor": float(self.cursor),
        }
        # Each phase's slowest rank (the ranks wait for each other at the collectives).
        keys_t = sorted(times)
        slowest = ctx.all_reduce_max(torch.tensor([times[k] for k in keys_t], dtype=torch.float64))
        out.update({k: float(v) for k, v in zip(keys_t, slowest)})
        return out

    # ------------------------------------------------------------------ the run
    def save(self) -> str:
        return ckpt.save_checkpoint(
            self.cfg.train.out_dir, self.step, model=self.engine_model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler,
            state={"stage": self.cfg.stage, "cursor": self.cursor, "config": to_dict(self.cfg)},
            ctx=self.ctx, sharded_optimizer=self.sharded, keep_last=self.cfg.train.keep_last)

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None
            ) -> list[dict[str, float]]:
        """Steps until train.steps (npr.train.loop.run_steps)."""
        return run_steps(self, self.cfg.train.steps, on_step)


def _per_token(b, adv: Sequence[float], w: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence advantage / weight -> [T] tensors on the scored tokens of packed batch b."""
    lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1])
    a = torch.repeat_interleave(torch.tensor(adv, dtype=torch.float32), lens)
    ww = torch.repeat_interleave(torch.tensor(w, dtype=torch.float32), lens)
    m = b.loss_mask.to(torch.float32)
    return a * m, ww * m


def _parallel_event(r: Rollout) -> bool:
    """>= 1 block of >= 2 branches: executed forks for parallel rollouts; for plain decoding
    (tags as text), the blocks the text holds."""
    if r.parallel != "off":
        return r.forked_parallel
    try:
        return any(len(b.plans) >= 2 for b in fmt.parse(r.text).blocks)
    except fmt.FormatError:
        return False


def run_from_config(cfg: RLConfig, ctx: DistContext | None = None) -> list[dict[str, float]]:
    """The generic run (`python -m npr.train rl`): model.path, a JSONL data.path of
    {"problem", "answer"}, and the reward / checker named in the config."""
    import npr
    from npr.tokenizer import add_tag_tokens
    from npr.train.data import ShuffledPrompts, load_jsonl
    from npr.train.rewards import Stage1Reward, Stage3Reward, make_checker

    if not cfg.model.path:
        raise ValueError("model.path is required")
    if not cfg.data.path:
        raise ValueError("data.path is required (JSONL rows {\"problem\", \"answer\"})")
    ctx = ctx or init_distributed(cfg.dist.backend, cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    model = npr.load_model(cfg.model.path, dtype=cfg.model.dtype, device=str(ctx.device))
    tok = npr.load_tokenizer(cfg.model.path)
    if cfg.model.add_tags:
        add_tag_tokens(tok, model)
    checker = make_checker(cfg.reward.checker, cfg.reward.timeout_s)
    reward = (Stage1Reward if cfg.reward.kind == "stage1" else Stage3Reward)(
        checker, max_branches=cfg.rollout.max_branches)
    prompts = ShuffledPrompts(load_jsonl(cfg.data.path, cfg.data.template), seed=cfg.train.seed,
                              shuffle=cfg.data.shuffle)
    try:
        return RLTrainer(cfg, model, tok, reward, prompts, ctx=ctx).run()
    finally:
        if hasattr(checker, "close"):
            checker.close()
        ctx.close()
