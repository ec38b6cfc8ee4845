"""The demo's base "instruction" model: a tiny Llama trained from scratch on sequential solutions
of a synthetic task (npr.tasks), saved as a Hugging Face folder.

Only some solutions use the parallel format (tags as plain text), and some of those imperfectly
(npr.tasks.multiples.FLAWS), so the base model follows the format only partly: stage 1 (NPR-ZERO)
has format headroom to discover. The loss covers the solution tokens (not the prompt).

    base/  config.json  model.safetensors  tokenizer files (no tag tokens)
           pretrain.json (the config, the final loss, the wall time)  metrics.jsonl
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from npr.models.config import ModelConfig
from npr.models.llama import LlamaDecoder

DONE_FILE = "pretrain.json"


@dataclass
class PretrainConfig:
    task: str = "multiples:k=2-4,n=2-6"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    steps: int = 1000             # the copy of a group from the prompt (induction) forms after ~600
    batch_size: int = 16          # sequences per optimizer step
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1     # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.0
    seed: int = 0
    # The solution mix: exact parallel format (tags as text), a flawed attempt at it, else plain.
    p_parallel: float = 0.35
    p_flawed: float = 0.3
    threads: int = 0              # torch threads (0: leave as is)

    def __post_init__(self) -> None:
        for k in ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size",
                  "steps", "batch_size", "max_position_embeddings"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"PretrainConfig.{k} must be an int >= 1, got {getattr(self, k)!r}")
        if not (0 <= self.p_parallel and 0 <= self.p_flawed and self.p_parallel + self.p_flawed <= 1):
            raise ValueError("PretrainConfig: need p_parallel, p_flawed >= 0 with sum <= 1, got "
                             f"{self.p_parallel}, {self.p_flawed}")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr must be > 0, got {self.lr}")


def build_model(cfg: PretrainConfig, tokenizer: Any) -> LlamaDecoder:
    """A fresh Llama (tied embeddings, GQA off) with small-normal init, seeded by cfg.seed."""
    mc = ModelConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaDecoder(mc)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # Residual-branch outputs scaled down with depth (GPT-2 style): stable from step 0.
        for layer in model.layers:
            layer.o_weight.mul_(1 / math.sqrt(2 * cfg.num_layers))
            layer.down_weight.mul_(1 / math.sqrt(2 * cfg.num_layers))
    return model


class Mixture:
    """Training examples (prompt ids, solution ids + EOS) of the base model's solution mix."""

    def __init__(self, cfg: PretrainConfig, tokenizer: Any) -> None:
        from npr.tasks import TaskPrompts, get_task

        self.cfg, self.tok = cfg, tokenizer
        self.source = TaskPrompts(get_task(cfg.task), seed=cfg.seed)
        self.rng = random.Random(cfg.seed + 17)
        self.draw = 0

    def solution(self, problem: Any) -> str:
        from npr.tasks import multiples as gs

        u = self.rng.random()
        if u < self.cfg.p_parallel:
            return gs.parallel_solution(problem)
        if u < self.cfg.p_parallel + self.cfg.p_flawed:
            flaw = self.rng.choice(gs.FLAWS[1:])  # a real attempt at the tags
            return gs.flawed_solution(problem, flaw, self.rng)
        return gs.sequential_solution(problem)

    def example(self) -> tuple[list[int], list[int]]:
        from npr.tasks.multiples import prompt_text

        p = self.source.problem(self.draw)
        self.draw += 1
        enc = lambda s: list(self.tok.encode(s, add_special_tokens=False))  # noqa: E731
        return enc(prompt_text(p.text)), enc(self.solution(p)) + [self.tok.eos_token_id]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [n, L] (right-padded), targets [n, L] (-100 off the solution)."""
        ex = [self.example() for _ in range(n)]
        L = max(len(a) + len(b) for a, b in ex)
        ids = torch.full((n, L), self.tok.pad_token_id, dtype=torch.long)
        tgt = torch.full((n, L), -100, dtype=torch.long)
        for i, (a, b) in enumerate(ex):
            s = a + b
            ids[i, :len(s)] = torch.tensor(s)
            tgt[i, len(a) - 1:len(s) - 1] = torch.tensor(b)
        return ids, tgt


def lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def is_done(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, DONE_FILE))


def pretrain(cfg: PretrainConfig, out_dir: str, *, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> str:
    """Trains the base model and saves it to out_dir (an HF folder); returns out_dir. A finished
    out_dir (pretrain.json present) is returned as it is."""
    from npr.tasks.tokenizer import build_tokenizer
    from npr.train.checkpoint import save_model

    if is_done(out_dir):
        return out_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(cfg, tok).train()
    data = Mixture(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                            weight_decay=cfg.weight_decay)
    os.makedirs(out_dir, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain", leave=False)
    t0 = time.perf_counter()
    ema = None
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as log:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            ids, tgt = data.batch(cfg.batch_size)
            logits = model(ids)  # [B, L, V]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            v = float(loss.detach())
            ema = v if ema is None else 0.95 * ema + 0.05 * v
            m = {"step": step + 1, "loss": v, "loss_ema": ema, "lr": lr_at(cfg, step),
                 "time_s": time.perf_counter() - t0}
            log.write(json.dumps(m) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}")
            if on_step is not None:
                on_step(step + 1, m)
    if bar is not None:
        bar.close()
    model.eval()
    save_model(out_dir, model, tok)
    with open(os.path.join(out_dir, DONE_FILE), "w") as f:
        json.dump({"config": asdict(cfg), "final_loss_ema": ema,
                   "wall_s": time.perf_counter() - t0}, f, indent=2)
    return out_dir
