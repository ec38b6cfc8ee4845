"""Attention under the training layout (npr.ops.layout_attention) against the dense reference
(npr.ref.layout_attention), on random packed trees built by the real path: token ids with tags ->
npr.format.layout -> npr.train.logprobs.pack."""
from __future__ import annotations

import random

import pytest
import torch

from npr import _ext
from npr.format import TAGS, layout
from npr.ops import layout_attention as LA
from npr.ref.layout_attention import layout_attention as ref_attention
from npr.ref.layout_attention import layout_mask
from npr.train.logprobs import pack
from npr.train.rollout import causal_layout

TAG = {t: i for i, t in enumerate(TAGS)}  # tag string -> token id 0..7; content ids are >= 8
G_OPEN, G_CLOSE, P_OPEN, P_CLOSE, S_OPEN, S_CLOSE, T_OPEN, T_CLOSE = (TAG[t] for t in TAGS)
HAVE_KERNEL = _ext.available() and hasattr(torch.ops.npr, "layout_attention")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="npr._C with npr::layout_attention not built")


def _text(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(8, 100) for _ in range(rng.randint(lo, hi))]


def random_trajectory(rng: random.Random, max_blocks: int = 3, max_siblings: int = 16,
                      max_step: int = 12) -> tuple[list[int], int, int]:
    """(token ids, prompt_len, blocks) of a canonical trajectory: prompt, 1..max_blocks blocks of
    1..max_siblings steps of ragged lengths, final text."""
    prompt = _text(rng, 1, 9)
    resp: list[int] = []
    blocks = rng.randint(1, max_blocks)
    for _ in range(blocks):
        n = rng.randint(1, max_siblings)
        resp += [G_OPEN]
        for _ in range(n):
            resp += [P_OPEN, *_text(rng, 1, 3), P_CLOSE]
        resp += [G_CLOSE]
        for _ in range(n):
            resp += [S_OPEN, *_text(rng, 1, max_step), S_CLOSE]
        resp += [T_OPEN, *_text(rng, 1, 6), T_CLOSE]
    return prompt + resp + _text(rng, 0, 5), len(prompt), blocks


def random_packed(seed: int, trajectories: int, **kw):
    """A PackedBatch of random trees (several trajectories back to back in one row; one in four is
    a plain causal trajectory)."""
    rng = random.Random(seed)
    items = []
    for _ in range(trajectories):
        ids, P, _ = random_trajectory(rng, **kw)
        if rng.random() < 0.25:
            lay = causal_layout(len(ids), P)
        else:
            lay = layout(ids, TAG, prompt_len=P, max_branches=64)
        # the engine's injected tokens (<step>, <takeaway>) are not scored
        items.append((ids, lay, [i >= P and x not in (S_OPEN, T_OPEN) for i, x in enumerate(ids)]))
    return pack(items)


def _qkv(T: int, Hq: int, Hkv: int, D: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=g, dtype=torch.float64).to(dtype)
            for h in (Hq, Hkv, Hkv)]


BACKENDS = [pytest.param("kernel", marks=needs_kernel), "composed"]
SHAPES = [(2, 2, 8), (4, 2, 16), (9, 3, 64), (6, 1, 20)]  # (Hq, Hkv, D): MHA, GQA, SmolLM2's, MQA


def test_plan_runs_reproduce_the_mask():
    """The runs (a, e, k0a, k1a, k0b, k1b) say exactly which keys each query sees."""
    for seed in range(20):
        b = random_packed(seed, trajectories=3)
        plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
        T = b.num_tokens
        got = torch.zeros(T, T, dtype=torch.bool)
        for a, e, k0a, k1a, k0b, k1b in plan.runs.tolist():
            for i in range(a, e):
                got[i, k0a:k1a] = True
                got[i, k0b:k1b] = True
                got[i, a:i + 1] = True
        want = layout_mask(b.seq_start, b.hole_start, b.hole_end)
        assert torch.equal(got, want)
        assert torch.equal(want, b.dense_mask())
        assert plan.visible_pairs == int(want.sum())
        # the composed path's pieces cover each visible pair exactly once
        cover = torch.zeros(T, T, dtype=torch.int32)
        for q0, q1, k0, k1, causal in plan.pieces.tolist():
            blk = torch.ones(q1 - q0, k1 - k0, dtype=torch.int32)
            cover[q0:q1, k0:k1] += blk.tril() if causal else blk
        assert torch.equal(cover, want.int())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "%d-%d-%d" % s)
def test_forward_and_backward_match_the_dense_reference(backend, shape):
    Hq, Hkv, D = shape
    for seed in range(6):
        b = random_packed(100 * seed + D, trajectories=1 + seed % 3)
        plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
        q, k, v = (t.requires_grad_() for t in _qkv(b.num_tokens, Hq, Hkv, D, seed))
        out = LA.layout_attention(q, k, v, plan, backend=backend)
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        want = ref_attention(qr, kr, vr, b.seq_start, b.hole_start, b.hole_end)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out)
        out.backward(g)
        want.backward(g)
        for got_t, want_t in ((q, qr), (k, kr), (v, vr)):
            torch.testing.assert_close(got_t.grad, want_t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_cross_every_tile_boundary(backend):
    """Rows longer than the kernel's query (64) and key (256) tiles, several 16-sibling blocks."""
    b = random_packed(7, trajectories=3, max_siblings=16, max_step=30)
    assert b.num_tokens > 600
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = (t.requires_grad_() for t in _qkv(b.num_tokens, 4, 2, 32, 1))
    out = LA.layout_attention(q, k, v, plan, backend=backend)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = ref_attention(qr, kr, vr, b.seq_start, b.hole_start, b.hole_end)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    torch.autograd.backward([out, want], [g, g])
    for got_t, want_t in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(got_t.grad, want_t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    b = random_packed(3, trajectories=2, max_blocks=2, max_siblings=4, max_step=4)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = (t.requires_grad_() for t in _qkv(b.num_tokens, 4, 2, 8, 0, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: LA.layout_attention(q, k, v, plan, backend=backend),
                                    (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend, dtype):
    """bf16/fp16 in and out, fp32 inside: within a few roundings of the fp32 reference on the same
    rounded inputs."""
    b = random_packed(11, trajectories=2)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = _qkv(b.num_tokens, 4, 2, 32, 2, dtype)
    out = LA.layout_attention(q, k, v, plan, backend=backend)
    assert out.dtype == dtype
    want = ref_attention(q.float(), k.float(), v.float(), b.seq_start, b.hole_start, b.hole_end)
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    torch.testing.assert_close(out.float(), want, rtol=2 * eps, atol=2 * eps)


def test_flex_cpu_twin_forward():
    """The CUDA path (FlexAttention with the layout's block mask), run eagerly on CPU (forward only:
    torch 2.13 has no FlexAttention backward on CPU)."""
    b = random_packed(5, trajectories=2)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = _qkv(b.num_tokens, 4, 2, 16, 3)
    out = LA.layout_attention(q, k, v, plan, backend="flex_eager")
    want = ref_attention(q, k, v, b.seq_start, b.hole_start, b.hole_end)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_opcheck():
    b = random_packed(2, trajectories=2, max_siblings=5, max_step=5)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = (t.requires_grad_() for t in _qkv(b.num_tokens, 4, 2, 8, 4))
    torch.library.opcheck(torch.ops.npr.layout_attention.default, (q, k, v, plan.runs, 0.3))
    out, lse = torch.ops.npr.layout_attention(q.detach(), k.detach(), v.detach(), plan.runs, 0.3)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.npr.layout_attention_backward.default,
                          (g, q.detach(), k.detach(), v.detach(), out, lse, plan.runs, 0.3))


@needs_kernel
def test_kernel_does_not_depend_on_the_thread_count():
    b = random_packed(9, trajectories=3, max_step=20)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = (t.requires_grad_() for t in _qkv(b.num_tokens, 4, 2, 16, 5))
    before = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for t in (q, k, v):
                t.grad = None
            out = LA.layout_attention(q, k, v, plan, backend="kernel")
            out.backward(torch.ones_like(out))
            got.append([out.detach(), q.grad, k.grad, v.grad])
    finally:
        torch.set_num_threads(before)
    for a, c in zip(*got):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_kernel_backward_is_bitwise_reproducible():
    """Same inputs, same thread count -> the same bits, run after run (the dk/dv sums across
    threads add the same terms in the same order): training resumed from a checkpoint must end
    where an uninterrupted run ends."""
    b = random_packed(12, trajectories=3, max_step=20)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    q, k, v = (t.requires_grad_() for t in _qkv(b.num_tokens, 4, 2, 16, 6))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = []
        for _ in range(6):
            for t in (q, k, v):
                t.grad = None
            out = LA.layout_attention(q, k, v, plan, backend="kernel")
            out.backward(torch.cos(out.detach()))
            runs.append([q.grad, k.grad, v.grad])
    finally:
        torch.set_num_threads(before)
    for r in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], r))


def test_empty_row():
    z = torch.zeros(0, dtype=torch.long)
    plan = LA.LayoutAttentionPlan.build(z, z, z)
    q = torch.zeros(0, 2, 8)
    assert LA.layout_attention(q, q, q, plan).shape == (0, 2, 8)


def test_bad_layouts_and_inputs_are_named():
    L = torch.tensor
    with pytest.raises(ValueError, match="token 2 has seq_start 3"):
        LA.LayoutAttentionPlan.build(L([0, 0, 3]), L([0, 0, 0]), L([0, 0, 0]))
    with pytest.raises(ValueError, match="must be contiguous"):
        LA.LayoutAttentionPlan.build(L([0, 0, 1]), L([0, 0, 0]), L([0, 0, 0]))
    with pytest.raises(ValueError, match="hole_start 2 > hole_end 1"):
        LA.LayoutAttentionPlan.build(L([0, 0, 0]), L([0, 0, 2]), L([0, 0, 1]))
    with pytest.raises(ValueError, match="must see itself"):
        LA.LayoutAttentionPlan.build(L([0, 0, 0]), L([0, 0, 1]), L([0, 0, 3]))
    with pytest.raises(TypeError, match="int64/int32"):
        LA.LayoutAttentionPlan.build(L([0.0]), L([0]), L([0]))
    with pytest.raises(ValueError, match="3 entries, seq_start 2"):
        LA.LayoutAttentionPlan.build(L([0, 0]), L([0, 0, 0]), L([0, 0]))
    plan = LA.LayoutAttentionPlan.build(L([0, 0, 0]), L([0, 0, 0]), L([0, 0, 0]))
    q = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        LA.layout_attention(q, torch.randn(3, 3, 8), torch.randn(3, 3, 8), plan)
    with pytest.raises(ValueError, match="plan is for 3 tokens, q has 4"):
        LA.layout_attention(torch.randn(4, 4, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8), plan)
    with pytest.raises(TypeError, match="share one floating dtype"):
        LA.layout_attention(q, torch.randn(3, 2, 8).double(), torch.randn(3, 2, 8), plan)
    with pytest.raises(ValueError, match="backend must be one of"):
        LA.layout_attention(q, torch.randn(3, 2, 8), torch.randn(3, 2, 8), plan, backend="dense")


@needs_kernel
def test_kernel_refuses_a_bad_plan():
    q = torch.randn(4, 2, 8)
    bad = torch.tensor([[0, 2, 0, 0, 0, 0], [2, 4, 0, 3, 0, 0]])  # keys [0, 3) reach past the run
    with pytest.raises(RuntimeError, match="must lie before its first query"):
        torch.ops.npr.layout_attention(q, q, q, bad, 1.0)
    gap = torch.tensor([[0, 2, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0]])
    with pytest.raises(RuntimeError, match="does not continue the runs"):
        torch.ops.npr.layout_attention(q, q, q, gap, 1.0)


# ---- the trainer's forward: npr's decoder under the layout == the dense-mask oracle ----------
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_token_logprobs_equal_the_dense_reference(qk_norm):
    """npr.train.logprobs.token_logprobs (LayoutAttentionPlan through the decoder) against
    token_logprobs_reference (dense [T, T] mask): log-probs and parameter gradients, fp32."""
    from tiny import tiny_model

    from npr.train.logprobs import token_logprobs, token_logprobs_reference, uses_layout_attention

    model = tiny_model(100, seed=1, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                       qk_norm=qk_norm, model_type="qwen3" if qk_norm else "llama")
    assert uses_layout_attention(model)
    for seed in range(3):
        b = random_packed(40 + seed, trajectories=3, max_siblings=8)
        w = torch.randn(b.num_tokens, generator=torch.Generator().manual_seed(seed))
        grads = []
        for fn in (token_logprobs, token_logprobs_reference):
            model.zero_grad()
            lp = fn(model, b, temperature=0.7)
            (lp * w).sum().backward()
            grads.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
        (lp_a, g_a), (lp_b, g_b) = grads
        assert lp_a.shape == (b.num_tokens,) and bool((lp_a[~b.loss_mask] == 0).all())
        torch.testing.assert_close(lp_a, lp_b, rtol=1e-5, atol=1e-5)
        for x, y in zip(g_a, g_b):  # 1e-5 of each gradient's scale (summation order differs)
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_a_plan_needs_one_row_of_its_tokens():
    from tiny import tiny_model

    model = tiny_model(100, layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16)
    b = random_packed(1, trajectories=1)
    plan = LA.LayoutAttentionPlan.build(b.seq_start, b.hole_start, b.hole_end)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(b.input_ids[None, :-1], attention_mask=plan)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(b.input_ids[None].expand(2, -1), attention_mask=plan)
