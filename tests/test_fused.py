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


def _case(m, k, n, prologue, residual, seed):
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
    return x, w, b, kw


def _check(y, x, w, b, kw, rel=1e-5):
    """|y - ref| <= rel * (|h| @ |w|^T + |b| + |residual|) with h the reference prologue output
    (fp32 rel. 1e-5 of the terms' scale)."""
    r = ref.linear_fused(x, w, b, **kw)
    h = ref.linear_fused(x, torch.eye(w.shape[1]), None, norm_weight=kw.get("norm_weight"),
                         eps=kw["eps"], silu_mul=kw.get("silu_mul", False))
    scale = torch.nn.functional.linear(h.abs().double(), w.double().abs(), b.double().abs())
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
def test_matches_reference(kind, dtype, prologue, residual):
    for m in ROWS:
        for k, n in SHAPES:
            x, w, b, kw = _case(m, k, n, prologue, residual, seed=m * 977 + k * 13 + n)
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
    x, w, b, kw = _case(3, 19, 11, prologue, True, seed=4)
    wd = ref.pack_weight(w) if packed else w
    torch.library.opcheck(torch.ops.npr.linear_fused.default,
                          (x, wd, 11, b, kw.get("norm_weight"), 1e-5, "silu_mul" in kw,
                           kw["residual"]))


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
    with pytest.raises(ValueError, match="exclusive"):
        npr.ops.linear_fused(torch.randn(2, 16), w, norm_weight=torch.ones(8), silu_mul=True)


def test_fallbacks_match_reference(monkeypatch):
    # Many rows with fp32 [N, K] weights: the separate ops (torch GEMM).
    x, w, b, kw = _case(_lin.SMALL_ROWS_MAX + 7, 40, 12, "silu", True, seed=7)
    _check(npr.ops.linear_fused(x, w, b, **kw), x, w, b, kw)
    # bf16 activations: the separate ops in bf16.
    x, w, b, kw = _case(3, 32, 8, "norm", True, seed=8)
    y = npr.ops.linear_fused(x.bfloat16(), w.bfloat16(), b.bfloat16(),
                             norm_weight=kw["norm_weight"].bfloat16(), eps=1e-5,
                             residual=kw["residual"].bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.linear_fused(x, w, b, **kw), rtol=0.05, atol=0.3)
    monkeypatch.setenv("NPR_FORCE_REF", "1")
    x, w, b, kw = _case(3, 24, 9, "norm", True, seed=9)
    _check(npr.ops.linear_fused(x, npr.ops.pack_linear_weight(w), b, **kw), x, w, b, kw)
