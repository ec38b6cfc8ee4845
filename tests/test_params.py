"""Parameter edges: temperatures that would overflow, token ids that are not ids (floats,
bools, negative, beyond int32 or the vocabulary), for SamplingParams and prompts alike. Each is
refused with a message naming the field before anything is queued, or (tiny temperatures)
treated as vLLM does."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import npr
from npr.engine.sampling_params import MIN_TEMPERATURE
from tiny import tiny_model

V = 53


@pytest.fixture(scope="module")
def eng():
    return npr.Engine(tiny_model(V, seed=2), None, kv_cache_tokens=1024)


PROMPT = [3, 14, 15, 9, 26]


@pytest.mark.parametrize("t", [1e-45, 1e-30, 1e-10, 5e-3])
def test_tiny_temperature_is_raised_to_the_minimum(eng, t):
    with pytest.warns(UserWarning, match="temperature"):
        sp = npr.SamplingParams(temperature=t, seed=7, parallel="off", max_new_tokens=6)
    assert sp.temperature == MIN_TEMPERATURE and not sp.greedy
    out = eng.generate(input_ids=[PROMPT], sampling_params=sp)[0].outputs[0]
    assert all(math.isfinite(lp) for lp in out.logprobs) and len(out.token_ids) == 6
    ref = eng.generate(input_ids=[PROMPT], sampling_params=npr.SamplingParams(
        temperature=MIN_TEMPERATURE, seed=7, parallel="off", max_new_tokens=6))[0].outputs[0]
    assert out.token_ids == ref.token_ids


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1e-9),
    ("temperature", True), ("temperature", "0.5"), ("top_p", float("nan")),
    ("top_k", True), ("top_k", 2.0), ("n", True), ("max_new_tokens", 3.0),
    ("max_new_tokens", 2**40), ("seed", 1.5), ("step_repetition_penalty", float("inf")),
    ("stop_token_ids", [2.0]), ("stop_token_ids", [2**40]), ("stop_token_ids", [-1]),
    ("stop_token_ids", [True]), ("stop_token_ids", "2"), ("stop_token_ids", 2),
])
def test_bad_sampling_params_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams: {field}"):
        npr.SamplingParams(**{field: value})


def test_integer_like_values_are_accepted_as_ints():
    sp = npr.SamplingParams(n=np.int64(2), max_new_tokens=torch.tensor(5), top_k=np.int32(4),
                            stop_token_ids=[np.int64(7), torch.tensor(9)], seed=np.uint8(3))
    assert (sp.n, sp.max_new_tokens, sp.top_k, sp.stop_token_ids, sp.seed) == (2, 5, 4, [7, 9], 3)
    assert all(type(v) is int for v in (sp.n, sp.max_new_tokens, sp.top_k, sp.seed,
                                        *sp.stop_token_ids))


@pytest.mark.parametrize("ids,exc,match", [
    ([3, 2.5], TypeError, r"{W}\[1\] must be an int.*float"),
    ([3, 4.0], TypeError, r"{W}\[1\] must be an int.*float"),
    ([True, 3], TypeError, r"{W}\[0\] must be an int.*bool"),
    (["5"], TypeError, r"{W}\[0\] must be an int.*str"),
    ([3, -1], ValueError, r"{W}\[1\] = -1"),
    ([2**40], ValueError, r"{W}\[0\] = 1099511627776"),
    ([3, V], ValueError, "outside the vocabulary"),
    (torch.tensor([3.0, 4.0]), TypeError, r"{W}\[0\] must be an int.*Tensor"),
    ("abc", TypeError, r"{W} must be a sequence of token ids"),
])
def test_bad_prompt_token_ids_are_refused_before_queueing(eng, ids, exc, match):
    sp = npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=3)
    with pytest.raises(exc, match=match.replace("{W}", r"input_ids\[1\]")):
        eng.generate(input_ids=[PROMPT, ids], sampling_params=sp)  # the second prompt is bad
    with pytest.raises(exc, match=match.replace("{W}", "input_ids")):
        eng.add_request(None, sp, input_ids=ids)
    assert not eng.has_unfinished_requests() and eng.pool_stats()["used_blocks"] == 0


def test_flat_input_ids_and_non_string_prompts_get_clear_errors(eng):
    with pytest.raises(TypeError, match="flat list of ints"):
        eng.generate(input_ids=PROMPT)
    with pytest.raises(TypeError, match="prompts must be strings"):
        eng.generate([PROMPT])


def test_stop_token_id_outside_the_vocabulary_is_refused(eng):
    with pytest.raises(ValueError, match=f"stop token id {V + 5} is outside the vocabulary"):
        eng.generate(input_ids=[PROMPT], sampling_params=npr.SamplingParams(
            stop_token_ids=[V + 5], parallel="off"))
    assert not eng.has_unfinished_requests()


def test_integer_like_prompt_ids_give_the_same_output(eng):
    sp = npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=5,
                            stop_token_ids=[np.int64(V - 1)])
    want = eng.generate(input_ids=[PROMPT], sampling_params=sp)[0].outputs[0].token_ids
    for ids in (torch.tensor(PROMPT), np.array(PROMPT, dtype=np.int32), tuple(PROMPT)):
        out = eng.generate(input_ids=[ids], sampling_params=sp)[0]
        assert out.outputs[0].token_ids == want and out.prompt_token_ids == PROMPT
