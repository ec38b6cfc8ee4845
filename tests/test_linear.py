"""npr::linear_small / npr::linear_packed (weight-streaming CPU linear) against the fp32
reference with the same widened weights, and the npr.ops.linear wrapper."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npr
from npr import _ext, ref

# The module (npr.ops.linear is also the name of the function it exports).
linear_mod = importlib.import_module("npr.ops.linear")

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 32, 33]
# (K, N): odd sizes (K or N not a multiple of 8/16), K below one vector, SmolLM2-like.
SHAPES = [(1, 1), (7, 5), (8, 8), (15, 17), (16, 3), (33, 9), (64, 100), (129, 31), (576, 192)]


def _close_to_ref(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  rel: float = 1e-5) -> None:
    """|y - ref| <= rel * (|x| @ |w|^T + |b|) elementwise: fp32 rel. 1e-5 of the terms' scale
    (a plain rtol would fail on outputs that cancel to ~0)."""
    r = ref.linear(x, w, b)
    scale = torch.nn.functional.linear(x.abs().double(), w.double().abs(),
                                       None if b is None else b.double().abs())
    err = (y.double() - r.double()).abs()
    bad = err > rel * scale + 1e-30
    assert not bad.any(), (
        f"max err {err.max().item():.3g}, at scale {scale[bad].min().item():.3g}; "
        f"x {tuple(x.shape)} w {tuple(w.shape)} {w.dtype}")


KINDS = ["plain", "packed"]


def _op(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The registered op of that kind on x: [..., K], w: [N, K]."""
    if kind == "plain":
        return torch.ops.npr.linear_small(x, w, b)
    return torch.ops.npr.linear_packed(x, ref.pack_weight(w), w.shape[0], b)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference_over_shapes(kind, dtype, bias, isa):
    for m in ROWS:
        for k, n in SHAPES:
            x, w, b = _inputs(m, k, n, dtype, bias, seed=m * 1000 + k * 7 + n)
            y = _op(kind, x, w, b)
            assert y.shape == (m, n) and y.dtype == torch.float32
            _close_to_ref(y, x, w, b)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 70),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), kind=st.sampled_from(KINDS),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference_random_shapes(m, k, n, dtype, bias, kind, seed):
    x, w, b = _inputs(m, k, n, dtype, bias, seed)
    _close_to_ref(_op(kind, x, w, b), x, w, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_layer_split_over_threads(kind, dtype, isa):
    # Big enough that at::parallel_for splits the outputs; results do not depend on the split
    # (every output is summed by one thread in a fixed order).
    x, w, b = _inputs(8, 576, 1536, dtype, True, seed=5)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y2 = _op(kind, x, w, b)
        torch.set_num_threads(1)
        y1 = _op(kind, x, w, b)
    finally:
        torch.set_num_threads(prev)
    _close_to_ref(y2, x, w, b)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("kind", KINDS)
def test_leading_dims_and_noncontiguous(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 40, generator=g)  # [..., K] with two leading dims
    w = torch.randn(40, 24, generator=g).t()  # non-contiguous [N=24, K=40]
    b = torch.randn(48, generator=g)[::2]  # non-contiguous bias
    y = _op(kind, x, w, b)
    assert y.shape == (3, 4, 24)
    _close_to_ref(y.reshape(12, 24), x.reshape(12, 40), w, b)
    xt = torch.randn(40, 5, generator=g).t()  # non-contiguous x
    _close_to_ref(_op(kind, xt, w, None), xt, w, None)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_shapes(kind):
    w = torch.randn(6, 0)
    b = torch.randn(6)
    y = _op(kind, torch.randn(3, 0), w, b)  # K = 0: y = bias
    torch.testing.assert_close(y, b.expand(3, 6))
    assert _op(kind, torch.randn(3, 0), w, None).abs().sum() == 0
    assert _op(kind, torch.randn(0, 5), torch.randn(6, 5), None).shape == (0, 6)
    assert _op(kind, torch.randn(2, 5), torch.randn(0, 5), None).shape == (2, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(dtype, bias):
    x, w, b = _inputs(3, 19, 11, dtype, bias, seed=3)
    torch.library.opcheck(torch.ops.npr.linear_small.default, (x, w, b))
    torch.library.opcheck(torch.ops.npr.linear_packed.default, (x, ref.pack_weight(w), 11, b))


@pytest.mark.parametrize("n,k", [(1, 1), (3, 8), (7, 13), (24, 40), (100, 3)])
def test_pack_layout_and_roundtrip(n, k):
    w = torch.randn(n, k)
    p = npr.ops.pack_linear_weight(w, dtype=torch.bfloat16)
    assert p.data.shape == (-(-n // 8), k, 8) and p.dtype == torch.bfloat16
    assert p.shape == (n, k)
    assert torch.equal(p.unpack(), w.bfloat16())
    # Panel q, row kk, lane j = weight (8q + j, kk); zeros in the padding past N.
    q, j = (n - 1) // 8, (n - 1) % 8
    assert p.data[q, k - 1, j] == w[n - 1, k - 1].bfloat16()
    full = ref.unpack_weight(p.data, p.data.shape[0] * 8, k)  # with padding
    assert torch.equal(full[:n], w.bfloat16())
    assert full[n:].abs().sum() == 0


def test_bad_input_names_problem():
    packed = torch.ops.npr.linear_packed
    with pytest.raises(RuntimeError, match=r"packed must be \[ceil\(N/8\), K, 8\]"):
        packed(torch.randn(2, 17), ref.pack_weight(torch.randn(5, 8)), 5, None)  # K mismatch
    with pytest.raises(RuntimeError, match="packed must be"):
        packed(torch.randn(2, 8), ref.pack_weight(torch.randn(5, 8)), 9, None)  # N mismatch (panels of 8)
    with pytest.raises(RuntimeError, match="packed must be"):
        packed(torch.randn(2, 8), torch.randn(5, 8), 5, None)  # not packed
    with pytest.raises(RuntimeError, match=r"bias must be \[N\]"):
        packed(torch.randn(2, 8), ref.pack_weight(torch.randn(5, 8)), 5, torch.randn(6))
    with pytest.raises(ValueError, match="dtype must be"):
        npr.ops.pack_linear_weight(torch.randn(4, 8), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\]"):
        npr.ops.pack_linear_weight(torch.randn(8))
    op = torch.ops.npr.linear_small
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\]"):
        op(torch.randn(2, 8), torch.randn(4, 7), None)
    with pytest.raises(RuntimeError, match="x must be float32"):
        op(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="weight must be float32, bfloat16 or float16"):
        op(torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=r"bias must be \[N\]"):
        op(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))
    with pytest.raises(RuntimeError, match="bias must be float32"):
        op(torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, dtype=torch.float64))


# The wrapper npr.ops.linear: kernel for few fp32 rows, F.linear otherwise; same numbers.
@pytest.mark.parametrize("rows", [1, 8, linear_mod.SMALL_ROWS_MAX, linear_mod.SMALL_ROWS_MAX + 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_wrapper_matches_reference(rows, dtype, packed):
    x, w, b = _inputs(rows, 72, 40, dtype, True, seed=rows)
    x = x.reshape(1, rows, 72)
    y = npr.ops.linear(x, npr.ops.pack_linear_weight(w) if packed else w, b)
    assert y.shape == (1, rows, 40) and y.dtype == torch.float32
    _close_to_ref(y.reshape(rows, 40), x.reshape(rows, 72), w, b)


def test_wrapper_packed_fallbacks(monkeypatch):
    x, w, b = _inputs(3, 20, 10, torch.float32, True, seed=9)
    p = npr.ops.pack_linear_weight(w, dtype=torch.float16)
    y = npr.ops.linear(x.double(), p, b)  # non-fp32 x: unpacked, F.linear in x.dtype
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x.double() @ w.half().double().t() + b.double())
    monkeypatch.setenv("NPR_FORCE_REF", "1")
    npr.env.reload()
    _close_to_ref(npr.ops.linear(x, p, b), x, w.half(), b)
    _close_to_ref(npr.ops.linear(x, w.bfloat16(), b), x, w.bfloat16(), b)


def test_wrapper_dispatch():
    use = linear_mod._use_kernel
    w32, w16 = torch.randn(4, 8), torch.randn(4, 8).bfloat16()
    assert use(torch.randn(3, 8), w32, None)
    assert not use(torch.randn(linear_mod.SMALL_ROWS_MAX + 1, 8), w32, None)  # torch GEMM
    assert use(torch.randn(linear_mod.SMALL_ROWS_MAX + 1, 8), w16, None)  # no widened copy
    assert not use(torch.randn(3, 8).bfloat16(), w16, None)  # non-fp32 x
    assert not use(torch.randn(3, 8), w32.double(), None)


def test_wrapper_other_dtypes_fall_back():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.randn(5, 16, dtype=torch.bfloat16)
    y = npr.ops.linear(x, w, torch.randn(5))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5)
    x64 = torch.randn(2, 16, dtype=torch.float64)
    torch.testing.assert_close(npr.ops.linear(x64, w.float()), x64 @ w.double().t())
