"""Per-op microbenchmarks: branch-tree attention, write_kv / copy_blocks, the small-row linear,
rms_norm. Shapes follow the tests' and `npr bench`'s cases (SmolLM2-135M's, and a 16/4/128 GQA
model for attention)."""
from __future__ import annotations

import pytest
import torch

from npr import _ext, ops, ref
from npr.bench.attention import _trees
from npr.ops import attention as A

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")


# ---- branch-tree attention: N siblings decode over a shared P-token prefix, `own` tokens each --
@pytest.mark.parametrize("layout", ["cascade", "flat"])
@pytest.mark.parametrize("N", [1, 4, 8])
@pytest.mark.parametrize("P", [1024, 8192])
@pytest.mark.parametrize("heads", [(16, 4, 128), (9, 3, 64)], ids=lambda h: "%d-%d-%d" % h)
def bench_tree_attention(benchmark, record, isa, heads, P, N, layout):
    """cascade: the shared prefix stored once (the engine's layout); flat: each row has a private
    copy of it (no sharing), same queries and keys."""
    Hq, Hkv, D = heads
    own, bs = 128, 16
    shared, flat, nb_s, nb_f = _trees(P, N, own, bs)
    tree, nb = (shared, nb_s) if layout == "cascade" else (flat, nb_f)
    g = torch.Generator().manual_seed(P + N)
    q = torch.randn(N, Hq, D, generator=g)
    k, v = torch.randn(nb, Hkv, bs, D, generator=g), torch.randn(nb, Hkv, bs, D, generator=g)
    plan = A.plan(**tree, block_size=bs)
    record(op="tree_attention", layout=layout, Hq=Hq, Hkv=Hkv, D=D, P=P, N=N, own=own,
           block_size=bs, dtype=torch.float32, kv_mb=2 * nb * Hkv * bs * D * 4 / 1e6)
    benchmark(A.tree_attention, q, k, v, plan)


# ---- paged KV writes ------------------------------------------------------------------------
_H, _D, _BS, _NB = 8, 128, 16, 2048


@pytest.mark.parametrize("backend", ["cpp", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 64, 1024])
def bench_write_kv(benchmark, record, T, dtype, backend):
    g = torch.Generator().manual_seed(T)
    kc = torch.zeros(_NB, _H, _BS, _D, dtype=dtype)
    vc = torch.zeros_like(kc)
    k, v = (torch.randn(T, _H, _D, generator=g).to(dtype) for _ in range(2))
    blocks = torch.randperm(_NB, generator=g)[: -(-T // _BS)]
    slots = (blocks[:, None] * _BS + torch.arange(_BS)).reshape(-1)[:T].contiguous()
    record(op="write_kv", backend=backend, tokens=T, Hkv=_H, D=_D, block_size=_BS, dtype=dtype)
    benchmark(ops.write_kv, k, v, kc, vc, slots, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("blocks", [1, 16, 256])
def bench_copy_blocks(benchmark, record, blocks, dtype, backend):
    g = torch.Generator().manual_seed(blocks)
    kc = torch.randn(_NB, _H, _BS, _D, generator=g).to(dtype)
    vc = torch.randn(_NB, _H, _BS, _D, generator=g).to(dtype)
    perm = torch.randperm(_NB, generator=g)
    src, dst = perm[:blocks].contiguous(), perm[blocks:2 * blocks].contiguous()
    record(op="copy_blocks", backend=backend, blocks=blocks, Hkv=_H, D=_D, block_size=_BS,
           dtype=dtype)
    benchmark(ops.copy_blocks, kc, vc, src, dst, backend=backend)


# ---- linear at decode row counts --------------------------------------------------------------
LINEAR_SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]  # (K, N)


@pytest.mark.parametrize("kernel", ["plain-fp32", "packed-fp32", "packed-bf16", "torch"])
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "%dx%d" % s)
def bench_linear(benchmark, record, isa, shape, rows, kernel):
    """Weights stay hot in the caches between calls here, except 4096x4096 fp32 (64 MB), which
    streams; `npr bench linear` times cold weights as in a decode step."""
    K, N = shape
    g = torch.Generator().manual_seed(K + N + rows)
    x, w = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g)
    if kernel == "torch":
        fn, weight_bytes = (lambda: torch.nn.functional.linear(x, w)), 4 * N * K
    elif kernel == "plain-fp32":
        fn, weight_bytes = (lambda: ops.linear(x, w)), 4 * N * K
    else:
        dtype = torch.float32 if kernel == "packed-fp32" else torch.bfloat16
        pw = ops.pack_linear_weight(w, dtype)
        fn, weight_bytes = (lambda: ops.linear(x, pw)), torch.finfo(dtype).bits // 8 * N * K
    record(op="linear", kernel=kernel, rows=rows, K=K, N=N, weight_mb=weight_bytes / 1e6)
    benchmark(fn)


# ---- rms_norm -------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["npr", "ref"])
@pytest.mark.parametrize("shape", [(1, 576), (8, 576), (64, 576), (4, 1031), (2048, 576)],
                         ids=lambda s: "%dx%d" % s)
def bench_rms_norm(benchmark, record, shape, impl):
    g = torch.Generator().manual_seed(shape[0])
    x, w = torch.randn(*shape, generator=g), torch.rand(shape[-1], generator=g) + 0.5
    fn = torch.ops.npr.rms_norm if impl == "npr" else ref.rms_norm
    record(op="rms_norm", impl=impl, rows=shape[0], D=shape[1], dtype=torch.float32)
    benchmark(fn, x, w, 1e-6)
