"""Sampling: top-k / top-p masks, the in-step repetition penalty, the batched sampler against a
per-row pure-torch reference, counter-based seeded draws, distributions by chi-square, device
logic, and the engine's use of it (processor rows mixed with plain rows, batch independence)."""
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import npr
from npr.engine.sampling import (Rows, Sampler, apply_repetition_penalty, apply_top_k_top_p,
                                 request_key, sample_batch, splitmix64, uniforms)

# ------------------------------------------------------------------ per-row reference (pure torch)


def ref_top_k_top_p(logits, top_k, top_p):
    """The sort-based one-row version the engine used before the batched sampler."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def ref_penalty(logits, tokens, penalty):
    if penalty == 1.0 or not tokens:
        return logits
    idx = torch.tensor(sorted(set(tokens)), dtype=torch.long)
    seen = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def ref_row(logits, p, u, in_step=False, step_tokens=()):
    """(token, logprob, processed logits) of one row; u: the row's uniform (inverse CDF)."""
    x = logits.float()
    if in_step:
        x = ref_penalty(x, list(step_tokens), p.step_repetition_penalty)
    if p.greedy:
        tok = int(torch.argmax(x))
        return tok, float(torch.log_softmax(x, -1)[tok]), x
    x = ref_top_k_top_p(x / p.temperature, p.top_k, p.top_p)
    logp = x - torch.logsumexp(x, -1)
    cdf = torch.cumsum(logp.exp().double(), 0)
    tok = min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64),
                                     right=True)), x.numel() - 1)
    return tok, float(logp[tok]), x


def py_splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def random_params(rng: random.Random) -> npr.SamplingParams:
    kind = rng.choice(["greedy", "temp", "topk", "topp", "both"])
    t = 0.0 if kind == "greedy" else rng.choice([0.3, 0.7, 1.0, 1.6])
    return npr.SamplingParams(
        temperature=t, top_k=rng.choice([1, 3, 10]) if kind in ("topk", "both") else -1,
        top_p=rng.choice([0.2, 0.6, 0.95]) if kind in ("topp", "both") else 1.0,
        step_repetition_penalty=rng.choice([1.0, 1.3, 2.5]), seed=rng.randint(0, 2**40))


def make_rows(params, *, in_step=None, counters=None, branches=None, samples=None):
    n = len(params)
    return Rows.of(params, [request_key(p.seed, 0, i) for i, p in enumerate(params)],
                   samples if samples is not None else [0] * n,
                   branches if branches is not None else list(range(n)),
                   counters if counters is not None else [7] * n, in_step)


# ------------------------------------------------------------------ masks (one-row helpers)


def test_top_k_keeps_exactly_k():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(97, generator=g)
        k = int(torch.randint(1, 97, (1,), generator=g))
        out = apply_top_k_top_p(logits, k, 1.0)
        kept = torch.isfinite(out)
        assert int(kept.sum()) == k
        assert set(torch.topk(logits, k).indices.tolist()) == set(kept.nonzero()[:, 0].tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    g = torch.Generator().manual_seed(1)
    for p in (0.05, 0.3, 0.9, 0.999):
        logits = torch.randn(50, generator=g) * 3
        out = apply_top_k_top_p(logits, -1, p)
        probs = torch.softmax(logits, -1)
        order = torch.argsort(probs, descending=True)
        cum = torch.cumsum(probs[order], 0)
        n_keep = int((cum < p).sum()) + 1
        assert set(order[:n_keep].tolist()) == set(torch.isfinite(out).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("V", [50, 3000])  # 3000: past the top-64 and top-1024 tries
def test_top_k_top_p_equals_the_sort_based_reference(V):
    g = torch.Generator().manual_seed(V)
    for scale in (0.5, 3.0, 10.0):  # flat to peaked: the top-p prefix is long or short
        for k, p in [(-1, 0.9), (-1, 0.3), (5, 0.9), (200, 0.5), (V - 1, 0.99), (7, 1.0)]:
            logits = torch.randn(V, generator=g) * scale
            got = torch.isfinite(apply_top_k_top_p(logits, k, p))
            want = torch.isfinite(ref_top_k_top_p(logits, k, p))
            assert torch.equal(got, want), (scale, k, p, int(got.sum()), int(want.sum()))


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched


# ------------------------------------------------------------------ counter-based uniforms


def test_uniforms_are_splitmix64_of_the_four_ints():
    keys = [request_key(5, 0, 0), request_key(None, 3, 17), 2**64 - 1]
    s, b, c = [0, 2, 1], [0, 5, 3], [11, 0, 2**31 - 1]
    got = uniforms(np.array(keys, dtype=np.uint64), np.array(s), np.array(b), np.array(c))
    for i in range(3):
        h = py_splitmix64(py_splitmix64(py_splitmix64(keys[i] ^ s[i]) ^ b[i]) ^ c[i])
        assert got[i] == (h >> 11) / 2**53
    assert int(splitmix64(np.uint64(0))) == py_splitmix64(0)
    # A request's own seed decides its key; without one, the engine seed and request id do.
    assert request_key(5, 0, 0) == request_key(5, 9, 4)
    assert len({request_key(None, 0, r) for r in range(100)} | {request_key(None, 1, 0)}) == 101


def test_uniforms_are_uniform():
    n = 40_000
    u = uniforms(np.full(n, request_key(1, 0, 0), dtype=np.uint64), np.zeros(n, np.int64),
                 np.zeros(n, np.int64), np.arange(n))
    assert u.min() >= 0 and u.max() < 1
    counts = np.bincount((u * 20).astype(int), minlength=20)
    chi2 = float(((counts - n / 20) ** 2 / (n / 20)).sum())
    assert chi2 < 43.82  # chi-square, 19 degrees of freedom, alpha = 0.001


# ------------------------------------------------------------------ batched sampler vs reference


@pytest.fixture(params=["compiled", "torch"])
def draw_path(request, monkeypatch):
    """Both draws of sample_batch: npr::sample_rows (CPU fp32) and the tensor ops (GPUs)."""
    import npr.engine.sampling as sampling
    from npr import _ext

    if request.param == "torch":
        monkeypatch.setattr(sampling, "_compiled", lambda x: False)
    elif not _ext.available():
        pytest.skip("npr._C is not built")
    return request.param


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_equals_per_row_reference(seed, draw_path):
    check_against_reference(seed, "cpu")


def check_against_reference(seed: int, device: str) -> None:
    """sample_batch on `device` logits vs ref_row on the host, per row: tokens and logprobs."""
    rng = random.Random(seed)
    S, V = 48, 61
    params = [random_params(rng) for _ in range(S)]
    in_step = [rng.random() < 0.5 for _ in range(S)]
    counters = [rng.randint(0, 500) for _ in range(S)]
    rows = make_rows(params, in_step=in_step, counters=counters)
    steps = {i: [rng.randint(0, V - 1) for _ in range(rng.randint(0, 6))] for i in rows.penalty_rows()}
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, V, generator=g) * 2
    tok, lp = sample_batch(logits.to(device), rows, [steps[i] for i in rows.penalty_rows()])
    assert tok.device.type == lp.device.type == device
    tok, lp = tok.cpu(), lp.cpu()
    assert tok.dtype == torch.long and lp.dtype == torch.float32 and tok.shape == lp.shape == (S,)
    u = uniforms(rows.key, rows.sample, rows.branch, rows.counter)
    for i, p in enumerate(params):
        t, want_lp, x = ref_row(logits[i], p, float(u[i]), in_step[i], steps.get(i, ()))
        assert int(tok[i]) == t, (i, p)
        assert float(lp[i]) == pytest.approx(want_lp, rel=1e-5, abs=1e-6)
        # logprobs are log_softmax of the processed logits at the chosen token
        assert float(lp[i]) == pytest.approx(float(torch.log_softmax(x, -1)[t]), rel=1e-5, abs=1e-6)
        assert torch.isfinite(x[t])  # never a token that top-k / top-p dropped


def test_greedy_is_argmax_at_temperature_one(draw_path):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 40, generator=g)
    rows = make_rows([npr.SamplingParams(temperature=0, top_k=2, top_p=0.1)] * 16)
    tok, lp = sample_batch(logits, rows)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])


def test_seeded_draws_do_not_depend_on_batch_composition_or_order(draw_path):
    rng = random.Random(5)
    V = 33
    mine = [npr.SamplingParams(temperature=1.0, seed=11),
            npr.SamplingParams(temperature=0.7, top_p=0.8, seed=12),
            npr.SamplingParams(temperature=1.2, top_k=4, seed=13), npr.SamplingParams(temperature=0)]
    keys = [request_key(p.seed, 0, 100 + j) for j, p in enumerate(mine)]
    g = torch.Generator().manual_seed(5)
    my_logits = torch.randn(len(mine), V, generator=g)
    draws = []
    for trial in range(4):
        others = [random_params(rng) for _ in range(rng.randint(0, 20))]
        params = mine + others
        okeys = keys + [request_key(p.seed, 0, rng.randint(0, 99)) for p in others]
        logits = torch.cat([my_logits, torch.randn(len(others), V, generator=g)])
        perm = list(range(len(params)))
        rng.shuffle(perm)
        rows = Rows.of([params[i] for i in perm], [okeys[i] for i in perm], [0] * len(perm),
                       [3 if i < len(mine) else rng.randint(0, 8) for i in perm],
                       [40 if i < len(mine) else rng.randint(0, 99) for i in perm])
        tok, _ = sample_batch(logits[perm], rows)
        draws.append([int(tok[perm.index(j)]) for j in range(len(mine))])
    assert all(d == draws[0] for d in draws), draws
    # ... and a different counter (the next token of the branch) draws anew.
    rows = Rows.of(mine, keys, [0] * 4, [3] * 4, [41] * 4)
    u40 = uniforms(np.array(keys, np.uint64), np.zeros(4), np.full(4, 3), np.full(4, 40))
    u41 = uniforms(rows.key, rows.sample, rows.branch, rows.counter)
    assert (u40 != u41).all()


CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877}  # chi-square critical values, alpha = 0.001


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the categories with mass, and its degrees of freedom."""
    n = counts.sum()
    m = probs > 0
    exp = probs[m] * n
    return float(((counts[m] - exp) ** 2 / exp).sum()), int(m.sum()) - 1


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, -1, 1.0), (0.6, -1, 1.0), (1.5, 5, 1.0), (1.0, -1, 0.8), (0.8, 6, 0.9)])
def test_distribution_by_frequencies(temperature, top_k, top_p, draw_path):
    check_frequencies(temperature, top_k, top_p, "cpu")


def check_frequencies(temperature: float, top_k: int, top_p: float, device: str) -> None:
    logits = torch.tensor([2.0, 1.6, 1.1, 0.7, 0.2, -0.3, -0.9, -1.5, -2.5, 0.9])
    p = npr.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=2024)
    N = 20_000  # one fixed logits vector, N draws: the branch's counters 0..N-1
    rows = Rows.of([p] * N, [request_key(p.seed, 0, 0)] * N, [0] * N, [1] * N, list(range(N)))
    tok, lp = sample_batch(logits.to(device).expand(N, -1), rows)
    tok, lp = tok.cpu(), lp.cpu()
    counts = np.bincount(tok.numpy(), minlength=10)
    want = torch.softmax(ref_top_k_top_p(logits / temperature, top_k, top_p), -1).double().numpy()
    assert (counts[want == 0] == 0).all()  # masked tokens never drawn
    stat, df = chi2(counts, want)
    assert stat < CHI2_999[df], (stat, df, counts, want * N)
    # The test has power: the frequencies reject the untempered / unmasked distribution.
    if temperature != 1.0 or top_k > 0 or top_p < 1.0:
        other = torch.softmax(logits, -1).double().numpy()
        assert chi2(counts, other)[0] > CHI2_999[9]
    assert torch.allclose(lp, torch.log(torch.from_numpy(want).float())[tok], rtol=1e-5)


# ------------------------------------------------------------------ step repetition penalty


def test_penalty_applies_inside_steps_only():
    logits = torch.ones(2, 8)
    logits[:, 3] = 5.0
    p = npr.SamplingParams(temperature=0, step_repetition_penalty=100.0)
    rows = make_rows([p, p], in_step=[False, True])
    assert list(rows.penalty_rows()) == [1]
    tok, lp = sample_batch(logits, rows, [[3, 3]])
    assert int(tok[0]) == 3 and int(tok[1]) != 3
    want = torch.log_softmax(ref_penalty(logits[1], [3], 100.0), -1)[tok[1]]
    assert float(lp[1]) == pytest.approx(float(want))
    with pytest.raises(ValueError, match="step tokens"):
        sample_batch(logits, rows)
    with pytest.raises(ValueError, match="token outside"):
        sample_batch(logits, rows, [[8]])


def test_penalty_rows_mixed_with_plain_rows():
    g = torch.Generator().manual_seed(8)
    S, V = 12, 20
    logits = torch.randn(S, V, generator=g) * 3
    ps = [npr.SamplingParams(temperature=t, step_repetition_penalty=pen, seed=i)
          for i, (t, pen) in enumerate([(0, 1.0), (0, 3.0), (1.0, 3.0), (0.5, 0.5)] * 3)]
    in_step = [i % 3 != 0 for i in range(S)]
    rows = make_rows(ps, in_step=in_step)
    pr = rows.penalty_rows().tolist()
    assert pr == [i for i in range(S) if in_step[i] and ps[i].step_repetition_penalty != 1.0]
    toks = {i: logits[i].topk(3).indices.tolist() + [0, 0] for i in pr}
    tok, lp = sample_batch(logits, rows, [toks[i] for i in pr])
    u = uniforms(rows.key, rows.sample, rows.branch, rows.counter)
    for i in range(S):
        t, want, _ = ref_row(logits[i], ps[i], float(u[i]), in_step[i], toks.get(i, ()))
        assert int(tok[i]) == t and float(lp[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ the registry and bad input


def test_sampler_rows_look_up_each_request():
    s = Sampler(engine_seed=3)
    a = npr.SamplingParams(temperature=0.5, top_k=4, seed=9)
    b = npr.SamplingParams(temperature=0, step_repetition_penalty=1.5, logits_processors=[lambda c, x: x])
    s.add(7, a)
    s.add(2, b)
    rows = s.rows(np.array([7, 2, 7]), np.array([0, 1, 2]), np.array([0, 4, 1]), np.array([5, 6, 7]),
                  np.array([0, 1, 1]))
    assert rows.temperature.tolist() == [0.5, 0.0, 0.5] and rows.top_k.tolist() == [4, -1, 4]
    assert rows.processors.tolist() == [False, True, False] and rows.penalty_rows().tolist() == [1]
    assert rows.key.tolist() == [request_key(9, 3, 7), request_key(None, 3, 2), request_key(9, 3, 7)]
    with pytest.raises(ValueError, match="already"):
        s.add(7, a)
    s.forget(7)
    assert len(s) == 1
    with pytest.raises(KeyError, match="request 7"):
        s.rows(np.array([2, 7]), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2))
    s.forget(2)
    with pytest.raises(KeyError, match="request 2"):
        s.rows(np.array([2]), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1))


def test_bad_shapes_are_refused():
    rows = make_rows([npr.SamplingParams()] * 3)
    with pytest.raises(ValueError, match=r"\[3, V\]"):
        sample_batch(torch.zeros(2, 5), rows)
    with pytest.raises(ValueError, match="Rows.sample"):
        Rows.of([npr.SamplingParams()] * 2, [0, 0], [0], [0, 0], [0, 0])


# ------------------------------------------------------------------ device logic


class DeviceLog(TorchDispatchMode):
    """Records the device of every tensor each aten op takes or returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set[str], set[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def devs(x):
            flat = torch.utils._pytree.tree_leaves(x)
            return {t.device.type for t in flat if isinstance(t, torch.Tensor)}

        self.ops.append((str(func), devs((args, kwargs)), devs(out)))
        return out


@pytest.mark.parametrize("mixed", [False, True])
def test_every_op_runs_on_the_logits_device(mixed):
    """On 'meta' logits (what a CUDA run would see: no CPU generator, nothing computed on the
    host but the per-row numbers it uploads): every op takes and returns meta tensors, except the
    uploads (cpu -> meta copies), and the results are on meta. V <= 64 keeps top-p free of its
    one device read (how far to sort), which meta tensors cannot answer."""
    rng = random.Random(3)
    ps = ([random_params(rng) for _ in range(24)] if mixed
          else [npr.SamplingParams(temperature=1.0, seed=1)] * 8)
    rows = make_rows(ps, in_step=[True] * len(ps))
    steps = [[1, 2, 40] for _ in rows.penalty_rows()]
    logits = torch.randn(len(ps), 50).to("meta")
    with DeviceLog() as log:
        tok, lp = sample_batch(logits, rows, steps)
    assert tok.device.type == lp.device.type == "meta"
    assert log.ops
    uploads = 0
    for name, ins, outs in log.ops:
        if name == "aten.lift_fresh.default":      # torch.from_numpy of a host array
            assert ins == outs == {"cpu"}
        elif name == "aten._to_copy.default" and ins == {"cpu"}:
            assert outs == {"meta"}, (name, ins, outs)  # ... uploaded to the logits' device
            uploads += 1
        else:
            assert ins <= {"meta"} and outs <= {"meta"}, (name, ins, outs)
    assert 1 <= uploads <= 10  # the per-row numbers, a few small tensors


# ------------------------------------------------------------------ on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_sampling_equals_the_per_row_reference(seed):
    """Temperature, top-k, top-p and the penalty on CUDA logits: the host's reference tokens
    (the uniforms are hashed on the host, so the draws are the CPU's) and logprobs."""
    check_against_reference(seed, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.8, 6, 0.9)])
def test_cuda_distribution_by_frequencies(temperature, top_k, top_p):
    check_frequencies(temperature, top_k, top_p, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(not npr._ext.with_cuda(), reason="npr._C is built without CUDA")
def test_cuda_engine_samples_as_the_cpu_engine(eng):
    """An engine on CUDA at temperature > 0 (plain and native requests, top-p, seeds in a mixed
    batch): each request's tokens are those of the CPU engine on the same weights."""
    check_engine_samples_as_the_cpu_engine(eng, "cuda")


def check_engine_samples_as_the_cpu_engine(eng, device: str) -> None:
    from tiny import tiny_model

    from npr.bench.forcing import ForcedStructure
    from npr.tags import TAGS

    tok = eng.tokenizer
    v = tok.get_vocab()
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
    prompts = [ids_of(eng, f"gpu {i}") for i in range(5)]
    forcer = ForcedStructure(tag_ids={t: v[t] for t in TAGS}, labels=labels, eos_id=tok.eos_token_id,
                             prompt_len=len(prompts[0]), branches=[3], step_tokens=4,
                             prefix_tokens=1)
    ps = [npr.SamplingParams(temperature=1.0, seed=9, max_new_tokens=200, logits_processors=[forcer])]
    ps += [npr.SamplingParams(temperature=t, top_p=p, seed=s, parallel="off", max_new_tokens=16)
           for t, p, s in ((1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 0.95, None), (0.0, 1.0, 4))]
    gpu = npr.Engine(tiny_model(len(tok), seed=1).to(device), tok, kv_cache_tokens=8192,
                     max_branches=4, device=device)  # the weights of the fixture's engine
    seeded = [i for i, p in enumerate(ps) if p.seed is not None]
    want = eng.generate(input_ids=prompts, sampling_params=ps)
    got = gpu.generate(input_ids=prompts, sampling_params=ps)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].stats["forks"] == 1
    for i in seeded:
        a, b = want[i].outputs[0], got[i].outputs[0]
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids, i
        assert [lp is None for lp in b.logprobs] == [lp is None for lp in a.logprobs]  # injected
        assert [lp for lp in b.logprobs if lp is not None] == pytest.approx(
            [lp for lp in a.logprobs if lp is not None], rel=1e-4, abs=1e-5)
    assert gpu.pool_stats()["used_blocks"] == 0


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def eng():
    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return npr.Engine(tiny_model(len(tok), seed=1), tok, kv_cache_tokens=8192, max_branches=4)


def ids_of(eng, text):
    return eng.tokenizer.encode(text, add_special_tokens=False)


class Counting:
    """A processor that bans every even token and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, visible, logits):
        self.calls += 1
        out = logits.clone()
        out[0::2] = float("-inf")
        return out


def test_engine_seeded_outputs_do_not_depend_on_the_batch(eng):
    prompts = [ids_of(eng, f"prompt {i}") for i in range(6)]
    mine = npr.SamplingParams(temperature=1.0, top_p=0.9, seed=77, parallel="off", max_new_tokens=12)
    alone = eng.generate(input_ids=[prompts[0]], sampling_params=mine)[0].outputs[0]
    others = [npr.SamplingParams(temperature=t, seed=None if t else 1, parallel="off", max_new_tokens=8)
              for t in (0.0, 0.5, 1.0, 1.0, 0.0)]
    for order in ([0, 1, 2, 3, 4, 5], [3, 5, 0, 1, 4, 2]):
        ps = [mine] + others
        outs = eng.generate(input_ids=[prompts[i] for i in order], sampling_params=[ps[i] for i in order])
        got = outs[order.index(0)].outputs[0]
        assert got.token_ids == alone.token_ids and got.logprobs == pytest.approx(alone.logprobs, rel=1e-5)


def test_engine_processor_rows_mixed_with_plain_rows(eng):
    """Processors run for their own rows only (once per sampled token), their results are
    sampled from, and the plain rows of the same step sample as they would alone."""
    prompts = [ids_of(eng, f"mix {i}") for i in range(4)]
    plain = npr.SamplingParams(temperature=1.0, seed=5, parallel="off", max_new_tokens=10)
    alone = [eng.generate(input_ids=[p], sampling_params=plain)[0].outputs[0].token_ids for p in prompts[2:]]
    procs = [Counting(), Counting()]
    ps = [npr.SamplingParams(temperature=t, seed=6, parallel="off", max_new_tokens=10,
                             logits_processors=[f]) for t, f in zip((0.0, 1.0), procs)]
    outs = eng.generate(input_ids=prompts, sampling_params=ps + [plain, plain])
    for f, o in zip(procs, outs[:2]):
        c = o.outputs[0]
        assert all(t % 2 == 1 for t in c.token_ids if t not in eng.eos_ids)
        assert f.calls == len(c.token_ids)
    assert [o.outputs[0].token_ids for o in outs[2:]] == alone


def test_engine_seeded_native_equals_sequential(eng):
    """Per branch, the draws depend on (seed, sample, branch, position) only: decoding the same
    structure natively (branches as rows of one batch) or sequentially gives the same tokens."""
    from npr.bench.forcing import ForcedStructure
    from npr.tags import TAGS

    tok = eng.tokenizer
    v = tok.get_vocab()
    tag_ids = {t: v[t] for t in TAGS}
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
    ids = ids_of(eng, "hello")
    outs = {}
    for mode in ("native", "sequential"):
        f = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                            branches=[4, 3], step_tokens=5, prefix_tokens=1)
        sp = npr.SamplingParams(temperature=1.0, seed=3, n=2, max_new_tokens=300, parallel=mode,
                                step_repetition_penalty=1.7, logits_processors=[f])
        outs[mode] = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs
    for a, b in zip(outs["native"], outs["sequential"]):
        assert a.finish_reason == "stop" and a.stats["forks"] == 2
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
    assert outs["native"][0].token_ids != outs["native"][1].token_ids  # the samples differ


def test_engine_stop_strings_and_on_token_hook(eng):
    """Stop strings are checked on the rows of the requests that have them (the others decode as
    alone); the on_token hook sees every sampled token of every request, in order."""
    prompts = [ids_of(eng, f"stop {i}") for i in range(3)]
    sp = npr.SamplingParams(temperature=1.0, seed=21, parallel="off", max_new_tokens=24)
    alone = [eng.generate(input_ids=[p], sampling_params=sp)[0].outputs[0] for p in prompts]
    full = alone[1].token_ids
    assert len(full) >= 12, eng.tokenizer.decode(full)
    text = eng.tokenizer.decode(full)
    stop = text[6:8]
    k = next(k for k in range(1, len(full) + 1) if stop in eng.tokenizer.decode(full[:k]))
    seen: dict[int, list[int]] = {}
    eng.on_token = lambda rid, s, b, t: seen.setdefault(rid, []).append(t)
    try:
        rids = [eng.add_request(input_ids=p, params=npr.SamplingParams(
            temperature=1.0, seed=21, parallel="off", max_new_tokens=24, stop=[stop] if i == 1 else None))
            for i, p in enumerate(prompts)]
        outs = {}
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o.outputs[0] for o in eng.step()})
    finally:
        eng.on_token = None
    got = [outs[r] for r in rids]
    assert got[1].finish_reason == "stop" and got[1].token_ids == full[:k]
    head = eng.tokenizer.decode(full[:k])
    assert got[1].text == head[:head.rfind(stop)]
    assert got[0].token_ids == alone[0].token_ids and got[2].token_ids == alone[2].token_ids
    assert [seen[r] for r in rids] == [o.token_ids for o in got]
    assert len(eng.sampler) == 0 and not eng._stop_requests  # nothing kept for finished requests
