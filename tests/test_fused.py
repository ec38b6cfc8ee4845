"""npr::linear_fused (rms_norm / silu*mul prologue, residual epilogue around the streaming
linear) against the fp32 reference, and the npr.ops.linear_fused wrapper."""
from __future__ import annotations

import importlib

import pytest
import torch

import npr
from npr import _ext, ref

_lin = importlib.import_module("npr.ops.linear")

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")

ROWS = [1, 2, 3, 5, 8, 9, 17, 33]
SHAPES = [(1, 1), (7, 5), (16, 9), (33, 10), (64, 24), (576, 192)]  # (K, N)
WEIGHTS = [("plain", torch.float32), ("plain", torch.bfloat16), ("packed", torch.float32),
           ("packed", torch.float16)]
PROLOGUES = ["none", "norm", "silu"]


def _rope_tables(m: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style cos / sin [m, d] for random positions (emb = cat(freqs, freqs))."""
    pos = torch.randint(0, 4096, (m, 1), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((pos * inv, pos * inv), dim=-1)
    return emb.cos(), emb.sin()


def _case(m, k, n, prologue, residual, seed, rope_d=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if prologue == "silu" else k, generator=g) * 3
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    kw = {"eps": 1e-5}
    if prologue == "norm":
        kw["norm_weight"] = torch.rand(k, generator=g) + 0.5
    if prologue == "silu":
        kw["silu_mul"] = True
    if residual:
        kw["residual"] = torch.randn(m, n, generator=g)
    if rope_d and n >= rope_d:
        kw["rope_cos"], kw["rope_sin"] = _rope_tables(m, rope_d, g)
        kw["rope_heads"] = n // rope_d - (n // rope_d > 1)  # leave a head unrotated if possible
    return x, w, b, kw


def _check(y, x, w, b, kw, rel=1e-5):
    """|y - ref| <= rel * (|h| @ |w|^T + |b| + |residual|) with h the reference prologue output
    (fp32 rel. 1e-5 of the terms' scale)."""
    r = ref.linear_fused(x, w, b, **kw)
    h = ref.linear_fused(x, torch.eye(w.shape[1]), None, norm_weight=kw.get("norm_weight"),
                         eps=kw["eps"], silu_mul=kw.get("silu_mul", False))
    scale = torch.nn.functional.linear(h.abs().double(), w.double().abs(), b.double().abs())
    if "rope_cos" in kw:  # a rotated output mixes two outputs of its head
        d, heads = kw["rope_cos"].shape[-1], kw["rope_heads"]
        rot = scale[:, : heads * d].unflatten(-1, (heads, d))
        rot = rot + torch.cat((rot[..., d // 2:], rot[..., : d // 2]), dim=-1)
        scale = torch.cat((rot.flatten(-2), scale[:, heads * d:]), dim=-1)
    if "residual" in kw:
        scale = scale + kw["residual"].abs().double()
    err = (y.double() - r.double()).abs()
    assert y.shape == r.shape and y.dtype == torch.float32
    assert not (err > rel * scale + 1e-30).any(), f"max err {err.max().item():.3g}"


def _weight(kind, dtype, w):
    return npr.ops.pack_linear_weight(w, dtype) if kind == "packed" else w.to(dtype)


@pytest.mark.parametrize("kind,dtype", WEIGHTS, ids=lambda v: str(v))
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_matches_reference(kind, dtype, prologue, residual, isa):
    for m in ROWS:
        for k, n in SHAPES:
            x, w, b, kw = _case(m, k, n, prologue, residual, seed=m * 977 + k * 13 + n)
            wt = _weight(kind, dtype, w)
            y = npr.ops.linear_fused(x, wt, b, **kw)
            _check(y, x, w.to(dtype), b, kw)


@pytest.mark.parametrize("kind,dtype", WEIGHTS[1:3], ids=lambda v: str(v))
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("rope_d", [4, 6, 64], ids=lambda d: f"rope{d}")
def test_rope_matches_reference(kind, dtype, prologue, rope_d):
    for m in (1, 3, 8, 17):
        for k, n in [(7, 12), (33, 18), (64, 192), (576, 320)]:
            x, w, b, kw = _case(m, k, n, prologue, True, seed=m * 31 + k + n, rope_d=rope_d)
            wt = _weight(kind, dtype, w)
            y = npr.ops.linear_fused(x, wt, b, **kw)
            _check(y, x, w.to(dtype), b, kw)


def test_wrapper_takes_the_fused_op(monkeypatch):
    x, w, b, kw = _case(4, 24, 6, "norm", True, seed=1)
    calls = []
    real = torch.ops.npr.linear_fused

    class Spy:
        def __call__(self, *a):
            calls.append(a)
            return real(*a)

    monkeypatch.setattr(torch.ops.npr, "linear_fused", Spy())
    npr.ops.linear_fused(x, w, b, **kw)
    assert len(calls) == 1


@pytest.mark.parametrize("d", [6, 64])
def test_rope_is_hf_rotary(d):
    # Independent of ref.apply_rope: HF's apply_rotary_pos_emb on q and k of a fused qkv.
    g = torch.Generator().manual_seed(d)
    hq, hk, m, k = 3, 1, 5, 32
    n = (hq + 2 * hk) * d
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    cos, sin = _rope_tables(m, d, g)
    y = npr.ops.linear_fused(x, w, rope_cos=cos, rope_sin=sin, rope_heads=hq + hk)
    plain = x @ w.t()

    def rotate_half(t):
        return torch.cat((-t[..., d // 2:], t[..., : d // 2]), dim=-1)

    qk = plain[:, : (hq + hk) * d].view(m, hq + hk, d)
    expect = qk * cos[:, None] + rotate_half(qk) * sin[:, None]
    torch.testing.assert_close(y[:, : (hq + hk) * d], expect.reshape(m, -1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y[:, (hq + hk) * d:], plain[:, (hq + hk) * d:], rtol=1e-5,
                               atol=1e-4)


def test_silu_extremes():
    # exp256 is clamped: silu(g) -> g for large g, -> 0 for very negative g, no inf / nan.
    k = 16
    g = torch.tensor([-1e4, -200.0, -90.0, -87.5, -20.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 20.0,
                      87.5, 90.0, 200.0, 1e4])
    x = torch.cat([g, torch.ones(k)]).reshape(1, 2 * k)
    y = npr.ops.linear_fused(x, torch.eye(k), None, silu_mul=True)
    torch.testing.assert_close(y[0], torch.nn.functional.silu(g), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_opcheck(prologue, packed):
    x, w, b, kw = _case(3, 19, 12, prologue, True, seed=4, rope_d=4)
    wd = ref.pack_weight(w) if packed else w
    torch.library.opcheck(torch.ops.npr.linear_fused.default,
                          (x, wd, 12, b, kw.get("norm_weight"), 1e-5, "silu_mul" in kw,
                           kw["residual"], kw["rope_cos"], kw["rope_sin"], kw["rope_heads"]))


def test_bad_input_names_problem():
    op = torch.ops.npr.linear_fused
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="exclusive"):
        op(torch.randn(2, 16), w, 4, None, torch.ones(8), 1e-5, True, None)
    with pytest.raises(RuntimeError, match=r"silu_mul needs x = \[..., 2K\]"):
        op(torch.randn(2, 15), w, 4, None, None, 1e-5, True, None)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\] with K = 4"):
        op(x, w, 4, None, None, 1e-5, True, None)  # silu_mul halves K
    with pytest.raises(RuntimeError, match=r"norm_weight must be a float32 CPU \[K\]"):
        op(x, w, 4, None, torch.ones(7), 1e-5, False, None)
    with pytest.raises(RuntimeError, match="residual must be a float32 CPU tensor"):
        op(x, w, 4, None, None, 1e-5, False, torch.randn(2, 5))
    c = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="go together"):
        op(x, w, 4, None, None, 1e-5, False, None, c, None, 1)
    with pytest.raises(RuntimeError, match=r"rope_heads \* D <= N"):
        op(x, w, 4, None, None, 1e-5, False, None, c, c, 2)
    with pytest.raises(RuntimeError, match="even head size"):
        op(x, w, 4, None, None, 1e-5, False, None, torch.ones(2, 3), torch.ones(2, 3), 1)
    with pytest.raises(RuntimeError, match="leading dims of x"):
        op(x, w, 4, None, None, 1e-5, False, None, torch.ones(3, 4), torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="exclusive"):
        npr.ops.linear_fused(torch.randn(2, 16), w, norm_weight=torch.ones(8), silu_mul=True)


@pytest.mark.parametrize("prologue", PROLOGUES)
def test_many_rows_take_torch_gemm_inside_the_op(prologue, monkeypatch):
    # Past SMALL_ROWS_MAX rows an fp32 [N, K] weight goes to torch's GEMM inside the op, with the
    # prologue and epilogues (rope, residual) still fused: one op call, reference results.
    calls = []
    real = torch.ops.npr.linear_fused
    monkeypatch.setattr(torch.ops.npr, "linear_fused", lambda *a: calls.append(a) or real(*a))
    for m in (_lin.SMALL_ROWS_MAX + 1, 64, 300):
        for k, n in [(7, 12), (40, 12), (96, 288), (576, 320)]:
            for rope_d, residual in ((0, False), (4, True), (64, True)):
                x, w, b, kw = _case(m, k, n, prologue, residual, seed=m + k + n + rope_d,
                                    rope_d=rope_d)
                _check(npr.ops.linear_fused(x, w, b, **kw), x, w, b, kw)
                _check(npr.ops.linear_fused(x, w, None, **kw), x, w, torch.zeros(n), kw)
    assert len(calls) == 3 * 4 * 3 * 2


def test_opcheck_many_rows():
    x, w, b, kw = _case(40, 19, 12, "norm", True, seed=5, rope_d=4)
    torch.library.opcheck(torch.ops.npr.linear_fused.default,
                          (x, w, 12, b, kw["norm_weight"], 1e-5, False, kw["residual"],
                           kw["rope_cos"], kw["rope_sin"], kw["rope_heads"]))


def test_fallbacks_match_reference(monkeypatch):
    # Inputs that need gradients: the separate ops (the fused op has no backward).
    x, w, b, kw = _case(_lin.SMALL_ROWS_MAX + 7, 40, 12, "silu", True, seed=7, rope_d=4)
    xg = x.clone().requires_grad_()
    y = npr.ops.linear_fused(xg, w, b, **kw)
    _check(y.detach(), x, w, b, kw)
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    # bf16 activations: the separate ops in bf16.
    # Compared with the fp32 reference on the same bf16-rounded inputs: four bf16 roundings
    # (norm output, GEMM output, + bias, + residual) of half an ulp (2^-9) each, relative to the
    # terms' scale, so at most 2^-7 of it (a dropped term or a wrong norm is far outside).
    x, w, b, kw = _case(3, 32, 8, "norm", True, seed=8)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    kwb = dict(kw, norm_weight=kw["norm_weight"].bfloat16(), residual=kw["residual"].bfloat16())
    y = npr.ops.linear_fused(xb, wb, bb, **kwb)
    assert y.dtype == torch.bfloat16
    _check(y.float(), xb.float(), wb.float(), bb.float(),
           {k: v.float() if torch.is_tensor(v) else v for k, v in kwb.items()}, rel=2**-7)
    monkeypatch.setenv("NPR_FORCE_REF", "1")
    npr.env.reload()
    x, w, b, kw = _case(3, 24, 9, "norm", True, seed=9)
    _check(npr.ops.linear_fused(x, npr.ops.pack_linear_weight(w), b, **kw), x, w, b, kw)


# ------------------------------------------------------------------ GEMM panels (AVX-512)
panels_here = pytest.mark.skipif(not _lin.gemm_panels_available(),
                                 reason="the GEMM-panel kernel needs AVX-512")


@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (31, 8), (32, 17), (33, 64), (100, 1536)])
def test_gemm_panels_pack_round_trip(n, k):
    w = torch.randn(n, k)
    p = npr.ops.pack_gemm_weight(w)
    assert p.data.shape == (-(-n // 32), k, 32) and p.shape == (n, k)
    assert torch.equal(p.unpack(), w)
    assert torch.equal(p.data[..., :].transpose(1, 2).reshape(-1, k)[n:], torch.zeros(p.data.shape[0] * 32 - n, k))
    with pytest.raises(ValueError, match="float32"):
        npr.ops.pack_gemm_weight(w.to(torch.bfloat16))


@panels_here
@pytest.mark.parametrize("prologue", PROLOGUES)
def test_gemm_panels_match_reference(prologue):
    # Every row count through the register blocks (12 rows) and their tails, outputs through the
    # 32-wide panels and their masked tails, with bias, norm / SiLU prologues, RoPE and residual.
    for m in (1, 2, 5, 11, 12, 13, 24, 33, 64, 67):
        for k, n in [(1, 1), (7, 12), (40, 33), (96, 288), (576, 320), (300, 64)]:
            for rope_d, residual in ((0, False), (4, True)):
                x, w, b, kw = _case(m, k, n, prologue, residual, seed=m * 7 + k + n + rope_d,
                                    rope_d=rope_d)
                p = npr.ops.pack_gemm_weight(w)
                _check(npr.ops.linear_fused(x, p, b, **kw), x, w, b, kw)
                _check(npr.ops.linear_fused(x, p, None, **kw), x, w, torch.zeros(n), kw)
    x = torch.randn(3, 9, 40)  # leading dims, and npr.ops.linear on panels
    w = torch.randn(70, 40)
    torch.testing.assert_close(npr.ops.linear(x, npr.ops.pack_gemm_weight(w)), x @ w.t(),
                               rtol=1e-5, atol=1e-4)


@panels_here
def test_gemm_panels_opcheck_and_bad_shapes():
    x, w, b, kw = _case(40, 19, 45, "norm", True, seed=5, rope_d=4)
    p = npr.ops.pack_gemm_weight(w).data
    torch.library.opcheck(torch.ops.npr.linear_fused.default,
                          (x, p, 45, b, kw["norm_weight"], 1e-5, False, kw["residual"],
                           kw["rope_cos"], kw["rope_sin"], kw["rope_heads"]))
    for bad, n in ((p[:1], 45), (p, 80), (p[:, :10], 45), (p.double(), 45)):
        with pytest.raises(RuntimeError, match="GEMM panels"):
            torch.ops.npr.linear_fused(x, bad, n, None, None, 1e-5, False, None)


def test_gemm_panels_without_the_kernel_fall_back(monkeypatch):
    # No AVX-512 (or NPR_FORCE_REF): the wrappers unpack and compute the same thing.
    monkeypatch.setattr(_lin, "gemm_panels_available", lambda: False)
    x, w, b, kw = _case(40, 24, 33, "silu", True, seed=9, rope_d=4)
    _check(npr.ops.linear_fused(x, npr.ops.pack_gemm_weight(w), b, **kw), x, w, b, kw)
    torch.testing.assert_close(npr.ops.linear(x[:, :24], npr.ops.pack_gemm_weight(w)),
                               x[:, :24] @ w.t(), rtol=1e-5, atol=1e-4)
