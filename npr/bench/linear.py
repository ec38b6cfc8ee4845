"""`npr bench linear`: the weight-streaming linear (npr.ops.linear) vs torch's F.linear at decode
row counts, and one SmolLM2-135M decode step.

Weights are cold, as in a decode step (every layer's weights are evicted before they come back):
each call uses the next of several weight copies that together exceed the last-level cache.
Times are the best of --iters calls, and of --repeat passes over all cases (the machine is shared
and noisy: a pass that meets a busy core loses milliseconds per call); within a pass the row
counts of one shape and kernel are called in turn, so drift hits each alike. Fields:
  kernel               plain ([N, K] weights, npr::linear_small), packed (pack_linear_weight,
                       npr::linear_packed), packed+fused (step only: npr.ops.linear_fused)
  ms / torch_ms        this kernel / F.linear with fp32 weights (what the model would run
                       otherwise; torch's bf16 GEMM is far slower than fp32 on this CPU)
  ratio_vs_1row        time(M) / time(1 row) of the same kernel and storage (target <= 1.3 at 8)
  GB_s, bw_share       weight bytes / time, and that over read_bw_GB_s (torch's sum over 256
                       MiB, the best of measurements just before and after the shape's cases:
                       npr.bench.common.rates_around; gemm_GFLOP_s likewise, torch.mm fp32)
  step: floor_ms       weight bytes / read_bw_GB_s; bw_share = floor_ms / ms (target >= 0.7)
  roofline_ms          max(weight bytes / read bandwidth, 2 x rows x weights / measured fp32
                       GEMM rate) (npr.bench.common.roofline_ms): the least time any kernel
                       computing in fp32 could take; roofline_share = roofline_ms / ms
  roofline_ratio_vs_1row  the M-row roofline / the 1-row roofline, both at this row's rates:
                       the ratio_vs_1row of a kernel at its roofline at both row counts
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F

from npr import ops
from npr.bench import common
from npr.ops.linear import gemm_panels_available

SHAPES = {  # name: (K, N)
    "576->1536": (576, 1536),
    "1536->576": (1536, 576),
    "576->49152": (576, 49152),
    "4096x4096": (4096, 4096),
}
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Bytes of weight copies to rotate through per case: well past the last-level cache.
_ROTATE_BYTES = 160 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="1,2,4,8,16", help="row counts M (comma separated)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="subset of: " + ",".join(SHAPES))
    p.add_argument("--storage", default="fp32,bf16", help="weight storage: fp32,bf16")
    p.add_argument("--kernels", default="plain,packed",
                   help="plain ([N, K] weights), packed (pack_linear_weight), panels "
                        "(pack_gemm_weight: fp32 on AVX-512 CPUs only; shape cases only)")
    p.add_argument("--iters", type=int, default=15, help="timed calls per case (best is kept)")
    p.add_argument("--repeat", type=int, default=2,
                   help="passes over all cases; the best time of each case is kept")
    p.add_argument("--no-step", action="store_true", help="skip the SmolLM2 decode-step case")
    p.add_argument("--no-fused", action="store_true",
                   help="skip the step variant with npr.ops.linear_fused")
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")


def _best_ms(cases: dict[int, list[Callable[[], object]]], iters: int) -> dict[int, float]:
    """Best time (ms) of one call per case (one fn per weight copy in each list, or one fn). The
    cases are called in turn (common.time_interleaved: drift hits every row count alike), and
    every call uses the next weight copy of one rotation shared by all cases, so no call finds
    its weights in cache."""
    state = {"i": 0}

    def caller(fns: list[Callable[[], object]]) -> Callable[[], None]:
        def call() -> None:
            state["i"] += 1
            fns[state["i"] % len(fns)]()
        return call

    copies = max(len(f) for f in cases.values())
    t = common.time_interleaved({m: caller(f) for m, f in cases.items()},
                                warmup=max(2, copies // len(cases) + 1), iters=iters)
    return {m: r["best_s"] * 1e3 for m, r in t.items()}


def _copies(n: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    nbytes = n * k * torch.tensor([], dtype=dtype).element_size()
    count = max(2, math.ceil(_ROTATE_BYTES / max(nbytes, 1)))
    return [torch.randn(n, k).to(dtype) for _ in range(count)]


def _with_rates(cases: Callable[[], list[dict]]) -> list[dict]:
    """cases()'s rows, each given the read bandwidth and fp32 GEMM rate measured just before and
    after them (common.rates_around: the VM drifts, so each group of cases gets its own)."""
    rows, read, gemm = common.rates_around("cpu", torch.float32, cases)
    return [dict(r, read_gbs=read, gemm_gflops=gemm) for r in rows]


def _linear_raw(args) -> list[dict]:
    """One pass: {case, storage, kernel, rows, ms, torch_ms, weight_bytes, read_gbs,
    gemm_gflops} per case."""
    return [r for name in args.shapes.split(",")
            for r in _with_rates(lambda name=name: _shape_raw(args, name))]


def _shape_raw(args, name: str) -> list[dict]:
    rows_list = [int(r) for r in args.rows.split(",")]
    k, n = SHAPES[name]
    w32 = _copies(n, k, torch.float32)
    torch_ms: dict[int, float] = {}
    out: list[dict] = []
    for sname in args.storage.split(","):
        dtype = STORAGE[sname]
        plain = w32 if dtype == torch.float32 else [w.to(dtype) for w in w32]
        wbytes = n * k * plain[0].element_size()
        xs = {m: torch.randn(m, k) for m in rows_list}
        if not args.no_torch and not torch_ms:
            torch_ms = _best_ms({m: [lambda w=w, x=x: F.linear(x, w) for w in w32]
                                 for m, x in xs.items()}, args.iters)
        for kname in args.kernels.split(","):
            if kname == "panels" and not (dtype == torch.float32 and gemm_panels_available()):
                continue  # GEMM panels hold fp32 and run on AVX-512 CPUs only
            ws = (plain if kname == "plain" else
                  [ops.pack_gemm_weight(w) for w in plain] if kname == "panels" else
                  [ops.pack_linear_weight(w) for w in plain])
            ms = _best_ms({m: [lambda w=w, x=x: ops.linear(x, w) for w in ws]
                           for m, x in xs.items()}, args.iters)
            for m in rows_list:
                out.append({"case": name, "storage": sname, "kernel": kname, "rows": m,
                            "ms": ms[m], "torch_ms": torch_ms.get(m), "weight_bytes": wbytes})
            del ws
        del plain
    return out


# SmolLM2-135M: hidden 576, MLP 1536, 30 layers, 9 query heads and 3 KV heads of 64, vocab
# 49152, tied embeddings (the LM head is the embedding matrix).
SMOL = {"hidden": 576, "mlp": 1536, "layers": 30, "q": 576, "kv": 192, "head_dim": 64,
        "vocab": 49152}


class _Step:
    """The linears of one decode step with random weights of the real shapes, in model order:
    per layer rms_norm -> qkv (576->960) -> RoPE of q and k (HF style) -> o (576->576) ->
    residual -> rms_norm -> gate+up (576->2x1536) -> silu*mul -> down (1536->576) -> residual;
    then the final norm and the LM head (576->49152) for the sampling rows. Attention itself is
    left out (o takes the rotated q). fused: the same with npr.ops.linear_fused (norms, RoPE,
    silu*mul and residuals folded into the linears: 4 ops per layer)."""

    def __init__(self, dtype: torch.dtype, linear: Callable = ops.linear, packed: bool = False,
                 fused: bool = False):
        c = SMOL
        d, f = c["hidden"], c["mlp"]
        qkv = c["q"] + 2 * c["kv"]
        self.linear = linear
        self.fused = fused
        self.layers = [
            dict(n1=torch.ones(d), n2=torch.ones(d),
                 qkv=(torch.randn(qkv, d) * d**-0.5).to(dtype),
                 o=(torch.randn(d, c["q"]) * d**-0.5).to(dtype),
                 gu=(torch.randn(2 * f, d) * d**-0.5).to(dtype),
                 down=(torch.randn(d, f) * f**-0.5).to(dtype))
            for _ in range(c["layers"])
        ]
        self.norm = torch.ones(d)
        self.head = (torch.randn(c["vocab"], d) * d**-0.5).to(dtype)
        es = self.head.element_size()
        self.weight_bytes = es * (self.head.numel() + sum(
            L[k].numel() for L in self.layers for k in self.LINEARS))
        if packed:
            for L in self.layers:
                for k in self.LINEARS:
                    L[k] = ops.pack_linear_weight(L[k])
            self.head = ops.pack_linear_weight(self.head)

    LINEARS = ("qkv", "o", "gu", "down")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, 576] -> logits [M, 49152]."""
        lin, q, f, d = self.linear, SMOL["q"], SMOL["mlp"], SMOL["head_dim"]
        m = x.shape[0]
        # Rotary tables of the step's positions (computed once per step, shared by the layers).
        emb = torch.arange(m).float()[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        emb = torch.cat((emb, emb), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        rope_heads = (q + SMOL["kv"]) // d  # q and k heads
        if self.fused:  # 4 ops per layer (npr.ops.linear_fused)
            lf = ops.linear_fused
            for L in self.layers:
                qkv = lf(x, L["qkv"], norm_weight=L["n1"], eps=1e-5, rope_cos=cos, rope_sin=sin,
                         rope_heads=rope_heads)
                x = lf(qkv[:, :q], L["o"], residual=x)
                gu = lf(x, L["gu"], norm_weight=L["n2"], eps=1e-5)
                x = lf(gu, L["down"], silu_mul=True, residual=x)
            return lf(x, self.head, norm_weight=self.norm, eps=1e-5)
        c, s = cos[:, None], sin[:, None]
        for L in self.layers:
            h = ops.rms_norm(x, L["n1"], 1e-5)
            qkv = lin(h, L["qkv"])
            qh = qkv[:, :q].view(m, -1, d)  # HF apply_rotary_pos_emb on q and k
            kh = qkv[:, q:q + SMOL["kv"]].view(m, -1, d)
            qh = qh * c + torch.cat((-qh[..., d // 2:], qh[..., : d // 2]), dim=-1) * s
            kh = kh * c + torch.cat((-kh[..., d // 2:], kh[..., : d // 2]), dim=-1) * s
            x = x + lin(qh.reshape(m, q), L["o"])
            h = ops.rms_norm(x, L["n2"], 1e-5)
            gu = lin(h, L["gu"])
            x = x + lin(F.silu(gu[:, :f]) * gu[:, f:], L["down"])
        return lin(ops.rms_norm(x, self.norm, 1e-5), self.head)


def _step_raw(args) -> list[dict]:
    """One pass of the decode-step cases (same fields as _linear_raw)."""
    out: list[dict] = []
    rows_list = [m for m in (1, 2, 4, 8) if not args.quick or m in (1, 8)]
    iters = 3 if args.quick else 6
    torch_ms: dict[int, float] = {}
    xs = {m: torch.randn(m, SMOL["hidden"]) for m in rows_list}

    def best_ms(step: _Step) -> dict[int, float]:  # row counts in turn (drift hits all alike)
        return _best_ms({m: [lambda x=x: step(x)] for m, x in xs.items()}, iters)

    if not args.no_torch:
        torch_ms = best_ms(_Step(torch.float32, linear=F.linear))
    variants = ([k for k in args.kernels.split(",") if k != "panels"]
                + ([] if args.no_fused else ["packed+fused"]))
    for sname in args.storage.split(","):
        for kname in variants:
            step = _Step(STORAGE[sname], packed=kname.startswith("packed"),
                         fused=kname.endswith("fused"))
            ms = best_ms(step)
            for m in rows_list:
                out.append({"case": "smollm2-step", "storage": sname, "kernel": kname, "rows": m,
                            "ms": ms[m], "torch_ms": torch_ms.get(m),
                            "weight_bytes": step.weight_bytes})
            del step
    return out


def _finish(raw: list[dict]) -> list[dict]:
    """Best of the passes per case (with the rates of that pass), then the derived fields."""
    best: dict[tuple, dict] = {}
    torch_best: dict[tuple, float] = {}
    for r in raw:
        key = (r["case"], r["storage"], r["kernel"], r["rows"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = dict(r)
        if r["torch_ms"] is not None:
            torch_best[key] = min(r["torch_ms"], torch_best.get(key, r["torch_ms"]))
    for key, b in best.items():
        b["torch_ms"] = torch_best.get(key)
    first: dict[tuple, dict] = {}  # the fewest-rows case of each (case, storage, kernel)
    for key, b in best.items():
        f = first.get(key[:3])
        if f is None or b["rows"] < f["rows"]:
            first[key[:3]] = b
    out = []
    for key, b in best.items():
        f = first[key[:3]]
        wbytes = b.pop("weight_bytes")
        row = {k: b[k] for k in ("case", "storage", "kernel", "rows", "ms")}
        if b["torch_ms"] is not None:
            row["torch_ms"] = b["torch_ms"]
            row["speedup_vs_torch"] = b["torch_ms"] / b["ms"]
            row["torch_ratio_vs_1row"] = b["torch_ms"] / f["torch_ms"]
        row["ratio_vs_1row"] = b["ms"] / f["ms"]
        row["GB_s"] = wbytes / b["ms"] / 1e6
        bw, gemm = b["read_gbs"], b["gemm_gflops"]
        if b["case"] == "smollm2-step":
            row["floor_ms"] = wbytes / bw / 1e6
            row["bw_share"] = row["floor_ms"] / b["ms"]
        else:
            row["bw_share"] = row["GB_s"] / bw
        row["read_bw_GB_s"] = bw
        row["gemm_GFLOP_s"] = gemm
        # fp32 multiply-adds whatever the storage: 2 FLOP per weight per row
        params = wbytes / STORAGE[b["storage"]].itemsize
        roof, roof1 = (common.roofline_ms(wbytes, 2 * r * params, bw, gemm)
                       for r in (b["rows"], f["rows"]))
        row["roofline_ms"] = roof
        row["roofline_share"] = roof / b["ms"]
        row["roofline_ratio_vs_1row"] = roof / roof1
        out.append(row)
    return out


def run(args) -> list[dict]:
    if args.quick:
        args.rows = "1,8"
        args.shapes = "576->1536,4096x4096"
        args.iters = min(args.iters, 5)
        args.repeat = 1
    print(f"{torch.get_num_threads()} threads", flush=True)
    raw: list[dict] = []
    for _ in range(max(1, args.repeat)):
        raw += _linear_raw(args)
        if not args.no_step:
            raw += _with_rates(lambda: _step_raw(args))
    return _finish(raw)
