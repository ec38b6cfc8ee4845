"""`npr bench attention`: branch-tree (cascade) decode attention against baselines.

Setting: N sibling rows share a P-token prefix and each has `own` tokens of its own (decode: one
query per row, the last own position). Baselines, on the same rows and queries:
  flat    the same op over flat per-row block tables, no sharing: each row holds a private copy of
          the prefix (one private segment of P + own tokens per row, N x (P + own) tokens cached);
  sdpa    torch SDPA over contiguous per-row K/V; the gather from the paged cache is EXCLUDED from
          sdpa_ms and reported separately as sdpa_gather_ms;
  flashinfer (CUDA, bf16/fp16, when `flashinfer` imports): its 2-level cascade wrapper.
Times are the best of --iters runs; cascade and flat alternate call by call, so the machine's
drift hits both alike (this VM's timings vary run to run; ratios are side by side).
GB/s = KV bytes the method must read (the shared prefix once for cascade) / time; copy_gbs is the
machine's measured copy bandwidth (read + write) for scale.
Roofline (npr.bench.common.roofline_ms, from the read bandwidth read_gbs and GEMM rate
gemm_gflops, each the best of measurements just before and just after the case):
roofline_<method>_ms = max(bytes / read_gbs, flops / gemm_gflops), the least time
any kernel could take; <method>_roofline_share = that / the measured time; and
roofline_speedup_vs_flat = roofline_flat_ms / roofline_cascade_ms, the largest speedup over the
flat baseline that a kernel could show against a flat kernel running at its roofline.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from npr.bench import common
from npr.ops import attention as A

DEFAULT_DIMS = "16,4,128;9,3,64"  # (Hq, Hkv, D): a 4x-GQA 128-dim model; SmolLM2-135M


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all: cpu, plus cuda when available")
    p.add_argument("--dims", default=DEFAULT_DIMS, help="';'-separated Hq,Hkv,D triples")
    p.add_argument("--prefix", default="512,2048,8192", help="shared prefix lengths P")
    p.add_argument("--siblings", default="2,4,8,16", help="sibling counts N")
    p.add_argument("--own", type=int, default=128, help="own tokens per row")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 (default: float32; on cuda also bfloat16)")
    p.add_argument("--iters", type=int, default=10)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _trees(P: int, N: int, own: int, bs: int) -> tuple[dict, dict, int, int]:
    """Shared tree (root P tokens, N own segments) and the flat equivalent (N private copies)."""
    nbp, nbo = math.ceil(P / bs), math.ceil(own / bs)

    def fills(n: int) -> list[int]:
        return [bs] * (n // bs) + ([n % bs] if n % bs else [])

    seg_fills = fills(P) + fills(own) * N
    shared = {"q_indptr": list(range(N + 1)),
              "seg_indptr": [0, nbp] + [nbp + (i + 1) * nbo for i in range(N)],
              "seg_blocks": list(range(nbp + N * nbo)), "seg_fills": seg_fills,
              "row_seg_indptr": [2 * i for i in range(N + 1)],
              "row_segs": [s for i in range(N) for s in (0, 1 + i)]}
    row_fills = fills(P) + fills(own)  # a private copy: prefix blocks then own blocks
    nbr = len(row_fills)
    flat = {"q_indptr": list(range(N + 1)), "seg_indptr": [i * nbr for i in range(N + 1)],
            "seg_blocks": list(range(N * nbr)), "seg_fills": row_fills * N,
            "row_seg_indptr": list(range(N + 1)), "row_segs": list(range(N))}
    return shared, flat, nbp + N * nbo, N * nbr


def _flashinfer_cascade(q, k, v, P, N, own, bs, Hq, Hkv, D):
    """A callable running flashinfer's 2-level cascade on the shared cache, or an error string."""
    try:
        import flashinfer  # type: ignore[import-not-found]
    except Exception as e:  # noqa: BLE001 - optional baseline, any import failure means absent
        return None, f"flashinfer not importable: {type(e).__name__}"
    try:
        dev = q.device
        nbp, nbo = math.ceil(P / bs), math.ceil(own / bs)
        i32 = dict(dtype=torch.int32, device=dev)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
        w = flashinfer.MultiLevelCascadeAttentionWrapper(2, ws, "HND")
        last_p = P - (nbp - 1) * bs
        last_o = own - (nbo - 1) * bs
        w.plan([torch.tensor([0, N], **i32), torch.arange(N + 1, **i32)],
               [torch.tensor([0, nbp], **i32), torch.arange(N + 1, **i32) * nbo],
               [torch.arange(nbp, **i32), nbp + torch.arange(N * nbo, **i32)],
               [torch.tensor([last_p], **i32), torch.full((N,), last_o, **i32)],
               Hq, Hkv, D, bs)
        return (lambda: w.run(q, (k, v))), None
    except Exception as e:  # noqa: BLE001 - report, don't fail the bench
        return None, f"flashinfer failed: {type(e).__name__}: {e}"[:200]


def _case(device: str, dtype: torch.dtype, Hq: int, Hkv: int, D: int, P: int, N: int, own: int,
          bs: int, iters: int) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(P * 31 + N)
    shared, flat, nb_s, nb_f = _trees(P, N, own, bs)
    sync = torch.cuda.synchronize if device == "cuda" else None

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q, k, v = rand(N, Hq, D), rand(nb_s, Hkv, bs, D), rand(nb_s, Hkv, bs, D)
    # the flat cache: every row's private copy of the same prefix, then its own tokens
    nbp, nbo = math.ceil(P / bs), math.ceil(own / bs)
    kf = torch.cat([torch.cat([k[:nbp], k[nbp + i * nbo:nbp + (i + 1) * nbo]]) for i in range(N)])
    vf = torch.cat([torch.cat([v[:nbp], v[nbp + i * nbo:nbp + (i + 1) * nbo]]) for i in range(N)])
    t0 = time.perf_counter()
    plan_s = A.plan(**shared, block_size=bs, device=device)
    plan_ms = (time.perf_counter() - t0) * 1e3
    plan_f = A.plan(**flat, block_size=bs, device=device)
    out = A.tree_attention(q, k, v, plan_s)
    t = common.time_interleaved({"cascade": lambda: A.tree_attention(q, k, v, plan_s),
                                 "flat": lambda: A.tree_attention(q, kf, vf, plan_f)},
                                iters=iters, sync=sync)
    t_cas, t_flat = t["cascade"], t["flat"]
    out_flat = A.tree_attention(q, kf, vf, plan_f)

    # SDPA over gathered contiguous K/V (all rows have P + own keys: one batched call)
    L = P + own
    slots = torch.arange(L)
    blk_f = torch.tensor(flat["seg_blocks"], device=device).view(N, -1)
    bidx = blk_f[:, (slots // bs).to(device)]  # [N, L]
    oidx = (slots % bs).to(device).expand(N, L)

    def gather():
        # k_cache[b, :, o] for all (row, slot) -> [N, L, Hkv, D] -> [N, Hkv, L, D]
        return (kf[bidx, :, oidx].permute(0, 2, 1, 3).contiguous(),
                vf[bidx, :, oidx].permute(0, 2, 1, 3).contiguous())

    t_gather = common.time_fn(gather, iters=max(2, iters // 3), sync=sync)
    K, V = gather()
    qs = q[:, :, None]  # [N, Hq, 1, D]: the last position attends every key, no mask needed
    t_sdpa = common.time_fn(lambda: F.scaled_dot_product_attention(qs, K, V, enable_gqa=True),
                            iters=iters, sync=sync)
    o_sdpa = F.scaled_dot_product_attention(qs, K, V, enable_gqa=True)[:, :, 0]
    del K, V

    el = torch.finfo(dtype).bits // 8
    tok_bytes = 2 * Hkv * D * el  # K + V of one token, all kv heads
    bytes_shared = (P + N * own) * tok_bytes
    bytes_flat = N * (P + own) * tok_bytes
    cas, fl, sd = t_cas["best_s"], t_flat["best_s"], t_sdpa["best_s"]
    row: dict[str, Any] = {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "Hq": Hq, "Hkv": Hkv, "D": D,
        "P": P, "N": N, "own": own,
        "cascade_ms": cas * 1e3, "flat_ms": fl * 1e3, "sdpa_ms": sd * 1e3,
        "sdpa_gather_ms": t_gather["best_s"] * 1e3, "plan_ms": plan_ms,
        "cascade_gbs": bytes_shared / cas / 1e9, "flat_gbs": bytes_flat / fl / 1e9,
        "copy_gbs": common.copy_bandwidth_gbs(device),
        "cascade_gflops": _flops(Hq, D, P, N, own) / cas / 1e9,
        "kv_mb_shared": bytes_shared / 1e6, "kv_mb_flat": bytes_flat / 1e6,
        "speedup_vs_flat": fl / cas, "speedup_vs_sdpa": sd / cas,
        "max_diff_vs_sdpa": float((out.float() - o_sdpa.float()).abs().max()),
        "max_diff_vs_flat": float((out.float() - out_flat.float()).abs().max()),
    }
    if device == "cuda" and dtype != torch.float32:
        fn, err = _flashinfer_cascade(q, k, v, P, N, own, bs, Hq, Hkv, D)
        if fn is not None:
            t_fi = common.time_fn(fn, iters=iters, sync=sync)
            row["flashinfer_ms"] = t_fi["best_s"] * 1e3
            row["speedup_vs_flashinfer"] = t_fi["best_s"] / cas
        else:
            row["flashinfer"] = err
    return row


def _flops(Hq: int, D: int, P: int, N: int, own: int) -> int:
    """Multiply-add FLOPs of one decode call, the same for every method: QK and PV for each of
    the N rows' Hq heads over its P + own keys."""
    return 4 * N * Hq * (P + own) * D


def _add_rooflines(row: dict[str, Any]) -> None:
    """Roofline fields of a case (common.roofline_ms) from the rates in row["read_gbs"] and
    row["gemm_gflops"]. Sharing only cuts bytes, so once the cascade is compute-bound a flat
    kernel at its own roofline is at most roofline_speedup_vs_flat slower."""
    flops = _flops(row["Hq"], row["D"], row["P"], row["N"], row["own"])
    rates = (row["read_gbs"], row["gemm_gflops"])
    roof_cas = common.roofline_ms(row["kv_mb_shared"] * 1e6, flops, *rates)
    roof_flat = common.roofline_ms(row["kv_mb_flat"] * 1e6, flops, *rates)
    row.update({
        "roofline_cascade_ms": roof_cas, "roofline_flat_ms": roof_flat,
        "cascade_roofline_share": roof_cas / row["cascade_ms"],
        "flat_roofline_share": roof_flat / row["flat_ms"],
        "roofline_speedup_vs_flat": roof_flat / roof_cas,
    })


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("npr bench attention: --device cuda but no CUDA device is available")
    dims = [tuple(_ints(t)) for t in args.dims.split(";") if t]
    prefixes, sibs = _ints(args.prefix), _ints(args.siblings)
    iters = args.iters
    if getattr(args, "quick", False):
        dims, prefixes, sibs, iters = dims[:1], [512, 2048], [2, 8], min(iters, 3)
    rows = []
    for device in devices:
        if args.dtype:
            dtypes = [getattr(torch, args.dtype)]
        else:
            dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
        for dtype in dtypes:
            # CPU: the fp32 GEMM rate (npr's kernels compute in fp32 whatever the storage);
            # CUDA: the dtype's tensor-core GEMM rate, a bound for any kernel, FlashInfer's
            # included (npr's CUDA kernels use fp32 math and cannot reach it)
            rate_dtype = torch.float32 if device == "cpu" else dtype
            for Hq, Hkv, D in dims:
                for P in prefixes:
                    for N in sibs:
                        row, read, gemm = common.rates_around(
                            device, rate_dtype, lambda: _case(device, dtype, Hq, Hkv, D, P, N,
                                                              args.own, args.block_size, iters))
                        row.update(read_gbs=read, gemm_gflops=gemm)
                        _add_rooflines(row)
                        rows.append(row)
    return rows
