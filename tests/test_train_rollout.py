"""Which tokens learn, trainer == engine log-probs, and strict on-policy after an update.

The engine's log-probs are those of the distribution it sampled from. A ForcedStructure
processor (used so that a tiny random model forks) changes that distribution: where it forces a
token the engine's log-prob is 0; where the model chooses, the tags and EOS are masked out, so
the engine's log-prob is the model's log-prob renormalised over the allowed tokens:

    engine_lp(y_i) = trainer_lp(y_i) - log sum_{v allowed} softmax(logits_{i-1})_v

The test compares on the tokens the model chose, under the same processing: trainer_lp is
npr.train.logprobs.token_logprobs (the trainer's forward), the renormaliser comes from the dense
reference forward. A wrong predecessor row, position or mask changes trainer_lp and fails it.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

from npr.bench.forcing import ForcedStructure
from npr.tags import TAGS
from npr.train.config import RLConfig, load_config
from npr.train.data import Prompt, ShuffledPrompts
from npr.train.logprobs import token_logprobs
from npr.train.rewards import Scored
from npr.train.rl import RLTrainer
from npr.train.rollout import engine_logprobs, loss_mask, pack_rollouts
from tiny import tiny_model, tiny_tokenizer

INJECTED_TAGS = ("<step>", "<takeaway>")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def forcers(tok, max_n=8, blocks=3):
    v = tok.get_vocab()
    tag_ids = {t: v[t] for t in TAGS}
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]

    def make(prompt, ids):
        rng = random.Random(len(ids) * 31 + sum(ids))
        branches = [rng.randint(1, max_n) for _ in range(rng.randint(1, blocks))]
        branches[0] = max_n  # one block at full width
        lens = {(b, k): rng.randint(1, 5) for b in range(len(branches)) for k in range(1, 9)}
        return [ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id,
                                prompt_len=len(ids), branches=branches,
                                step_tokens=lambda b, k: lens[(b, k)], plan_tokens=1,
                                prefix_tokens=0, takeaway_tokens=2, final_tokens=2)]
    return make, tag_ids


class RandomReward:
    def __call__(self, texts, golds):
        return [Scored(reward=float(hash(t) % 3 - 1), correct=False, format_ok=True) for t in texts]


def trainer_for(tok, tmp_path, model, **over):
    make, _ = forcers(tok)
    o = {"train.out_dir": f"'{tmp_path}'", "train.resume": "false", "train.progress": "false",
         "train.plot": "false", "rollout.prompts_per_step": "3", "rollout.samples_per_prompt": "3",
         "rollout.max_new_tokens": "400", "optim.optimizer": "'sgd'", "optim.lr": "2.0",
         "optim.max_grad_norm": "0", **over}
    cfg = load_config(RLConfig, overrides=[f"{k}={v}" for k, v in o.items()])
    prompts = ShuffledPrompts([Prompt(answer="1", text=f"q{i} abc"[: 3 + i]) for i in range(6)])
    return RLTrainer(cfg, model, tok, RandomReward(), prompts, processors=make)


def compare_with_engine(trainer, rollouts, tag_ids, tok):
    """Max |engine - trainer| over the tokens the model chose; also the number compared."""
    model = trainer.model
    b = pack_rollouts(rollouts)
    with torch.no_grad():
        lp = token_logprobs(model, b, 1.0)
        logits = model(b.input_ids[None], position_ids=b.position_ids[None],
                       attention_mask=b.dense_mask()[None])[0].float()
    eng = engine_logprobs(rollouts)
    banned = torch.tensor(sorted(set(tag_ids.values()) | {tok.eos_token_id}))
    make, _ = forcers(tok)
    worst, n = 0.0, 0
    mask = b.dense_mask()
    for r, s in zip(rollouts, b.cu_seqlens[:-1].tolist()):
        f = make(None, r.prompt_ids)[0]
        ids = r.prompt_ids + r.token_ids
        for j in range(len(r.prompt_ids), len(ids)):
            i = s + j
            if not b.loss_mask[i]:
                continue
            visible = [ids[k] for k in range(j) if mask[i, s + k]]
            if f.next_token(visible) is not None:  # forced: the engine's log-prob is 0
                assert float(eng[i]) == 0.0
                continue
            lsm = torch.log_softmax(logits[i - 1], -1)
            allowed = torch.ones_like(lsm, dtype=torch.bool)
            allowed[banned] = False
            renorm = torch.logsumexp(lsm[allowed], 0)
            worst = max(worst, abs(float(lp[i] - renorm) - float(eng[i])))
            n += 1
    return worst, n


def test_scored_tokens_are_exactly_the_sampled_ones(tok, tmp_path):
    model = tiny_model(len(tok), seed=2)
    t = trainer_for(tok, tmp_path, model)
    _, tag_ids = forcers(tok)
    rollouts, _, _ = t.generate([0, 1])
    assert rollouts and all(r.layout is not None for r in rollouts)
    id2tag = {v: k for k, v in tag_ids.items()}
    seen_tags = set()
    for r in rollouts:
        m = loss_mask(r)
        P = len(r.prompt_ids)
        assert not any(m[:P])  # the prompt never learns
        for j, (tokid, inj) in enumerate(zip(r.token_ids, r.injected)):
            tag = id2tag.get(tokid)
            assert m[P + j] == (not inj)
            if tag in INJECTED_TAGS:
                assert inj and not m[P + j]
            elif tag is not None:  # tags the model wrote: </plan>, </guideline>, </step>, ...
                assert not inj and m[P + j]
                seen_tags.add(tag)
        # the labels after an injected <step> are injected too
        for j, tokid in enumerate(r.token_ids):
            if id2tag.get(tokid) == "<step>":
                assert r.injected[j + 1]
    assert {"</plan>", "</guideline>", "</step>", "</takeaway>", "<guideline>", "<plan>"} <= seen_tags
    b = pack_rollouts(rollouts)
    dm = b.dense_mask()
    idx = b.loss_mask.nonzero()[:, 0]
    # each scored token is predicted from its predecessor in its own row, which it sees
    assert bool(dm[idx, idx - 1].all())


def test_trainer_logprobs_equal_engine_logprobs_and_stay_on_policy(tok, tmp_path):
    model = tiny_model(len(tok), seed=5)
    t = trainer_for(tok, tmp_path, model)  # decode_weights "auto": packed decode copies
    _, tag_ids = forcers(tok)
    rollouts, _, _ = t.generate([0, 1, 2])
    assert max(max(r.layout.branches) for r in rollouts) == 8
    assert all(r.layout.num_blocks >= 1 for r in rollouts)
    worst, n = compare_with_engine(t, rollouts, tag_ids, tok)
    assert n > 100 and worst < 1e-4, (worst, n)

    before = copy.deepcopy(model)
    m = t.train_step()  # SGD, lr 2: the weights move a lot
    assert m["grad_norm"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    new, _, _ = t.generate([3, 4, 5])
    worst, n = compare_with_engine(t, new, tag_ids, tok)
    assert n > 100 and worst < 1e-4, (worst, n)
    # ...and the old weights would not explain the new rollouts
    t_old = copy.copy(t)
    t_old.model = before
    stale, _ = compare_with_engine(t_old, new, tag_ids, tok)
    assert stale > 1e-2, stale


def test_gradients_do_not_depend_on_packed_decode_copies(tok):
    """The engine packs decode copies of the shared model; a training forward of a few tokens
    must still differentiate the parameters themselves."""
    from npr.train.logprobs import pack
    from npr.train.rollout import causal_layout

    a = tiny_model(len(tok), seed=6)
    b = copy.deepcopy(a)
    b.pack_weights(torch.float32)
    batch = pack([([3, 4, 5, 6], causal_layout(4, 1), [False, True, True, True])])
    ga = torch.autograd.grad(token_logprobs(a, batch).sum(), list(a.parameters()))
    gb = torch.autograd.grad(token_logprobs(b, batch).sum(), list(b.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    assert any(float(g.abs().sum()) > 0 for g in gb)


class _Nests:
    """A forcer that opens a <guideline> inside a step: invalid structure."""

    def __init__(self, f, tag_ids):
        self.f, self.t = f, tag_ids

    def __call__(self, visible, logits):
        ids = visible[self.f.prompt_len:]
        if ids.count(self.t["<step>"]) > ids.count(self.t["</step>"]):
            out = torch.full_like(logits, float("-inf"))
            out[self.t["<guideline>"]] = 0.0
            return out
        return self.f(visible, logits)


def test_invalid_structures_are_dropped_not_trained(tok, tmp_path):
    model = tiny_model(len(tok), seed=7)
    t = trainer_for(tok, tmp_path, model)
    make, tag_ids = forcers(tok)
    t.processors = lambda p, ids: [_Nests(make(p, ids)[0], tag_ids)]
    rollouts, _, _ = t.generate([0])
    assert all(r.layout is None and not r.structure_valid for r in rollouts)
    with pytest.raises(ValueError, match="no layout"):
        pack_rollouts(rollouts)
    with pytest.raises(ValueError, match="no trajectories"):
        pack_rollouts([])
    before = [p.detach().clone() for p in model.parameters()]
    m = t.train_step()  # every rollout dropped: no NaN, no update, the step still completes
    assert m["valid_rate"] == 0.0 and m["loss"] == 0.0 and m["grad_norm"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
