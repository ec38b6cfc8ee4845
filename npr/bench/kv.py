"""`npr bench kv`: paged-KV write kernels, block-pool latency, and KV memory held with sharing.

Parts (--parts, default all):
  ops     write_kv / copy_blocks throughput per backend: achieved GB/s (bytes read + written, from
          the best time: the shared 2-core VM adds scheduling noise to medians) against this
          machine's measured copy bandwidth (npr.bench.common.copy_bandwidth_gbs, 256 MB buffers).
          Small cases run from the CPU caches and can exceed that DRAM figure.
  pool    latency of BlockPool fork / append / join / free for N in {2, 4, 8, 16} branches
          (through the Python binding: includes ~0.1-0.3 us of call overhead).
  memory  KV held by a fork tree built in the pool (prefix P, seal, fork N, 128 own tokens per
          branch, block_size 16) vs the ideal P + N*128 tokens and vs N independent sequences
          (no sharing, also built in the pool). Target: held <= 1.04 x (P + N*128).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from npr import _ext, env
from npr.bench import common

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="ops,pool,memory", help="comma list of ops,pool,memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (ops part)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    p.add_argument("--backends", default=None,
                   help="comma list of cpp,triton,ref (default: cpp,ref on CPU, cpp,triton on "
                   "CUDA)")


def _pool_slots(T: int, nb: int, bs: int, g: torch.Generator) -> torch.Tensor:
    """Slots the pool would hand out: T tokens in ceil(T/bs) scattered blocks, filled in order."""
    nblk = -(-T // bs)
    blocks = torch.randperm(nb, generator=g)[:nblk]
    return (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:T].contiguous()


def _time_per_call(fn, iters: int, sync, calls: int) -> dict[str, float]:
    def many() -> None:
        for _ in range(calls):
            fn()
    t = common.time_fn(many, warmup=2, iters=iters, sync=sync)
    return {"median_s": t["median_s"] / calls, "best_s": t["best_s"] / calls}


def _ops_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from npr import ops

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    backends = (args.backends.split(",") if args.backends
                else (["cpp", "triton"] if cuda else ["cpp", "ref"]))
    if not _ext.available() or (cuda and not _ext.with_cuda()):
        backends = [b for b in backends if b != "cpp"]
    if not cuda and not env.triton_interpret():
        backends = [b for b in backends if b != "triton"]
    sync = torch.cuda.synchronize if cuda else None
    copy_bw = common.copy_bandwidth_gbs(args.device)
    H, D, bs = 8, 128, 16
    nb = 512 if args.quick else (8192 if cuda else 2048)
    token_counts = [1, 64, 1024] if args.quick else [1, 16, 64, 256, 1024, 4096]
    block_counts = [1, 16] if args.quick else [1, 4, 16, 64, 256]
    iters = 5 if args.quick else 20
    calls = 20 if cuda else 1  # back-to-back launches per timed sample: hides the sync latency
    g = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for dname in args.dtypes.split(","):
        dtype = _DTYPES[dname]
        kc = torch.zeros(nb, H, bs, D, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        es = kc.element_size()
        for T in token_counts:
            k = torch.randn(T, H, D, generator=g).to(dtype).to(dev)
            v = torch.randn(T, H, D, generator=g).to(dtype).to(dev)
            slots = _pool_slots(T, nb, bs, g).to(dev)
            nbytes = 2 * 2 * T * H * D * es + 8 * T  # k and v read + written, slots read
            for be in backends:
                if be == "ref" and T > 1024 and not args.quick:
                    continue
                t = _time_per_call(lambda: ops.write_kv(k, v, kc, vc, slots, backend=be),
                                   iters, sync, calls)
                gbs = nbytes / t["best_s"] / 1e9
                rows.append({"part": "ops", "op": "write_kv", "backend": be, "dtype": dname,
                             "n": T, "Hkv": H, "D": D, "block_size": bs,
                             "median_us": t["median_s"] * 1e6, "best_us": t["best_s"] * 1e6,
                             "GB/s": gbs,
                             "pct_copy_bw": 100 * gbs / copy_bw})
        for N in block_counts:
            perm = torch.randperm(nb, generator=g)
            src, dst = perm[:N].to(dev), perm[N:2 * N].to(dev)
            nbytes = 2 * 2 * N * H * bs * D * es
            for be in backends:
                t = _time_per_call(lambda: ops.copy_blocks(kc, vc, src, dst, backend=be),
                                   iters, sync, calls)
                gbs = nbytes / t["best_s"] / 1e9
                rows.append({"part": "ops", "op": "copy_blocks", "backend": be, "dtype": dname,
                             "n": N, "Hkv": H, "D": D, "block_size": bs,
                             "median_us": t["median_s"] * 1e6, "best_us": t["best_s"] * 1e6,
                             "GB/s": gbs,
                             "pct_copy_bw": 100 * gbs / copy_bw})
    return rows


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1e3


def _pool_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from npr.block_pool import BlockPool

    P, bs = 2048, 16
    reps = 50 if args.quick else 400
    rows = []
    for N in (2, 4, 8, 16):
        pool = BlockPool(P // bs + N * 4 + 8, bs)
        t_fork, t_app, t_app_fill, t_join, t_free = [], [], [], [], []
        for _ in range(reps):
            root = pool.create()
            pool.append(root, P)
            pool.seal(root)
            t0 = time.perf_counter_ns()
            kids = pool.fork(root, N)
            t_fork.append(time.perf_counter_ns() - t0)
            for c in kids:
                t0 = time.perf_counter_ns()
                pool.append(c, 1)  # takes a fresh block
                t_app.append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                pool.append(c, 1)  # fills it in place
                t_app_fill.append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            pool.join(root, kids)
            t_join.append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            pool.free(root)
            t_free.append(time.perf_counter_ns() - t0)
        for op, s in (("fork", t_fork), ("append (new block)", t_app),
                      ("append (fill)", t_app_fill), ("join", t_join), ("free", t_free)):
            rows.append({"part": "pool", "op": op, "n": N, "P": P, "block_size": bs,
                         "median_us": _median_us(s)})
    return rows


def _memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from npr.block_pool import BlockPool

    bs, own = 16, 128
    rows = []
    for P in (512, 2048, 8192):
        for N in (2, 4, 8, 16):
            nblocks = N * (-(-(P + own) // bs)) + 8
            pool = BlockPool(nblocks, bs)
            root = pool.create()
            pool.append(root, P)
            pool.seal(root)
            kids = pool.fork(root, N)
            copies = 0
            for _ in range(own):  # decode: one token per branch per step
                for c in kids:
                    copies += len(pool.append(c, 1).copies)
            held = pool.num_used() * bs
            pool.join(root, kids)
            held_joined = pool.num_used() * bs
            pool.free(root)
            # No sharing: N independent sequences of P + own tokens, in the same pool.
            seqs = [pool.create() for _ in range(N)]
            for s in seqs:
                pool.append(s, P + own)
            no_share = pool.num_used() * bs
            for s in seqs:
                pool.free(s)
            assert pool.num_used() == 0
            ideal = P + N * own
            rows.append({"part": "memory", "P": P, "n": N, "own": own, "block_size": bs,
                         "held_tokens": held, "held_after_join": held_joined,
                         "ideal_tokens": ideal, "no_share_tokens": no_share,
                         "held_vs_ideal": held / ideal, "no_share_vs_held": no_share / held,
                         "cow_copies": copies, "target_ok": held <= 1.04 * ideal})
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    parts = args.parts.split(",")
    unknown = set(parts) - {"ops", "pool", "memory"}
    if unknown:
        raise ValueError(f"npr bench kv: unknown parts {sorted(unknown)} (ops, pool, memory)")
    if ("pool" in parts or "memory" in parts):
        _ext.require("npr bench kv (the block pool)")
    rows: list[dict[str, Any]] = []
    if "ops" in parts:
        rows += _ops_rows(args)
    if "pool" in parts:
        rows += _pool_rows(args)
    if "memory" in parts:
        rows += _memory_rows(args)
    return rows
