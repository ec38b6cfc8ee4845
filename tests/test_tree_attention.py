"""Branch-tree (cascade) attention: the C++ / CUDA / Triton kernels against the pure-torch reference
on random trees (ragged fills, partial blocks mid-segment, shared prefixes up to thousands of
tokens, GQA, decode / extend / prefill), the planner's sharing, opcheck, and clear errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from npr import _ext
from npr.ops import attention as A
from npr.ref import attention as R

TREE_KEYS = ("q_indptr", "seg_indptr", "seg_blocks", "seg_fills", "row_seg_indptr", "row_segs")


def random_tree(g: torch.Generator, *, bs: int, depth: int, max_fan: int, seg_tok=(1, 40),
                qlen: int = 1, n_loose: int = 1, root_tok: int | None = None, min_fan: int = 1,
                prefill_loose: bool = False) -> tuple[dict[str, list[int]], int]:
    """A random branch tree (rows = leaves, each row's last segment is its own) plus n_loose rows
    that share nothing. Segments are split into entries with random partial fills anywhere.
    Returns the tree's int lists and the number of cache blocks to allocate (some left unused)."""
    def rnd(a: int, b: int) -> int:
        return int(torch.randint(a, b + 1, (1,), generator=g))

    seg_len: list[int] = []
    rows: list[tuple[list[int], int]] = []  # (path, q_len)

    def new_seg(n: int) -> int:
        seg_len.append(n)
        return len(seg_len) - 1

    def grow(path: list[int], level: int) -> None:  # depth levels of branching below the root
        for _ in range(rnd(min_fan, max_fan)):
            if level == depth:
                rows.append((path + [new_seg(max(qlen, rnd(*seg_tok)))], qlen))
            else:
                grow(path + [new_seg(rnd(*seg_tok))], level + 1)

    grow([new_seg(root_tok if root_tok is not None else rnd(*seg_tok))], 1)
    for _ in range(n_loose):
        n = max(qlen, rnd(*seg_tok))
        rows.append(([new_seg(n)], n if prefill_loose else qlen))
    seg_indptr, fills = [0], []
    for n in seg_len:
        while n > 0:
            f = min(n, bs if float(torch.rand(1, generator=g)) < 0.6 else rnd(1, bs))
            fills.append(f)
            n -= f
        seg_indptr.append(len(fills))
    nb = len(fills) + 3
    blocks = torch.randperm(nb, generator=g)[:len(fills)].tolist()
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    tree = {"q_indptr": [0], "seg_indptr": seg_indptr, "seg_blocks": blocks, "seg_fills": fills,
            "row_seg_indptr": [0], "row_segs": []}
    for path, n in rows:
        tree["row_segs"] += path
        tree["row_seg_indptr"].append(len(tree["row_segs"]))
        tree["q_indptr"].append(tree["q_indptr"][-1] + n)
    return tree, nb


def make_inputs(g, tree, nb, bs, hkv, grp, d, dtype=torch.float32, device="cpu"):
    T = tree["q_indptr"][-1]
    q = torch.randn(T, hkv * grp, d, generator=g)
    k = torch.randn(nb, hkv, bs, d, generator=g)
    v = torch.randn(nb, hkv, bs, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def reference64(q, k, v, tree, scale=None):
    return R.tree_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                            *[tree[n] for n in TREE_KEYS], scale=scale,
                            compute_dtype=torch.float64)


def rel_err(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o.double().cpu() - ref).abs().max() / ref.abs().max())


# (bs, depth, max_fan, seg_tok, qlen, hkv, G, D, n_loose, root_tok, kv_chunk, max_item_queries)
CASES = [
    (16, 1, 16, (1, 40), 1, 2, 4, 128, 1, 3000, 1024, 64),   # 16 siblings, long prefix, decode
    (16, 2, 4, (1, 60), 1, 2, 3, 64, 2, None, 1024, 64),     # depth 2, G=3
    (8, 3, 3, (1, 30), 1, 1, 1, 64, 1, None, 16, 64),        # depth 3, MHA, tiny chunks
    (16, 3, 3, (5, 50), 4, 2, 4, 64, 1, 200, 64, 5),         # extend, small query groups
    (5, 2, 5, (1, 25), 3, 3, 3, 128, 2, None, 7, 64),        # odd block size, extend
    (16, 1, 8, (100, 300), 2, 2, 1, 128, 0, 5000, 512, 64),  # long prefix + long own parts
    (32, 1, 1, (1, 40), 1, 1, 4, 64, 3, 700, 1024, 64),      # one child chain + loose rows
    (16, 2, 3, (1, 30), 1, 2, 3, 36, 1, None, 1024, 64),     # head dim not a multiple of 8
]


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_fp32_matches_reference(case, isa):
    bs, depth, fan, seg_tok, qlen, hkv, grp, d, loose, root, chunk, miq = CASES[case]
    g = torch.Generator().manual_seed(100 + case)
    tree, nb = random_tree(g, bs=bs, depth=depth, max_fan=fan, seg_tok=seg_tok, qlen=qlen,
                           n_loose=loose, root_tok=root)
    q, k, v = make_inputs(g, tree, nb, bs, hkv, grp, d)
    p = A.plan(**tree, block_size=bs, num_blocks=nb, kv_chunk=chunk, max_item_queries=miq)
    o = A.tree_attention(q, k, v, p, backend="cpp")
    assert o.dtype == torch.float32 and o.shape == q.shape
    assert rel_err(o, reference64(q, k, v, tree)) <= 1e-5


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_wide_kernel_row_counts(isa, dtype):
    """N siblings decode over a shared prefix with G query heads per kv head: N * G query rows per
    shared task pick the kernel (row kernel < 16 rows; wide kernel, AVX-512 when the rows fill
    16-lane registers, else AVX2 with 1-3 register tails; the row kernel again when D % 8 != 0).
    The last row extends by up to 5 tokens: causal masks in its own segment's items."""
    from npr import _C

    g = torch.Generator().manual_seed(11)
    _C.tree_attention_task_counts(reset=True)
    for n, grp, d in [(3, 4, 64), (4, 4, 128), (5, 3, 64), (6, 4, 128), (8, 3, 128), (11, 3, 64),
                      (16, 4, 64), (17, 1, 128), (8, 4, 36), (6, 3, 20)]:
        own = [int(x) for x in torch.randint(1, 40, (n,), generator=g)]
        seg_len = [300] + own
        fills, seg_indptr = [], [0]
        for length in seg_len:
            while length > 0:
                f = min(length, 16 if float(torch.rand(1, generator=g)) < 0.7 else
                        int(torch.randint(1, 17, (1,), generator=g)))
                fills.append(f)
                length -= f
            seg_indptr.append(len(fills))
        qlen = [1] * (n - 1) + [min(own[-1], 5)]  # the last row extends by up to 5 tokens
        tree = {"q_indptr": [0] + list(torch.tensor(qlen).cumsum(0).tolist()),
                "seg_indptr": seg_indptr, "seg_blocks": list(range(len(fills))),
                "seg_fills": fills, "row_seg_indptr": [2 * i for i in range(n + 1)],
                "row_segs": [s for i in range(n) for s in (0, 1 + i)]}
        q, k, v = make_inputs(g, tree, len(fills), 16, 2, grp, d, dtype)
        p = A.plan(**tree, block_size=16, kv_chunk=128)
        o = A.tree_attention(q, k, v, p, backend="cpp")
        ref = reference64(q, k, v, tree)
        tol = 1e-5 if dtype == torch.float32 else 2 * _sdpa_bf16_error(q, k, v, tree, ref) + 1e-6
        err = rel_err(o, ref) if dtype == torch.float32 else float((o.double() - ref).abs().max())
        assert err <= tol, (n, grp, d, err)
    row, wide2, wide512 = _C.tree_attention_task_counts(reset=True)
    assert row > 0 and wide2 > 0  # 12-row tasks, own segments, D % 8 != 0; 24 or 33 rows
    assert (wide512 > 0) == (_C.cpu_isa() == "avx512")  # 16, 32, 64 rows


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("n", [4, 6, 8])
def test_cpu_wide_kernel_as_accurate_as_the_row_kernel(isa, n):
    """Long heads (D = 256) and sharp softmax (q, k x 2): the same inputs through the wide kernel
    (n siblings x 4 heads >= 16 rows per task) and through the row kernel (max_item_queries=1:
    4 rows per task) against fp64. Summing each D = 256 dot product in one fp32 chain made the
    wide kernel 10x less accurate than the row kernel here."""
    nf = 1000 // 16
    fills = [16] * nf + [1] * n
    tree = {"q_indptr": list(range(n + 1)), "seg_indptr": [0, nf] + [nf + 1 + i for i in range(n)],
            "seg_blocks": list(range(len(fills))), "seg_fills": fills,
            "row_seg_indptr": [2 * i for i in range(n + 1)],
            "row_segs": [s for i in range(n) for s in (0, 1 + i)]}
    worst_wide = worst_row = 0.0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, k, v = make_inputs(g, tree, len(fills), 16, 1, 4, 256)
        q, k = q * 2, k * 2
        ref = reference64(q, k, v, tree)
        wide = A.tree_attention(q, k, v, A.plan(**tree, block_size=16), backend="cpp")
        row = A.tree_attention(q, k, v, A.plan(**tree, block_size=16, max_item_queries=1),
                               backend="cpp")
        worst_wide, worst_row = max(worst_wide, rel_err(wide, ref)), max(worst_row, rel_err(row, ref))
    assert worst_wide <= 1e-5 and worst_wide <= max(3 * worst_row, 2e-6), (worst_wide, worst_row)


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("rows", [4, 24, 32])
def test_cpu_nan_in_a_key_reaches_every_query_that_sees_it(isa, rows):
    """A NaN in the cache is not hidden: queries that attend to it get NaN (as in the reference),
    the others stay finite. Covers the row kernel (4 rows) and the wide kernels (24, 32)."""
    n, grp, d, bs = rows // 4, 4, 64, 16
    tree = {"q_indptr": list(range(n + 2)), "seg_indptr": [0, 6] + [6 + i + 1 for i in range(n)]
            + [6 + n + 1], "seg_blocks": list(range(6 + n + 1)), "seg_fills": [16] * 6 + [5] * (n + 1),
            "row_seg_indptr": [2 * i for i in range(n + 1)] + [2 * n + 1],
            "row_segs": [s for i in range(n) for s in (0, 1 + i)] + [n + 1]}
    g = torch.Generator().manual_seed(rows)
    q, k, v = make_inputs(g, tree, 6 + n + 1, bs, 1, grp, d)
    for block, slot in [(0, 5), (2, 0), (5, 15)]:  # keys 5, 32, 95 of the shared prefix
        kk = k.clone()
        kk[block, 0, slot, 3] = float("nan")
        o = A.tree_attention(q, kk, v, A.plan(**tree, block_size=bs), backend="cpp")
        assert o[:n].isnan().all(), (block, slot)  # the siblings read the shared prefix
        assert o[n].isfinite().all()  # the loose row does not


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
def test_cpu_isa_switch(isa):
    """NPR_CPU_ISA=avx2 forces the AVX2 kernels; unset, the AVX-512 variants run exactly when the
    kernel reports the four extensions they are built for (read from /proc/cpuinfo here, not
    from the extension)."""
    from npr import _C

    with open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                     set())
    has512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    want = "avx512" if isa == "auto" and has512 else "avx2"
    assert _C.cpu_isa() == want


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("seed", range(3))
def test_cpu_prefill_and_loose_rows(seed, isa):
    """Rows that share nothing, all of whose tokens are queries (causal prefill), next to a tree."""
    g = torch.Generator().manual_seed(7 + seed)
    tree, nb = random_tree(g, bs=16, depth=2, max_fan=3, seg_tok=(20, 150), qlen=2, n_loose=2,
                           prefill_loose=True)
    q, k, v = make_inputs(g, tree, nb, 16, 2, 2, 64)
    p = A.plan(**tree, block_size=16, kv_chunk=48, max_item_queries=32)
    scale = 0.3 + seed * 0.1
    o = A.tree_attention(q, k, v, p, scale=scale)
    assert rel_err(o, reference64(q, k, v, tree, scale)) <= 1e-5


def _sdpa_bf16_error(q, k, v, tree, ref):
    """Max abs error of torch's own SDPA in q.dtype (on q's device) on the gathered K/V vs the
    fp64 reference."""
    err = 0.0
    kv = R.gather_kv(k, v, *[tree[n] for n in TREE_KEYS[1:]])
    qi = tree["q_indptr"]
    for r, (K, V) in enumerate(kv):
        a, b = qi[r], qi[r + 1]
        n, L = b - a, K.shape[1]
        pos = torch.arange(L, device=q.device)
        mask = pos[None, :] <= pos[L - n:, None]
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), K, V, attn_mask=mask,
                                           enable_gqa=True).transpose(0, 1)
        err = max(err, float((o.double().cpu() - ref[a:b]).abs().max()))
    return err


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [0, 3, 4])
def test_cpu_low_precision_within_twice_torch_error(dtype, case, isa):
    bs, depth, fan, seg_tok, qlen, hkv, grp, d, loose, root, chunk, miq = CASES[case]
    g = torch.Generator().manual_seed(200 + case)
    tree, nb = random_tree(g, bs=bs, depth=depth, max_fan=fan, seg_tok=seg_tok, qlen=qlen,
                           n_loose=loose, root_tok=root)
    q, k, v = make_inputs(g, tree, nb, bs, hkv, grp, d, dtype)
    ref = reference64(q, k, v, tree)  # exact attention of the low-precision inputs
    p = A.plan(**tree, block_size=bs, kv_chunk=chunk, max_item_queries=miq)
    o = A.tree_attention(q, k, v, p)
    assert o.dtype == dtype
    ours = float((o.double() - ref).abs().max())
    assert ours <= 2 * _sdpa_bf16_error(q, k, v, tree, ref) + 1e-6


def test_plan_reads_shared_segment_once_per_group():
    g = torch.Generator().manual_seed(3)
    tree, _ = random_tree(g, bs=16, depth=1, max_fan=16, min_fan=16, qlen=1, n_loose=0,
                          root_tok=2000)
    p = A.plan(**tree, block_size=16, kv_chunk=4096)
    root_entries = (tree["seg_indptr"][0], tree["seg_indptr"][1])
    ents = p.item_ents.tolist()
    root_items = [w for w, (e0, e1) in enumerate(ents) if e0 >= root_entries[0]
                  and e1 <= root_entries[1]]
    assert len(root_items) == 1  # one item reads the prefix for all 16 rows
    w = root_items[0]
    ipi = p.item_part_indptr.tolist()
    assert ipi[w + 1] - ipi[w] == 16
    assert p.num_items == 17  # + one own item per row
    own = sum(tree["seg_fills"][root_entries[1]:])
    assert p.kv_tokens_read == 2000 + own
    # a query group limit splits the group: the prefix is then read once per group of 5
    p5 = A.plan(**tree, block_size=16, kv_chunk=4096, max_item_queries=5)
    assert p5.kv_tokens_read == 4 * 2000 + own
    # every query's partials: the merge lists are the inverse of part_q
    for plan_ in (p, p5):
        pq, qp, qpi = plan_.part_q.tolist(), plan_.q_parts.tolist(), plan_.q_part_indptr.tolist()
        for t in range(16):
            assert sorted(pq[i] for i in qp[qpi[t]:qpi[t + 1]]) == [t] * (qpi[t + 1] - qpi[t])


def test_plan_drops_keys_no_query_sees():
    """Causal prefill: chunks after a query group's last position are not read."""
    tree = {"q_indptr": [0, 64], "seg_indptr": [0, 4], "seg_blocks": [0, 1, 2, 3],
            "seg_fills": [16] * 4, "row_seg_indptr": [0, 1], "row_segs": [0]}
    p = A.plan(**tree, block_size=16, kv_chunk=16, max_item_queries=16)
    # groups of 16 queries x 4 chunks of 16 keys, keep only chunks at or before the group
    assert p.num_items == 4 + 3 + 2 + 1
    assert p.kv_tokens_read == 16 * 10


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
def test_opcheck():
    g = torch.Generator().manual_seed(5)
    tree, nb = random_tree(g, bs=8, depth=2, max_fan=3, seg_tok=(1, 20), qlen=2, n_loose=1)
    q, k, v = make_inputs(g, tree, nb, 8, 2, 2, 64)
    p = A.plan(**tree, block_size=8, kv_chunk=16)
    torch.library.opcheck(torch.ops.npr.tree_attention.default,
                          (q, k, v, *p.tensors(), p.max_item_parts, 0.125))


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
def test_strided_cache_views_and_wrapper_backends():
    g = torch.Generator().manual_seed(9)
    tree, nb = random_tree(g, bs=16, depth=2, max_fan=3, qlen=1, n_loose=1)
    kv = torch.randn(nb, 2, 2, 16, 64, generator=g)  # [NB, K|V, Hkv, BS, D]: views, not contiguous
    k, v = kv[:, 0], kv[:, 1]
    q = torch.randn(tree["q_indptr"][-1], 4, 64, generator=g)
    p = A.plan(**tree, block_size=16)
    ref = reference64(q, k, v, tree)
    assert rel_err(A.tree_attention(q, k, v, p), ref) <= 1e-5
    assert rel_err(A.tree_attention(q, k, v, p, backend="ref"), ref) <= 1e-5
    with pytest.raises(ValueError, match="backend"):
        A.tree_attention(q, k, v, p, backend="nope")


def _small():
    tree = {"q_indptr": [0, 1, 2], "seg_indptr": [0, 2, 3, 4], "seg_blocks": [0, 1, 2, 3],
            "seg_fills": [4, 2, 3, 4], "row_seg_indptr": [0, 2, 4], "row_segs": [0, 1, 0, 2]}
    return tree


def test_plan_rejects_bad_trees():
    tree = _small()
    A.plan(**tree, block_size=4, num_blocks=4)  # valid
    bad = dict(tree, row_segs=[0, 1, 1, 2])
    with pytest.raises(ValueError, match="shared by rows"):  # seg 1 shared, row 0's query in it
        A.plan(**bad, block_size=4)
    with pytest.raises(ValueError, match="lists a segment twice"):
        A.plan(**dict(tree, row_seg_indptr=[0, 2, 4], row_segs=[0, 0, 0, 2]), block_size=4)
    with pytest.raises(ValueError, match="seg_fills"):
        A.plan(**dict(tree, seg_fills=[4, 0, 3, 4]), block_size=4)
    with pytest.raises(ValueError, match="seg_fills"):
        A.plan(**dict(tree, seg_fills=[5, 2, 3, 4]), block_size=4)
    with pytest.raises(ValueError, match="block id"):
        A.plan(**tree, block_size=4, num_blocks=3)
    with pytest.raises(ValueError, match="only 9 key tokens"):
        A.plan(**dict(tree, q_indptr=[0, 10, 11]), block_size=4)
    with pytest.raises(ValueError, match="segment id"):
        A.plan(**dict(tree, row_segs=[0, 1, 0, 3]), block_size=4)
    with pytest.raises(ValueError, match="row_seg_indptr"):
        A.plan(**dict(tree, row_seg_indptr=[0, 2]), block_size=4)
    with pytest.raises(ValueError, match="seg_indptr"):
        A.plan(**dict(tree, seg_indptr=[0, 2, 3, 5]), block_size=4)
    with pytest.raises(TypeError, match="integer"):
        A.plan(**dict(tree, seg_fills=torch.tensor([4.0, 2, 3, 4])), block_size=4)


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
def test_op_rejects_bad_inputs():
    tree = _small()
    p = A.plan(**tree, block_size=4)
    q = torch.randn(2, 4, 64)
    k = torch.randn(4, 2, 4, 64)
    op = torch.ops.npr.tree_attention

    def call(q=q, k=k, v=k, tensors=p.tensors(), mip=p.max_item_parts):
        return op(q, k, v, *tensors, mip, 0.1)

    call()
    with pytest.raises(RuntimeError, match="dtypes differ"):
        call(q=q.double())
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        call(q=torch.randn(2, 3, 64))
    with pytest.raises(RuntimeError, match="head dim"):
        call(q=torch.randn(2, 4, 32))
    with pytest.raises(RuntimeError, match="not a block of the cache"):
        call(k=torch.randn(2, 2, 4, 64), v=torch.randn(2, 2, 4, 64))
    with pytest.raises(RuntimeError, match="block_size"):  # fills 4 > a cache of block size 3
        call(k=torch.randn(4, 2, 3, 64), v=torch.randn(4, 2, 3, 64))
    t = list(p.tensors())
    t[9] = t[9] + 100  # part_nvis beyond the item's tokens
    with pytest.raises(RuntimeError, match="part_nvis"):
        call(tensors=t)
    t = list(p.tensors())
    t[1] = t[1].long()
    with pytest.raises(RuntimeError, match="int32"):
        call(tensors=t)
    with pytest.raises(ValueError, match="block size"):
        A.tree_attention(q, torch.randn(4, 2, 8, 64), torch.randn(4, 2, 8, 64), p)


def test_no_queries():
    tree = {"q_indptr": [0], "seg_indptr": [0], "seg_blocks": [], "seg_fills": [],
            "row_seg_indptr": [0], "row_segs": []}
    p = A.plan(**tree, block_size=4)
    o = A.tree_attention(torch.randn(0, 2, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), p)
    assert o.shape == (0, 2, 8)


_TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, {tests!r})
    from test_tree_attention import random_tree, make_inputs, reference64, rel_err
    from npr.ops import attention as A
    from npr.kernels import tree_attention_triton  # noqa: F401  (imports triton after the env)
    g = torch.Generator().manual_seed(11)
    cases = [(8, 2, 3, 1, 2, 64, 1024, 64, torch.float32),
             (4, 3, 2, 2, 3, 16, 5, 2, torch.float32),
             (5, 1, 4, 1, 4, 32, 1024, 64, torch.bfloat16)]
    for bs, depth, fan, qlen, grp, d, chunk, miq, dt in cases:
        tree, nb = random_tree(g, bs=bs, depth=depth, max_fan=fan, seg_tok=(1, 10), qlen=qlen,
                               n_loose=1)
        q, k, v = make_inputs(g, tree, nb, bs, 1, grp, d, dt)
        p = A.plan(**tree, block_size=bs, kv_chunk=chunk, max_item_queries=miq)
        o = A.tree_attention(q, k, v, p, backend="triton")
        err = rel_err(o, reference64(q, k, v, tree))
        # bf16 output: within one bf16 step (2^-7 relative) of the exact result (the interpreter
        # truncates when it stores fp32 as bf16)
        tol = 1e-5 if dt == torch.float32 else 2 ** -7
        assert o.dtype == dt and err <= tol, (bs, depth, dt, err)
    print("ok")
""")


# A loop over loaded bounds. Triton 3.6's interpreter turns the loaded scalar into an int with
# int(1-element array), which NumPy 2.4 refuses (2.2 accepts it); triton 3.7 is fine.
_TRITON_PROBE = textwrap.dedent("""
import torch, triton, triton.language as tl
@triton.jit
def k(x_ptr, o_ptr):
    s = 0
    for i in range(tl.load(x_ptr), tl.load(x_ptr + 1)):
        s += i
    tl.store(o_ptr, s)
o = torch.zeros(1, dtype=torch.int32)
k[(1,)](torch.tensor([0, 3], dtype=torch.int32), o)
assert o.item() == 3
""")


def test_triton_interpreter_tiny_trees():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    probe = subprocess.run([sys.executable, "-c", _TRITON_PROBE], env=env, capture_output=True,
                           text=True, timeout=120)
    if "only 0-dimensional arrays can be converted" in probe.stderr:
        import numpy
        import triton
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot loop over loaded bounds "
                    f"with NumPy {numpy.__version__} (use triton >= 3.7 or NumPy <= 2.2)")
    assert probe.returncode == 0, probe.stderr
    script = _TRITON_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gpu_matches_reference(backend, dtype, case):
    if backend == "cuda" and not _ext.with_cuda():
        pytest.skip("npr._C built without CUDA")
    bs, depth, fan, seg_tok, qlen, hkv, grp, d, loose, root, chunk, miq = CASES[case]
    if backend == "cuda" and d > 256:
        pytest.skip("head dim")
    g = torch.Generator().manual_seed(300 + case)
    tree, nb = random_tree(g, bs=bs, depth=depth, max_fan=fan, seg_tok=seg_tok, qlen=qlen,
                           n_loose=loose, root_tok=root)
    q, k, v = make_inputs(g, tree, nb, bs, hkv, grp, d, dtype, device="cuda")
    p = A.plan(**tree, block_size=bs, kv_chunk=chunk, max_item_queries=miq, device="cuda")
    o = A.tree_attention(q, k, v, p, backend=backend)
    assert o.dtype == dtype and o.device.type == "cuda"
    ref = reference64(q, k, v, tree)
    if dtype == torch.float32:
        assert rel_err(o, ref) <= 1e-5
    else:
        sdpa = _sdpa_bf16_error(q, k, v, tree, ref)
        assert float((o.double().cpu() - ref).abs().max()) <= 2 * sdpa + 1e-6


@pytest.mark.cuda
@cuda
def test_cuda_opcheck():
    if not _ext.with_cuda():
        pytest.skip("npr._C built without CUDA")
    g = torch.Generator().manual_seed(5)
    tree, nb = random_tree(g, bs=8, depth=2, max_fan=3, seg_tok=(1, 20), qlen=2, n_loose=1)
    q, k, v = make_inputs(g, tree, nb, 8, 2, 2, 64, device="cuda")
    p = A.plan(**tree, block_size=8, kv_chunk=16, device="cuda")
    torch.library.opcheck(torch.ops.npr.tree_attention.default,
                          (q, k, v, *p.tensors(), p.max_item_parts, 0.125))


def test_reference_is_plain_attention_without_a_tree():
    """Sanity of the oracle itself: one row, one segment == causal SDPA over the same keys."""
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 4, 16, generator=g)
    v = torch.randn(3, 2, 4, 16, generator=g)
    q = torch.randn(5, 2, 16, generator=g)
    tree = {"q_indptr": [0, 5], "seg_indptr": [0, 3], "seg_blocks": [2, 0, 1],
            "seg_fills": [4, 3, 4], "row_seg_indptr": [0, 1], "row_segs": [0]}
    o = R.tree_attention(q, k, v, *[tree[n] for n in TREE_KEYS])
    K = torch.cat([k[2], k[0, :, :3], k[1]], dim=1)  # [H, 11, D]
    V = torch.cat([v[2], v[0, :, :3], v[1]], dim=1)
    mask = torch.arange(11)[None, :] <= torch.arange(6, 11)[:, None]
    want = F.scaled_dot_product_attention(q.transpose(0, 1), K, V, attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)
