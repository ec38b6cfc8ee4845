"""`npr bench train-attention`: the trainer's attention under the §2 layout, forward + backward.

Workload: one canonical trajectory of T tokens (prompt 256, 4 blocks of 8 branches of equal
length, guideline and takeaway of 64 tokens each, final text), laid out by npr.format.layout and
packed by npr.train.logprobs.pack; SmolLM2-135M's attention shape (9 query heads, 3 kv heads,
head dim 64), fp32. Each method runs attention forward and backward (dq, dk, dv) on the same q,
k, v:
  npr_kernel    npr.ops.layout_attention, the compiled op (torch.ops.npr.layout_attention)
  npr_composed  npr.ops.layout_attention, torch's CPU flash kernels per piece, merged by LSE
  sdpa_causal   torch SDPA, is_causal: the floor (the layout's mask should cost no more)
  sdpa_bool     torch SDPA with the layout as a bool [T, T] mask
  sdpa_float    torch SDPA with an additive float [1, 1, T, T] mask (the original's route)
Times: best and median of --iters rounds, methods called in turn (common.time_interleaved).
Memory (attn_mb): the attention's working memory, measured in a fresh child process per method:
peak resident memory over one forward + backward (after a warm-up one) less the results every
method returns (out, its gradient, dq, dk, dv; results_mb). Masks count: they are the masked
methods' cost. mem_vs_float = attn_mb / sdpa_float's.
The masked methods are skipped above --mask-max-tokens (their [T, T] masks: T^2 bytes, 4 T^2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from npr.bench import common

HEADS = (9, 3, 64)  # SmolLM2-135M: Hq, Hkv, D
METHODS = ("npr_kernel", "npr_composed", "sdpa_causal", "sdpa_bool", "sdpa_float")
MASKED = ("sdpa_bool", "sdpa_float")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="8192,32768", help="comma list of trajectory lengths")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--mask-max-tokens", type=int, default=16384,
                   help="largest T the [T, T]-mask methods run at")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")


def trajectory(T: int) -> tuple[list[int], Any]:
    """(token ids [T'], Layout) of the benchmark trajectory, T' within a few tokens of T."""
    from npr.format import TAGS, layout

    tag = {t: i for i, t in enumerate(TAGS)}
    text = lambda n: [8 + i % 90 for i in range(max(n, 1))]  # noqa: E731
    blocks, n, prompt, head = 4, 8, 256, 64
    step = max((T - prompt - blocks * 2 * head) // (blocks * n), 3)
    ids = text(prompt)
    for _ in range(blocks):
        ids += [tag["<guideline>"]]
        for _ in range(n):
            ids += [tag["<plan>"], *text(head // n - 2), tag["</plan>"]]
        ids += [tag["</guideline>"]]
        for _ in range(n):
            ids += [tag["<step>"], *text(step - 2), tag["</step>"]]
        ids += [tag["<takeaway>"], *text(head - 2), tag["</takeaway>"]]
    ids += text(max(T - len(ids), 1))
    return ids, layout(ids, tag, prompt_len=prompt)


def _inputs(T: int):
    from npr.ops.layout_attention import LayoutAttentionPlan
    from npr.train.logprobs import pack

    ids, lay = trajectory(T)
    b = pack([(ids, lay, [False] * len(ids))])
    plan = LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    Hq, Hkv, D = HEADS
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(len(ids), h, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv))
    return b, plan, q, k, v


def _method(name: str, b: Any, plan: Any, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of method `name`; masks are built inside (their cost counts)."""
    from npr.ops.layout_attention import layout_attention

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1)[None]  # [T, H, D] -> [1, H, T, D]

    def sdpa(mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                              is_causal=mask is None, enable_gqa=True)

    def run() -> None:
        for t in (q, k, v):
            t.grad = None
        if name.startswith("npr_"):
            out = layout_attention(q, k, v, plan, backend=name[4:])
        elif name == "sdpa_causal":
            out = sdpa(None)
        else:
            mask = b.dense_mask()  # [T, T] bool
            if name == "sdpa_float":
                mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
            out = sdpa(mask[None, None])
        out.backward(torch.ones_like(out))
    return run


def _memory_child(name: str, T: int) -> dict[str, float]:
    """_child(name, T) in a fresh process (NaN when it fails, e.g. out of memory)."""
    code = ("import json, sys; from npr.bench.train_attention import _child; "
            f"print(json.dumps(_child({name!r}, {T})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=3600, env=dict(os.environ))
    if out.returncode != 0:
        return {"attn_mb": float("nan")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(name: str, T: int) -> dict[str, float]:
    """Run in a fresh process: the attention's working memory in MB, the peak resident set
    (VmHWM, reset through clear_refs; not ru_maxrss, which a child inherits from its parent
    across exec) over one forward + backward after a warm-up one, less the resident set before
    it and less the results every method returns (out, its gradient, dq, dk, dv)."""
    b, plan, q, k, v = _inputs(T)
    fn = _method(name, b, plan, q, k, v)
    fn()  # first touch of the allocator's pages and the kernels' scratch
    for t in (q, k, v):
        t.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_mb("VmRSS")
    fn()
    results = (3 * q.numel() + 2 * k.numel()) * q.element_size() / 2**20
    return {"attn_mb": _status_mb("VmHWM") - base - results, "results_mb": results}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tokens = [2048] if args.quick else [int(t) for t in args.tokens.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"npr bench train-attention: unknown methods {bad}; choose from {METHODS}")
    from npr import _ext

    if not (_ext.available() and hasattr(torch.ops.npr, "layout_attention")):
        methods = [m for m in methods if m != "npr_kernel"]
    rows = []
    for T in tokens:
        b, plan, q, k, v = _inputs(T)
        here = [m for m in methods if m not in MASKED or T <= args.mask_max_tokens]
        fns = {m: _method(m, b, plan, q, k, v) for m in here}
        times = common.time_interleaved(fns, warmup=1, iters=1 if args.quick else args.iters)
        causal = times.get("sdpa_causal", {}).get("best_s")
        Hq, _, D = HEADS
        for m in methods:
            row: dict[str, Any] = {"tokens": plan.num_tokens, "method": m}
            if m not in times:
                row["skipped"] = f"[T, T] mask above --mask-max-tokens {args.mask_max_tokens}"
                rows.append(row)
                continue
            t = times[m]
            row.update(best_ms=1e3 * t["best_s"], median_ms=1e3 * t["median_s"])
            if causal:
                row["vs_causal"] = t["best_s"] / causal
            for other in ("sdpa_bool", "sdpa_float"):
                if other in times and m.startswith("npr_"):
                    row[f"speedup_vs_{other[5:]}"] = times[other]["best_s"] / t["best_s"]
            # fwd 4*D FLOPs per visible (query, key) pair and head, bwd 10*D (recomputed P incl.)
            pairs = plan.visible_pairs if m != "sdpa_causal" else T * (T + 1) // 2
            row["gflops"] = 14 * D * Hq * pairs / t["best_s"] / 1e9
            if not args.no_memory:
                row.update(_memory_child(m, T))
            rows.append(row)
        if not args.no_memory:
            _ratio_rows(rows, plan.num_tokens)
    return rows


def _ratio_rows(rows: list[dict[str, Any]], T: int) -> None:
    """Adds mem_vs_float (attention working memory / sdpa_float's) to the npr rows of length T."""
    here = {r["method"]: r for r in rows if r["tokens"] == T and "attn_mb" in r}
    ref = here.get("sdpa_float", {}).get("attn_mb")
    for m, r in here.items():
        if ref and m.startswith("npr_"):
            r["mem_vs_float"] = r["attn_mb"] / ref
