"""`npr bench papo`: PAPO iterations on SmolLM2-135M-Instruct (real weights, the eight tags
added), N prompts x S samples, split over R ranks of torch.distributed (gloo on CPU).

Each rank runs its own engine on its share of the prompts (native parallel decoding, the same
model object as the trainer), then log-probs under the §2 layout, backward, the DDP gradient
sync, the optimizer step, and Engine.update_weights. Reported per iteration: seconds of
rollout / log-probs / backward / optimizer / weight sync, each the slowest rank's (the ranks
wait for each other at the collectives, so a phase's time on one rank can include waiting),
the iteration's total (total_s), and the weight sync's share of it.

The workload is timing-shaped, not a learning run: a ForcedStructure processor places the tags
(two blocks of 4 and 2 branches) and the model writes every content token; the reward is the
parity of the sampled ids' sum (about half the samples +1), so advantages and the backward are
real. The first iteration also packs the engine's decode weights; later ones re-pack them after
each update (counted in their rollout time: the engine packs lazily on the first decode step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

PROBLEMS = [
    "A farmer has chickens and cows: 50 heads and 140 legs. How many cows?",
    "What is the sum of the first 20 odd numbers?",
    "A train covers 180 km in 2.5 hours. What is its average speed in km/h?",
    "Find x if 3x + 7 = 31.",
    "How many ways can 4 books be arranged on a shelf?",
    "What is 15% of 240?",
    "A rectangle has perimeter 36 and length 10. What is its area?",
    "What is the greatest common divisor of 84 and 126?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--ranks", type=int, default=2, help="processes (torchrun, gloo)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration (global)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--step-tokens", type=int, default=16, help="content tokens per branch")
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument("--decode-weights", default="auto", choices=["auto", "bf16", "fp16", "plain"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON path


def _parity_reward(texts, golds):
    from npr.train.rewards import Scored

    return [Scored(reward=1.0 if sum(map(ord, t)) % 2 == 0 else -1.0, correct=False,
                   format_ok=True) for t in texts]


def _worker(args: argparse.Namespace) -> None:
    import torch

    import npr
    from npr.bench.common import machine
    from npr.bench.speedup import smollm2_gguf
    from npr.bench.forcing import ForcedStructure
    from npr.tokenizer import add_tag_tokens, step_label_ids
    from npr.train.config import RLConfig, load_config
    from npr.train.data import Prompt, ShuffledPrompts
    from npr.train.dist import init_distributed
    from npr.train.rl import RLTrainer

    ctx = init_distributed("gloo")
    path = args.model or smollm2_gguf()
    model = npr.load_model(path, dtype=torch.float32)
    tok = npr.load_tokenizer(path)
    tag_ids = add_tag_tokens(tok, model)
    labels = [step_label_ids(tok, k) for k in range(1, 9)]

    def procs(p, ids):
        return [ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id,
                                prompt_len=len(ids), branches=[4, 2], step_tokens=args.step_tokens,
                                plan_tokens=4, prefix_tokens=0, takeaway_tokens=8, final_tokens=4)]

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(RLConfig, overrides=[
            f"train.out_dir='{out}'", "train.resume=false", "train.progress=false",
            "train.plot=false", f"train.steps={args.iters}",
            f"train.micro_batch_tokens={args.micro_batch_tokens}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
            "rollout.max_new_tokens=2048", "rollout.chat_template=true",
            f"rollout.decode_weights='{args.decode_weights}'", "optim.lr=1e-6"])
        prompts = ShuffledPrompts([Prompt(answer="0", text=t) for t in PROBLEMS], shuffle=False)
        t = RLTrainer(cfg, model, tok, _parity_reward, prompts, ctx=ctx, processors=procs)
        rows = []
        for it in range(args.iters):
            m = t.train_step()
            parts = {k: m[k] for k in ("rollout_s", "logprobs_s", "backward_s", "optim_s", "sync_s")}
            total = m["step_s"]
            rows.append({"iter": it + 1, "ranks": ctx.world_size, "threads": t.threads,
                         "rollouts": int(m["rollouts"]), "gen_tokens": int(m["gen_tokens"]),
                         "trained_tokens": int(m["trained_tokens"]), **parts,
                         "total_s": total,
                         "sync_pct": 100 * m["sync_s"] / total,
                         "rollout_tok_s": m["rollout_tok_s"], "train_tok_s": m["train_tok_s"],
                         "valid_rate": m["valid_rate"], "parallel_rate": m["parallel_rate"]})
    if ctx.is_main:
        with open(args.worker, "w") as f:
            json.dump({"rows": rows, "machine": machine()}, f)
    ctx.close()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.quick:
        args.prompts, args.samples, args.iters, args.step_tokens = 2 * args.ranks, 2, 1, 4
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "papo.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
               "--master-port", str(29400 + os.getpid() % 500), "-m", "npr.bench.papo",
               "--worker", out, "--ranks", str(args.ranks), "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--iters", str(args.iters),
               "--step-tokens", str(args.step_tokens),
               "--micro-batch-tokens", str(args.micro_batch_tokens),
               "--decode-weights", args.decode_weights]
        if args.model:
            cmd += ["--model", args.model]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun: 1
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            res = json.load(f)
    for r in res["rows"]:
        r["cpu"] = res["machine"]["processor"]
    return res["rows"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m npr.bench.papo")
    add_arguments(p)
    a = p.parse_args()
    if a.worker:
        _worker(a)
    else:
        a.quick = False
        from npr.bench import common

        common.print_table("papo", run(a))
