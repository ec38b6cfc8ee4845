"""Sampling: top-k / top-p masks, the in-step repetition penalty, seeded determinism."""
import pytest
import torch

import npr
from npr.engine.sampling import Sampler, apply_repetition_penalty, apply_top_k_top_p


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


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched


def test_sample_row_penalty_only_inside_steps_and_seeded():
    s = Sampler(engine_seed=0)
    logits = torch.ones(8)
    logits[3] = 5.0
    sp = npr.SamplingParams(temperature=0, step_repetition_penalty=100.0)
    common = dict(request_id=0, sample=0, branch=1, visible=lambda: [], step_tokens=lambda: [3])
    assert s.sample_row(logits, sp, in_step=False, **common)[0] == 3
    assert s.sample_row(logits, sp, in_step=True, **common)[0] != 3
    sp2 = npr.SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(0).sample_row(torch.randn(64, generator=torch.Generator().manual_seed(i)), sp2,
                               in_step=False, **common)[0] for i in range(10)]
    b = [Sampler(0).sample_row(torch.randn(64, generator=torch.Generator().manual_seed(i)), sp2,
                               in_step=False, **common)[0] for i in range(10)]
    assert a == b


def test_logprob_is_of_the_sampled_distribution():
    s = Sampler(engine_seed=0)
    logits = torch.randn(30, generator=torch.Generator().manual_seed(3))
    sp = npr.SamplingParams(temperature=0.5, top_k=5, seed=1)
    tok, lp = s.sample_row(logits, sp, request_id=1, sample=0, branch=0, in_step=False,
                           visible=lambda: [], step_tokens=lambda: [])
    want = torch.log_softmax(apply_top_k_top_p(logits / 0.5, 5, 1.0), -1)[tok]
    assert lp == pytest.approx(float(want), rel=1e-6)
