"""Advantages and the policy loss: hand-computed numbers per preset, PAPO's gradient, and a
gradient that does not depend on how the batch is split into micro-batches."""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from npr.train.advantages import equal_reward_groups, group_advantages
from npr.train.config import OptimSection
from npr.train.dist import DistContext
from npr.train.logprobs import pack, token_logprobs
from npr.train.losses import PRESETS, policy_loss, token_weights
from npr.train.rollout import causal_layout
from npr.train.update import build_optimizer, build_scheduler, update
from tiny import tiny_model

EPS = 1e-6
# Groups: g0 = [1, -1, 1]; g1 = [1, 1, -1, (-1, invalid)]; g2 = [1 (singleton survivor), 2 invalid]
R = torch.tensor([1., -1., 1., 1., 1., -1., -1., 1., -1., -1.])
G = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
V = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)


def test_papo_advantages_by_hand():
    a = group_advantages(R, G, V, scale="batch", eps=EPS)
    # survivors: 1,-1,1,1,1,-1,1 -> n=7, sum=3, sum sq=7 -> sample var (7 - 9/7)/6 = 20/21
    std = math.sqrt(20 / 21)
    # group means over survivors only: g0 1/3, g1 1/3 (the invalid -1 is not in it), g2 1
    want = [2 / 3, -4 / 3, 2 / 3, 2 / 3, 2 / 3, -4 / 3, 0, 0, 0, 0]
    assert a.tolist() == pytest.approx([w / (std + EPS) for w in want], abs=1e-12)
    # the std is ONE number over the batch: it does not depend on how groups are arranged
    a2 = group_advantages(R, torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2]) * 7, V, scale="batch")
    assert torch.equal(a, a2)


def test_group_scale_advantages_by_hand():  # DAPO and GRPO
    a = group_advantages(R, G, V, scale="group", eps=EPS)
    s = math.sqrt((4 / 9 + 16 / 9 + 4 / 9) / 2)  # g0 and g1 alike: centered 2/3, -4/3, 2/3
    want = [2 / 3 / s, -4 / 3 / s, 2 / 3 / s, 2 / 3 / s, 2 / 3 / s, -4 / 3 / s, 0, 0, 0, 0]
    assert a.tolist() == pytest.approx(want, abs=1e-5)
    assert group_advantages(R, G, V, scale="none").tolist() == pytest.approx(
        [2 / 3, -4 / 3, 2 / 3, 2 / 3, 2 / 3, -4 / 3, 0, 0, 0, 0])


def test_zero_std_and_singletons_are_zero_not_nan():
    for scale in ("batch", "group", "none"):
        eq = group_advantages(torch.full((6,), 0.3), torch.tensor([0, 0, 0, 1, 1, 1]),
                              torch.ones(6, dtype=torch.bool), scale=scale)
        assert torch.equal(eq, torch.zeros(6, dtype=torch.float64))
        one = group_advantages(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([True]),
                               scale=scale)
        assert one.tolist() == [0.0]
        singles = group_advantages(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0, 1, 2]),
                                   torch.ones(3, dtype=torch.bool), scale=scale)
        assert singles.tolist() == [0.0, 0.0, 0.0]
        none = group_advantages(torch.tensor([1.0, -1.0]), torch.tensor([0, 0]),
                                torch.zeros(2, dtype=torch.bool), scale=scale)
        assert none.tolist() == [0.0, 0.0]
        empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.bool), scale=scale)
        assert empty.numel() == 0


def test_invalid_rollouts_do_not_enter_the_statistics():
    # changing an invalid rollout's reward changes nothing
    R2 = R.clone()
    R2[6], R2[8] = 100.0, float("nan")
    for scale in ("batch", "group"):
        assert torch.equal(group_advantages(R, G, V, scale=scale),
                           group_advantages(R2, G, V, scale=scale))


def test_bad_advantage_inputs():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(R, G, V, scale="rank")
    with pytest.raises(ValueError, match="alike"):
        group_advantages(R, G[:3], V)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]),
                         torch.tensor([True, True]))


def test_equal_reward_groups():
    eq = equal_reward_groups(torch.tensor([1., 1., -1., -1., 1., 3.]),
                             torch.tensor([0, 0, 1, 1, 2, 2]),
                             torch.tensor([True, True, True, True, True, False]))
    assert eq.tolist() == [True, True, True, True, True, True]  # g2: one survivor
    eq = equal_reward_groups(torch.tensor([1., -1.]), torch.tensor([5, 5]), torch.tensor([True, True]))
    assert eq.tolist() == [False, False]


def test_token_weights():
    assert token_weights([2, 4], "token-mean", 12, 3) == [1 / 12, 1 / 12]
    assert token_weights([2, 4], "seq-mean-token-mean", 12, 2) == [1 / 4, 1 / 8]
    with pytest.raises(ValueError, match="aggregation"):
        token_weights([1], "sum", 1, 1)


def test_papo_loss_value_and_gradient_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5, 0.0], requires_grad=True)
    a = torch.tensor([2.0, 2.0, -1.0, 0.0])
    w = torch.tensor([0.25, 0.25, 0.25, 0.0])  # 3 scored tokens of 3 (last not scored)
    loss, st = policy_loss(logp, a, w)
    assert float(loss.detach()) == pytest.approx(-(2 + 2 - 1) / 4)  # ratio is 1 in value
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, -0.5, 0.25, 0.0])  # -w A
    assert float(st["tokens"]) == 3 and float(st["ratio_sum"]) == pytest.approx(3.0)


def test_clipped_loss_by_hand():  # DAPO's asymmetric clip
    P = PRESETS["dapo"]
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    w = torch.full((4,), 0.25)
    loss, st = policy_loss(logp, a, w, old_logp=old, clip_low=P["clip_low"], clip_high=P["clip_high"])
    # min(r A, clip(r, 0.8, 1.28) A): 1.28 (clipped), -1.5, 0.5, -0.8 (clipped)
    assert float(loss.detach()) == pytest.approx(-0.25 * (1.28 - 1.5 + 0.5 - 0.8))
    loss.backward()
    # d/dlogp of -w r A where unclipped (r = exp(logp)): token 1: 0.25*1.5, token 2: -0.25*0.5
    assert logp.grad.tolist() == pytest.approx([0.0, 0.375, -0.125, 0.0])
    assert int(st["clipped"]) == 2
    assert float(st["ratio_max"]) == pytest.approx(1.5) and float(st["ratio_min"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        policy_loss(logp, a, w, clip_low=0.2)


def test_grpo_preset_is_the_same_function():
    P = PRESETS["grpo"]
    assert P["scale"] == "group" and P["aggregation"] == "seq-mean-token-mean"
    logp = torch.zeros(6, requires_grad=True)
    a = torch.tensor([0.0, 1.0, 1.0, 0.0, -1.0, -1.0])
    m = torch.tensor([0., 1, 1, 0, 1, 1])
    w_seq = token_weights([2, 4], "seq-mean-token-mean", 6, 2)  # only 2 of seq 2's 4 tokens here
    w = torch.tensor([0, w_seq[0], w_seq[0], 0, w_seq[1], w_seq[1]]) * m
    loss, _ = policy_loss(logp, a, w, old_logp=torch.zeros(6), clip_low=0.2, clip_high=0.2)
    assert float(loss.detach()) == pytest.approx(-(0.25 * 2 - 0.125 * 2))


# ------------------------------------------------------------------ on a real (tiny) model

def _toy_batch(seed: int, n: int = 3, vocab: int = 40):
    rng = random.Random(seed)
    items, advs = [], []
    for _ in range(n):
        P, L = rng.randint(2, 5), rng.randint(3, 8)
        ids = [rng.randrange(vocab) for _ in range(P + L)]
        mask = [False] * P + [rng.random() < 0.8 for _ in range(L)]
        items.append((ids, causal_layout(P + L, P), mask))
        advs.append(rng.uniform(-2, 2))
    return items, advs


def _per_token(batch, advs, weight):
    lens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    m = batch.loss_mask.float()
    return (torch.repeat_interleave(torch.tensor(advs), lens) * m,
            torch.full_like(m, weight) * m)


def test_papo_gradient_is_minus_sum_a_grad_logp_over_tokens():
    torch.manual_seed(0)
    model = tiny_model(40, seed=3, layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16)
    items, advs = _toy_batch(1)
    b = pack(items)
    N = b.num_scored
    params = [p for p in model.parameters()]
    lp = token_logprobs(model, b, 1.0)
    a_tok, w_tok = _per_token(b, advs, 1.0 / N)
    loss, _ = policy_loss(lp, a_tok, w_tok)
    got = torch.autograd.grad(loss, params)
    # reference: -(1/N) sum_i A_i sum_t grad log pi(y_it), one token at a time
    want = [torch.zeros_like(p) for p in params]
    lp = token_logprobs(model, b, 1.0)
    for t in b.loss_mask.nonzero()[:, 0].tolist():
        g = torch.autograd.grad(lp[t], params, retain_graph=True)
        for acc, gi in zip(want, g):
            acc.add_(gi, alpha=-float(a_tok[t]) / N)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["papo", "dapo", "grpo"])
def test_update_does_not_depend_on_the_micro_batch_split(preset):
    """The same global batch as 1, 2 or 6 micro-batches: the same step (SGD, fp32)."""
    P = PRESETS[preset]
    base = tiny_model(40, seed=4, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16)
    items, advs = _toy_batch(7, n=6)
    n_tok = [sum(m) for _, _, m in items]
    w = token_weights(n_tok, P["aggregation"], sum(n_tok), len(items))
    olds = [None] * len(items)
    if P["clip_low"] is not None:  # old log-probs a little off, so clipping happens
        with torch.no_grad():
            olds = [token_logprobs(base, pack([it]), 1.0) + 0.3 * torch.randn(len(it[0]))
                    for it in items]
    results = []
    for split in ([list(range(6))], [[0, 1, 2], [3, 4, 5]], [[i] for i in range(6)],
                  [[5, 0], [3], [1, 4, 2]]):
        model = copy.deepcopy(base)
        opt = build_optimizer(model.parameters(), OptimSection(optimizer="sgd", lr=0.5))
        sch = build_scheduler(opt, OptimSection(optimizer="sgd", lr=0.5), 1)

        def loss_fn(k, split=split, model=model):
            idx = split[k]
            b = pack([items[i] for i in idx])
            lp = token_logprobs(model, b, 1.0)
            lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1])
            m = b.loss_mask.float()
            a = torch.repeat_interleave(torch.tensor([advs[i] for i in idx]), lens) * m
            ww = torch.repeat_interleave(torch.tensor([w[i] for i in idx]), lens) * m
            old = torch.cat([olds[i] for i in idx]) if olds[0] is not None else None
            return policy_loss(lp, a, ww, old_logp=old, clip_low=P["clip_low"],
                               clip_high=P["clip_high"])

        st = update(model, opt, sch, len(split), loss_fn, DistContext(), max_grad_norm=0.0)
        results.append((st.loss, st.grad_norm, [p.detach().clone() for p in model.parameters()]))
    for loss, norm, ps in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5, abs=1e-7)
        assert norm == pytest.approx(results[0][1], rel=1e-5)
        for p, q in zip(ps, results[0][2]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(results[0][2], base.parameters()))
