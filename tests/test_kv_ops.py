"""npr::write_kv / npr::copy_blocks (C++ CPU, Triton under TRITON_INTERPRET=1) against npr.ref.kv;
opcheck; bad input; the pool + cache together (slots and copy-on-write copies from BlockPool);
CUDA (cpp and Triton) where a GPU is present."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (Triton tests on CPU)

import importlib.util
import random

import pytest
import torch

from npr import _ext, ops, ref

needs_ext = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
has_triton = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not has_triton or os.environ.get("TRITON_INTERPRET") != "1",
    reason="triton with TRITON_INTERPRET=1 needed for CPU runs",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_cache(nb: int, h: int, bs: int, d: int, dtype: torch.dtype, g: torch.Generator,
               layout: str = "hnd") -> tuple[torch.Tensor, torch.Tensor]:
    """Random caches [nb, h, bs, d]; layout "nhd" stores them token-major (strided view)."""
    def one() -> torch.Tensor:
        if layout == "nhd":
            return torch.randn(nb, bs, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(nb, h, bs, d, generator=g).to(dtype)
    return one(), one()


def random_slots(t: int, nb: int, bs: int, g: torch.Generator, pad: float = 0.2) -> torch.Tensor:
    slots = torch.randperm(nb * bs, generator=g)[:t].clone()
    padded = torch.rand(t, generator=g) < pad
    padded[:1] = False  # at least one real write, so a no-op kernel cannot pass
    slots[padded] = -1
    return slots


def loop_write_kv(k, v, kc, vc, slots):
    """The definition, one token at a time (checks the vectorised reference itself)."""
    bs = kc.shape[2]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // bs, :, s % bs] = k[t]
            vc[s // bs, :, s % bs] = v[t]


WRITE_SHAPES = [  # (T, Hkv, D, num_blocks, block_size)
    (1, 1, 8, 2, 4), (7, 2, 16, 5, 4), (33, 3, 5, 9, 16), (64, 4, 64, 12, 16), (13, 1, 1, 3, 7),
    (0, 2, 8, 4, 4), (40, 8, 128, 8, 8),
]


def test_reference_matches_definition():
    g = torch.Generator().manual_seed(0)
    for T, H, D, nb, bs in WRITE_SHAPES:
        k, v = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
        kc, vc = make_cache(nb, H, bs, D, torch.float32, g)
        slots = random_slots(T, nb, bs, g)
        kc2, vc2 = kc.clone(), vc.clone()
        ref.write_kv(k, v, kc, vc, slots)
        loop_write_kv(k, v, kc2, vc2, slots)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WRITE_SHAPES)
@pytest.mark.parametrize("layout", ["hnd", "nhd"])
def test_write_kv_cpp_matches_reference(shape, dtype, layout):
    T, H, D, nb, bs = shape
    g = torch.Generator().manual_seed(hash((shape, str(dtype), layout)) % 2**31)
    # k/v as strided views of a fused qkv projection, the way a model produces them.
    qkv = torch.randn(T, 3 * H, D, generator=g).to(dtype)
    k, v = qkv[:, H:2 * H], qkv[:, 2 * H:]
    kc, vc = make_cache(nb, H, bs, D, dtype, g, layout)
    slots = random_slots(T, nb, bs, g)
    kr, vr = kc.clone(), vc.clone()
    ref.write_kv(k, v, kr, vr, slots)
    ops.write_kv(k, v, kc, vc, slots, backend="cpp")
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


COPY_SHAPES = [  # (N, num_blocks, Hkv, block_size, D)
    (1, 2, 1, 4, 8), (3, 8, 2, 16, 5), (5, 12, 3, 7, 64), (0, 4, 2, 4, 4), (16, 40, 4, 16, 128),
]


def random_pairs(n: int, nb: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(nb, generator=g)
    dst = perm[:n].clone()
    src_pool = perm[n:]  # src never a dst (copy-on-write copies into fresh blocks)
    src = src_pool[torch.randint(len(src_pool), (n,), generator=g)] if n else perm[:0].clone()
    return src, dst


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", COPY_SHAPES)
@pytest.mark.parametrize("layout", ["hnd", "nhd"])
def test_copy_blocks_cpp_matches_reference(shape, dtype, layout):
    N, nb, H, bs, D = shape
    g = torch.Generator().manual_seed(hash((shape, str(dtype), layout)) % 2**31)
    kc, vc = make_cache(nb, H, bs, D, dtype, g, layout)
    src, dst = random_pairs(N, nb, g)
    kr, vr = kc.clone(), vc.clone()
    ref.copy_blocks(kr, vr, src, dst)
    ops.copy_blocks(kc, vc, src, dst, backend="cpp")
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    if N:
        assert torch.equal(kc[dst], kc[src]) and torch.equal(vc[dst], vc[src])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 5, 4, 4), (6, 3, 16, 3, 8), (0, 1, 4, 2, 2)])
def test_write_kv_triton_matches_reference(shape, dtype):
    T, H, D, nb, bs = shape
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    qkv = torch.randn(T, 3 * H, D, generator=g).to(dtype)
    k, v = qkv[:, H:2 * H], qkv[:, 2 * H:]
    kc, vc = make_cache(nb, H, bs, D, dtype, g, "nhd" if dtype == torch.float16 else "hnd")
    slots = random_slots(T, nb, bs, g, pad=0.3)
    kr, vr = kc.clone(), vc.clone()
    ref.write_kv(k, v, kr, vr, slots)
    ops.write_kv(k, v, kc, vc, slots, backend="triton")
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 6, 2, 4, 8), (3, 5, 1, 3, 5)])
def test_copy_blocks_triton_matches_reference(shape, dtype):
    N, nb, H, bs, D = shape
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    kc, vc = make_cache(nb, H, bs, D, dtype, g, "nhd" if dtype == torch.bfloat16 else "hnd")
    src, dst = random_pairs(N, nb, g)
    kr, vr = kc.clone(), vc.clone()
    ref.copy_blocks(kr, vr, src, dst)
    ops.copy_blocks(kc, vc, src, dst, backend="triton")
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2, 8, 4, 4), (17, 3, 16, 6, 8), (0, 1, 4, 2, 2)])
def test_write_kv_opcheck(shape, dtype):
    T, H, D, nb, bs = shape
    g = torch.Generator().manual_seed(1)
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    kc, vc = make_cache(nb, H, bs, D, dtype, g)
    slots = random_slots(T, nb, bs, g)
    torch.library.opcheck(torch.ops.npr.write_kv.default, (k, v, kc, vc, slots))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 6, 2, 4, 8), (4, 9, 3, 16, 5)])
def test_copy_blocks_opcheck(shape, dtype):
    N, nb, H, bs, D = shape
    g = torch.Generator().manual_seed(2)
    kc, vc = make_cache(nb, H, bs, D, dtype, g)
    src, dst = random_pairs(N, nb, g)
    torch.library.opcheck(torch.ops.npr.copy_blocks.default, (kc, vc, src, dst))


BACKENDS_CPU = ["cpp", "ref"] + (["triton"] if has_triton else [])


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_write_kv_bad_input_names_problem(backend):
    if backend == "cpp" and not _ext.available():
        pytest.skip("npr._C not built")
    kc, vc = torch.zeros(4, 2, 4, 8), torch.zeros(4, 2, 4, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    s = torch.tensor([0, 5, -1])
    cases = [
        ((k, v, kc, vc, torch.tensor([0, 16, 1])), "out of range"),
        ((k, v, kc, vc, s.int()), "int64"),
        ((k, v, kc, vc, s[:2]), "slots has 2 entries"),
        ((k.half(), v.half(), kc, vc, s), "dtype"),
        ((k[:, :1], v[:, :1], kc, vc, s), "heads"),
        ((k, v, kc[0], vc[0], s), "k_cache must be"),
        ((k, v, kc, vc[:3], s), "v_cache shape"),
        ((k, v[:2], kc, vc, s), "v shape"),
        ((k, v, kc.double(), vc.double(), s), "float32, bfloat16 or float16"),
        ((k, v, kc[..., ::2], vc[..., ::2], s), None),  # D mismatch is reported too
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ops.write_kv(*args, backend=backend)
    assert kc.abs().sum() == 0, "a failed call must not write"


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_copy_blocks_bad_input_names_problem(backend):
    if backend == "cpp" and not _ext.available():
        pytest.skip("npr._C not built")
    kc, vc = torch.randn(4, 2, 4, 8), torch.randn(4, 2, 4, 8)
    before = kc.clone()
    t = lambda *x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    cases = [
        ((kc, vc, t(0), t(4)), "out of range"),
        ((kc, vc, t(-1), t(1)), "out of range"),
        ((kc, vc, t(0, 1), t(2)), "src has 2"),
        ((kc, vc, t(0, 1), t(2, 2)), "twice"),
        ((kc, vc, t(0, 2), t(2, 3)), "both a src and a dst"),
        ((kc, vc, t(0).int(), t(1)), "int64"),
        ((kc, vc.half(), t(0), t(1)), "dtype"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ops.copy_blocks(*args, backend=backend)
    assert torch.equal(kc, before)


def test_unknown_backend_is_refused():
    kc = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="backend"):
        ops.copy_blocks(kc, kc.clone(), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long), backend="fast")


@needs_ext
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_pool_and_cache_together(backend):
    """Decode a branch tree through the pool: every table reads back exactly its own K/V."""
    from npr.block_pool import BlockPool

    rng = random.Random(7)
    g = torch.Generator().manual_seed(7)
    nb, H, bs, D = 24, 2, 4, 8
    pool = BlockPool(nb, bs)
    kc, vc = torch.zeros(nb, H, bs, D), torch.zeros(nb, H, bs, D)
    truth: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(t: int, n: int) -> None:
        r = pool.append(t, n)
        ops.kv.copy_blocks_from_pairs(kc, vc, r.copies, backend=backend)
        k, v = torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g)
        ops.write_kv(k, v, kc, vc, torch.tensor(r.slots, dtype=torch.int64), backend=backend)
        tk, tv = truth[t]
        truth[t] = (torch.cat([tk, k]), torch.cat([tv, v]))

    def check() -> None:
        for t, (tk, tv) in truth.items():
            s = torch.tensor(pool.slots(t), dtype=torch.int64)
            blk, off = s // bs, s % bs
            assert torch.equal(kc[blk, :, off], tk) and torch.equal(vc[blk, :, off], tv)

    root = pool.create()
    truth[root] = (torch.zeros(0, H, D), torch.zeros(0, H, D))
    append(root, 6)
    for round_ in range(3):
        if round_ != 1:
            pool.seal(root)  # round 1 forks unsealed: children copy the shared last block
        kids = pool.fork(root, rng.choice([2, 3]))
        for c in kids:
            truth[c] = truth[root]
        for _ in range(3):
            for c in kids:
                append(c, rng.randrange(1, 4))
            check()
        if round_ == 1:
            for c in kids:  # unsealed fork: the children diverged from the parent's last block
                pool.free(c)
                del truth[c]
        else:
            pool.join(root, kids)
            plen = len(truth[root][0])
            for c in kids:
                ck, cv = truth.pop(c)
                truth[root] = (torch.cat([truth[root][0], ck[plen:]]),
                               torch.cat([truth[root][1], cv[plen:]]))
        append(root, 2)
        check()
        pool.check_invariants()
    pool.free(root)
    assert pool.num_used() == 0


# ---- CUDA (run where a GPU is present; Triton there needs TRITON_INTERPRET unset or 0) ----------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA_BACKENDS = (["cpp"] if _ext.with_cuda() else []) + (
    ["triton"] if has_triton and os.environ.get("TRITON_INTERPRET") != "1" else [])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["hnd", "nhd"])
def test_cuda_matches_reference(backend, dtype, layout):
    g = torch.Generator().manual_seed(3)
    for T, H, D, nb, bs in WRITE_SHAPES + [(300, 8, 128, 64, 16), (9, 3, 7, 5, 3)]:
        qkv = torch.randn(T, 3 * H, D, generator=g).to(dtype)
        k, v = qkv[:, H:2 * H], qkv[:, 2 * H:]
        kc, vc = make_cache(nb, H, bs, D, dtype, g, layout)
        slots = random_slots(T, nb, bs, g)
        kr, vr = kc.clone(), vc.clone()
        ref.write_kv(k, v, kr, vr, slots)
        kd, vd = kc.cuda(), vc.cuda()
        if layout == "nhd":  # keep the strided layout on the device
            kd = kc.transpose(1, 2).contiguous().cuda().transpose(1, 2)
            vd = vc.transpose(1, 2).contiguous().cuda().transpose(1, 2)
        ops.write_kv(k.cuda(), v.cuda(), kd, vd, slots.cuda(), backend=backend)
        assert torch.equal(kd.cpu(), kr) and torch.equal(vd.cpu(), vr), (T, H, D, nb, bs)
    for N, nb, H, bs, D in COPY_SHAPES + [(100, 256, 8, 16, 128), (3, 7, 2, 5, 3)]:
        kc, vc = make_cache(nb, H, bs, D, dtype, g, layout)
        src, dst = random_pairs(N, nb, g)
        kr, vr = kc.clone(), vc.clone()
        ref.copy_blocks(kr, vr, src, dst)
        kd, vd = kc.cuda(), vc.cuda()
        ops.copy_blocks(kd, vd, src.cuda(), dst.cuda(), backend=backend)
        assert torch.equal(kd.cpu(), kr) and torch.equal(vd.cpu(), vr), (N, nb, H, bs, D)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_out_of_range_ids_write_nothing(backend):
    kc, vc = torch.zeros(4, 2, 4, 8, device="cuda"), torch.zeros(4, 2, 4, 8, device="cuda")
    k = torch.ones(2, 2, 8, device="cuda")
    ops.write_kv(k, k, kc, vc, torch.tensor([16, 1 << 40], device="cuda"), backend=backend)
    ops.copy_blocks(kc, vc, torch.tensor([0], device="cuda"), torch.tensor([9], device="cuda"),
                    backend=backend)
    torch.cuda.synchronize()
    assert kc.abs().sum().item() == 0 and vc.abs().sum().item() == 0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(not _ext.with_cuda(), reason="npr._C built without CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_opcheck(dtype):
    g = torch.Generator().manual_seed(4)
    k = torch.randn(9, 2, 16, generator=g).to(dtype).cuda()
    kc, vc = (c.cuda() for c in make_cache(6, 2, 4, 16, dtype, g))
    torch.library.opcheck(torch.ops.npr.write_kv.default,
                          (k, k.clone(), kc, vc, random_slots(9, 6, 4, g).cuda()))
    src, dst = random_pairs(2, 6, g)
    torch.library.opcheck(torch.ops.npr.copy_blocks.default, (kc, vc, src.cuda(), dst.cuda()))
