"""One meaning of critical_path_tokens (spec §3): the response's tokens on its critical path
(the prefix, the longest step of each block, the takeaways and what follows; the prompt is not
counted). Layout.critical_path_tokens and CompletionOutput.stats["critical_path_tokens"] agree
with each other and with a count from the block structure; ideal speedup = response tokens /
critical-path tokens."""
from __future__ import annotations

import random

import pytest
import torch

import npr
from npr import format as fmt
from npr.bench.forcing import ForcedStructure
from npr.tags import TAGS
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def eng(tok):
    return npr.Engine(tiny_model(len(tok), seed=5), tok, kv_cache_tokens=8192)


def forcer(tok, prompt_len, branches, seed):
    v = tok.get_vocab()
    tag_ids = {t: v[t] for t in TAGS}
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
    rng = random.Random(seed)
    lens = {(b, k): rng.randint(1, 9) for b in range(len(branches)) for k in range(1, 9)}
    return tag_ids, ForcedStructure(
        tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=prompt_len,
        branches=branches, step_tokens=lambda b, k: lens[(b, k)], plan_tokens=2,
        prefix_tokens=0, takeaway_tokens=2, final_tokens=3)


def structural_count(lay: fmt.Layout) -> int:
    """Response tokens minus, per block, every step but the longest (spec §3's definition,
    counted from the block structure, not from positions)."""
    return lay.response_tokens - sum(sum(ls) - max(ls) for ls in lay.step_lengths)


@pytest.mark.parametrize("mode", ["native", "sequential"])
@pytest.mark.parametrize("prompt,branches", [
    ("what is 2+2", [2]), ("a", [1, 3]), ("a much longer prompt than the others", [8]),
    ("q", [4, 2, 5])])
def test_engine_and_layout_agree_on_critical_path(eng, tok, mode, prompt, branches):
    ids = tok.encode(prompt, add_special_tokens=False)
    tag_ids, f = forcer(tok, len(ids), branches, seed=len(ids))
    sp = npr.SamplingParams(temperature=0, max_new_tokens=500, parallel=mode,
                            logits_processors=[f])
    o = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0]
    assert o.finish_reason == "stop" and o.structure_valid
    lay = fmt.layout(ids + o.token_ids, tag_ids, prompt_len=len(ids))
    crit = o.stats["critical_path_tokens"]
    assert crit == lay.critical_path_tokens == structural_count(lay)
    assert lay.response_tokens == len(o.token_ids)
    assert lay.ideal_speedup == pytest.approx(len(o.token_ids) / crit)
    assert lay.ideal_speedup > 1.0 or branches == [1]


def test_critical_path_does_not_count_the_prompt(tok):
    """The same response after prompts of different lengths has one critical path length."""
    tag_ids = {t: tok.get_vocab()[t] for t in TAGS}
    G, g, P, p, S, s, T, t = (tag_ids[x] for x in fmt.TAGS)
    resp = [G, P, 60, p, P, 61, 62, p, g, S, 70, 71, s, S, 72, s, T, 80, t, 90, 91]
    # 9 tokens up to </guideline>, steps of 4 and 3 (longest 4), 3 takeaway tokens, 2 final
    want = 9 + 4 + 3 + 2
    for prompt in ([], [50], [50, 51, 52, 53, 54, 55, 56]):
        lay = fmt.layout(prompt + resp, tag_ids, prompt_len=len(prompt))
        assert lay.critical_path_tokens == want
        assert lay.ideal_speedup == pytest.approx(len(resp) / want)


def test_plain_decoding_critical_path_is_every_token(eng, tok):
    ids = tok.encode("plain", add_special_tokens=False)
    o = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(
        temperature=0, parallel="off", max_new_tokens=9))[0].outputs[0]
    assert o.stats["critical_path_tokens"] == len(o.token_ids)


def test_critical_path_tokens_function():
    assert fmt.critical_path_tokens([], 5) == 0
    assert fmt.critical_path_tokens([5, 6, 7, 6, 8], 5) == 4
    assert fmt.critical_path_tokens(torch.tensor([3, 4, 5]), 3) == 3
