"""Logits processors' results are checked: one that returns something that cannot be sampled
from finishes its own request (finish_reason "abort", finish_detail naming the processor and the
request), the other requests of the batch are untouched, no KV block leaks, the engine serves on."""
from __future__ import annotations

import random

import pytest
import torch

import npr
from npr.bench.forcing import ForcedStructure
from npr.tags import TAGS
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def eng(tok):
    return npr.Engine(tiny_model(len(tok), seed=1), tok, kv_cache_tokens=4096, max_branches=4)


def wider(c, lg):
    return torch.cat([lg, torch.full((100,), 1e9)])


def narrower(c, lg):
    return lg[:-1]


def batched(c, lg):
    return lg[None]


def all_nan(c, lg):
    return torch.full_like(lg, float("nan"))


def one_nan(c, lg):
    out = lg.clone()
    out[3] = float("nan")
    return out


def all_masked(c, lg):
    return torch.full_like(lg, float("-inf"))


def plus_inf(c, lg):
    out = lg.clone()
    out[5] = float("inf")
    return out


def integer(c, lg):
    return lg.long()


def a_list(c, lg):
    return lg.tolist()


def nothing(c, lg):
    return None


BAD = [wider, narrower, batched, all_nan, one_nan, all_masked, plus_inf, integer, a_list, nothing]


def outputs(eng, prompts, params):
    return eng.generate(prompts, sampling_params=params)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("bad", BAD, ids=lambda f: f.__name__)
def test_bad_processor_aborts_its_request_only(eng, bad, temperature):
    good = npr.SamplingParams(temperature=temperature, seed=3, parallel="off", max_new_tokens=8)
    faulty = npr.SamplingParams(temperature=temperature, seed=3, parallel="off", max_new_tokens=8,
                                logits_processors=[bad])
    prompts = ["good one", "the bad one", "good two"]
    ref = outputs(eng, [prompts[0], prompts[2]], good)
    outs = outputs(eng, prompts, [good, faulty, good])
    o = outs[1].outputs[0]
    assert o.finish_reason == "abort" and not o.structure_valid
    assert bad.__name__ in o.finish_detail and f"request {outs[1].request_id}" in o.finish_detail
    assert o.token_ids == []  # the failed step added no token
    for got, want in zip([outs[0], outs[2]], ref):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].finish_reason == "length"
    assert eng.pool_stats()["used_blocks"] == 0 and not eng.has_unfinished_requests()
    again = outputs(eng, [prompts[0], prompts[2]], good)
    assert [a.outputs[0].token_ids for a in again] == [r.outputs[0].token_ids for r in ref]


@pytest.mark.parametrize("max_new", [1, 6])
def test_processor_that_fails_later_keeps_the_tokens_before(eng, max_new):
    """The issue's probe: a result longer than V, after some good steps and with one step
    only; the tokens sampled before the failure stay, none is added after it."""
    calls = []

    def late(c, lg):
        calls.append(1)
        return wider(c, lg) if len(calls) > 3 else lg

    sp = npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=max_new,
                            logits_processors=[late], n=1)
    o = outputs(eng, ["late failure"], sp)[0].outputs[0]
    if max_new <= 3:
        assert o.finish_reason == "length" and len(o.token_ids) == max_new
    else:
        assert o.finish_reason == "abort" and len(o.token_ids) == 3
        V = eng.model.config.vocab_size
        assert "late" in o.finish_detail and f"shape [{V + 100}], expected [{V}]" in o.finish_detail
        assert len(o.logprobs) == 3 and all(lp is not None for lp in o.logprobs)
    assert eng.pool_stats()["used_blocks"] == 0


def test_all_samples_of_the_request_are_aborted(eng):
    sp = npr.SamplingParams(temperature=1.0, seed=1, n=3, parallel="off", max_new_tokens=5,
                            logits_processors=[all_nan])
    out = outputs(eng, ["three samples"], sp)[0]
    assert [o.finish_reason for o in out.outputs] == ["abort"] * 3
    assert all("all_nan" in o.finish_detail for o in out.outputs)
    assert eng.pool_stats()["used_blocks"] == 0


def test_processor_failing_inside_parallel_steps(eng, tok):
    """A processor that fails inside a forked block (rows of several branches): the request is
    aborted, its branch tables are freed, other requests complete."""
    v = tok.get_vocab()
    tag_ids = {t: v[t] for t in TAGS}
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
    ids = tok.encode("fork", add_special_tokens=False)
    rng = random.Random(0)
    lens = {(b, k): rng.randint(2, 6) for b in range(2) for k in range(1, 9)}
    forcer = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id,
                             prompt_len=len(ids), branches=[3, 2],
                             step_tokens=lambda b, k: lens[(b, k)], plan_tokens=1,
                             prefix_tokens=0, takeaway_tokens=1, final_tokens=1)

    def in_steps_bad(c, lg):
        out = forcer(c, lg)
        tail = c[len(ids):]
        inside = tail.count(tag_ids["<step>"]) > tail.count(tag_ids["</step>"])
        return out[:-1] if inside and tail.count(tag_ids["<step>"]) >= 2 else out

    good = npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[forcer])
    ref = eng.generate(input_ids=[ids], sampling_params=good)[0].outputs[0]
    assert ref.stats["forks"] >= 1
    bad = npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[in_steps_bad])
    outs = eng.generate(input_ids=[ids, ids], sampling_params=[bad, good])
    assert outs[0].outputs[0].finish_reason == "abort"
    assert "in_steps_bad" in outs[0].outputs[0].finish_detail
    assert outs[1].outputs[0].token_ids == ref.token_ids
    assert eng.pool_stats()["used_blocks"] == 0


def test_processor_exception_names_processor_and_request(eng):
    """An exception raised inside a processor propagates (the caller's bug is not swallowed),
    with a note naming the processor and the request; the engine serves on."""
    def boom(c, lg):
        raise RuntimeError("processor failed")

    with pytest.raises(RuntimeError, match="processor failed") as e:
        outputs(eng, ["x"], npr.SamplingParams(parallel="off", logits_processors=[boom]))
    notes = " ".join(getattr(e.value, "__notes__", []))
    assert "boom" in notes and "request" in notes
    assert eng.pool_stats()["used_blocks"] == 0
    out = outputs(eng, ["x"], npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=3))
    assert out[0].outputs[0].finish_reason == "length"
