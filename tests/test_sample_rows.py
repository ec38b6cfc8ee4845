"""npr::sample_rows (the CPU sampler's one-call draw) against the tensor-op draw it replaces on the
CPU (npr.engine.sampling._draw_reference): same tokens and log-probs over many shapes, the same
uniforms bit for bit, cut tokens never drawn, greedy ties, opcheck and refused arguments."""
import numpy as np
import pytest
import torch

from npr import _ext
from npr.engine.sampling import Rows, _draw_reference, request_key, uniforms

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C is not built")


def call(x: torch.Tensor, temp: np.ndarray, key: np.ndarray, sample: np.ndarray,
         branch: np.ndarray, counter: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ints = [torch.from_numpy(np.ascontiguousarray(a).astype(np.int64)) for a in
            (key.view(np.int64), sample, branch, counter)]
    return torch.ops.npr.sample_rows(x, torch.from_numpy(temp.astype(np.float64)), *ints)


def random_rows(rng: np.random.Generator, S: int) -> Rows:
    temp = rng.choice([0.0, 0.3, 0.7, 1.0, 1.0, 1.6], size=S)
    return Rows(temperature=temp, top_k=np.full(S, -1), top_p=np.ones(S), penalty=np.ones(S),
                processors=np.zeros(S, bool),
                key=rng.integers(0, 2**63, size=S, dtype=np.int64).astype(np.uint64) * 2 + 1,
                sample=rng.integers(0, 8, size=S), branch=rng.integers(0, 9, size=S),
                counter=rng.integers(0, 5000, size=S), in_step=np.zeros(S, bool))


@pytest.mark.parametrize("S,V", [(1, 1), (3, 2), (5, 7), (8, 8), (17, 63), (9, 64), (33, 65),
                                 (64, 114), (40, 1000), (6, 4097), (2, 49152)])
def test_equals_the_tensor_op_draw(S, V):
    for seed in range(4):
        rng = np.random.default_rng(1000 * S + V + seed)
        rows = random_rows(rng, S)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(S, V, generator=g) * float(rng.choice([0.5, 2.0, 6.0]))
        if seed % 2 and V > 1:  # cut tokens, as top-k / top-p / processors leave them
            x[torch.rand(S, V, generator=g) < 0.4] = float("-inf")
            x[:, 0] = torch.randn(S, generator=g)  # every row keeps a token
        greedy = rows.temperature == 0
        want_tok, want_lp = _draw_reference(x, rows, greedy, np.zeros(S, bool))
        tok, lp = call(x, rows.temperature, rows.key, rows.sample, rows.branch, rows.counter)
        assert tok.dtype == torch.long and lp.dtype == torch.float32 and tok.shape == lp.shape == (S,)
        assert torch.equal(tok, want_tok), (seed, tok, want_tok)
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=2e-5)
        assert torch.isfinite(x[torch.arange(S), tok]).all()


def test_uniforms_are_the_same_bits():
    """2^16 equal logits: the draw is floor(u * 2^16) exactly, so 16 bits of each row's uniform
    show through; they must be numpy's uniforms of the same four ints."""
    V, S = 1 << 16, 64
    rng = np.random.default_rng(7)
    key = np.array([request_key(int(s), 0, 0) for s in rng.integers(0, 2**62, S)], dtype=np.uint64)
    sample, branch = rng.integers(0, 4, S), rng.integers(0, 9, S)
    counter = rng.integers(0, 2**40, S)
    tok, lp = call(torch.zeros(S, V), np.ones(S), key, sample, branch, counter)
    u = uniforms(key, sample, branch, counter)
    assert tok.tolist() == np.floor(u * V).astype(np.int64).tolist()
    torch.testing.assert_close(lp, torch.full((S,), -float(np.log(V))))


def test_cut_tokens_are_never_drawn():
    S, V = 4000, 50
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, V, generator=g) * 3
    cut = torch.rand(S, V, generator=g) < 0.9
    cut[:, 17] = False
    x[cut] = float("-inf")
    rng = np.random.default_rng(3)
    rows = random_rows(rng, S)
    tok, lp = call(x, np.ones(S), rows.key, rows.sample, rows.branch, rows.counter)
    assert not cut[torch.arange(S), tok].any()
    assert torch.isfinite(lp).all()


def test_greedy_takes_the_first_maximum():
    x = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -1.0, float("-inf"), -0.5]])
    z = np.zeros(3)
    tok, lp = call(x, z, z.astype(np.uint64), z, z, z)
    assert tok.tolist() == [1, 0, 3]
    torch.testing.assert_close(lp, torch.log_softmax(x, -1)[torch.arange(3), tok])


def test_opcheck():
    S, V = 6, 37
    rng = np.random.default_rng(0)
    rows = random_rows(rng, S)
    ints = [torch.from_numpy(a.astype(np.int64)) for a in
            (rows.key.view(np.int64), rows.sample, rows.branch, rows.counter)]
    torch.library.opcheck(torch.ops.npr.sample_rows.default,
                          (torch.randn(S, V), torch.from_numpy(rows.temperature), *ints))


@pytest.mark.parametrize("what,args,match", [
    ("fp64 logits", dict(x=torch.zeros(2, 5, dtype=torch.float64)), "float32"),
    ("1-d logits", dict(x=torch.zeros(5)), r"\[S, V\]"),
    ("temperature shape", dict(temp=torch.zeros(3, dtype=torch.float64)), "temperature"),
    ("temperature dtype", dict(temp=torch.zeros(2)), "temperature"),
    ("negative temperature", dict(temp=torch.tensor([1.0, -0.5], dtype=torch.float64)), "temperature"),
    ("nan temperature", dict(temp=torch.tensor([float("nan"), 1.0], dtype=torch.float64)), "temperature"),
    ("counter dtype", dict(counter=torch.zeros(2, dtype=torch.int32)), "counter"),
    ("key length", dict(key=torch.zeros(3, dtype=torch.long)), "key"),
])
def test_bad_arguments_are_named(what, args, match):
    a = dict(x=torch.zeros(2, 5), temp=torch.ones(2, dtype=torch.float64),
             key=torch.zeros(2, dtype=torch.long), sample=torch.zeros(2, dtype=torch.long),
             branch=torch.zeros(2, dtype=torch.long), counter=torch.zeros(2, dtype=torch.long))
    a.update(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.npr.sample_rows(a["x"], a["temp"], a["key"], a["sample"], a["branch"], a["counter"])
