"""npr.integrations.verl.NPRRollout: the DataProto-shaped dict contract (verl itself needs Ray,
vLLM and a GPU; the DataProto round trip runs only where verl is importable)."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

import npr
from npr import format as fmt
from npr.integrations.layout import parallel_logprobs
from npr.integrations.verl import NPRRollout
from test_integrations_helpers import hf_folder, random_forcer

VERL_KEYS = ("prompts", "responses", "response_mask", "input_ids", "attention_mask",
             "position_ids", "rollout_log_probs")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(str(tmp_path_factory.mktemp("tiny_llama_verl")), seed=11)


@pytest.fixture()
def engine(folder):
    return npr.Engine(folder)


def forced(engine, seed=0):
    rng = random.Random(seed)
    return lambda ids: [random_forcer(engine.tokenizer, engine.tag_ids, len(ids), rng)]


def left_padded(rows, pad=0):
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        am[b, P - len(r):] = 1
    return ids, am


def test_generate_sequences_dict_contract(engine):
    tok = engine.tokenizer
    prompts = [tok.encode(s, add_special_tokens=False) for s in ("abc", "hello wor", "7")]
    ids, am = left_padded(prompts)
    roll = NPRRollout(engine, response_length=700, pad_token_id=0, n=2,
                      logits_processors=forced(engine))
    out = roll.generate_sequences({"batch": {"input_ids": ids, "attention_mask": am},
                                   "non_tensor_batch": {"uid": ["u0", "u1", "u2"]},
                                   "meta_info": {"global_steps": 3}})
    b, non, meta = out["batch"], out["non_tensor_batch"], out["meta_info"]
    for k in VERL_KEYS + ("step_ids", "block_ids", "structure_valid"):
        assert k in b, k
    B, P, R = 6, ids.shape[1], 700
    assert b["prompts"].shape == (B, P) and b["responses"].shape == (B, R)
    assert b["input_ids"].shape == (B, P + R) == b["attention_mask"].shape == b["position_ids"].shape
    assert torch.equal(b["prompts"], ids.repeat_interleave(2, 0))  # verl's left-padded prompts
    assert torch.equal(b["input_ids"], torch.cat([b["prompts"], b["responses"]], 1))
    assert list(non["uid"]) == ["u0", "u0", "u1", "u1", "u2", "u2"]
    assert meta["global_steps"] == 3 and meta["npr_logprobs_mode"] == "processed"
    assert bool(b["structure_valid"].all())
    for k in range(B):
        real = b["attention_mask"][k].bool()
        p = prompts[k // 2]
        full = b["input_ids"][k, real].tolist()
        assert full[:len(p)] == p
        lay = fmt.layout(full, engine.tag_ids, prompt_len=len(p))
        assert torch.equal(b["position_ids"][k, real], lay.position_ids)  # spec §2, not cumsum
        assert torch.equal(b["step_ids"][k, real], lay.step_ids)
        assert torch.equal(b["block_ids"][k, real], lay.block_ids)
        resp = real[P:]
        assert bool(resp[: int(resp.sum())].all())  # responses right-padded
        text = non["npr_text"][k]
        assert "<step>" in text and non["finish_reason"][k] == "stop"
        injected = b["response_mask"][k][resp] == 0
        assert int(injected.sum()) == text.count("<step>") * 3 + text.count("<takeaway>")
    # The actor-side call (what an overridden _forward_micro_batch makes): the engine's numbers.
    lp = parallel_logprobs(engine.model, b)
    assert not bool(lp[b["response_mask"] == 0].any()) and bool(lp[b["response_mask"] == 1].all())
    # processed (forced) log-probs are >= the model's: forcing only removes probability mass
    assert bool((b["rollout_log_probs"] >= lp - 1e-4).all())


def test_raw_logprobs_mode(engine):
    tok = engine.tokenizer
    ids, am = left_padded([tok.encode("abcd", add_special_tokens=False)])
    roll = NPRRollout(engine, response_length=600, pad_token_id=0, logits_processors=forced(engine),
                      logprobs_mode="raw")
    out = roll.generate_sequences({"input_ids": ids, "attention_mask": am})
    b = out["batch"]
    assert torch.allclose(b["rollout_log_probs"], parallel_logprobs(engine.model, b, 1.0))
    assert out["meta_info"]["npr_logprobs_mode"] == "raw"


def test_plain_rollouts_and_greedy(engine):
    tok = engine.tokenizer
    ids, am = left_padded([tok.encode(s, add_special_tokens=False) for s in ("ab", "xyz")])
    roll = NPRRollout(engine, response_length=32, pad_token_id=0, parallel="off")
    a = roll.generate_sequences({"batch": {"input_ids": ids, "attention_mask": am},
                                 "meta_info": {"do_sample": False}})["batch"]
    c = roll.generate_sequences({"batch": {"input_ids": ids, "attention_mask": am},
                                 "meta_info": {"do_sample": False}})["batch"]
    assert torch.equal(a["responses"], c["responses"])
    real = a["attention_mask"].bool()
    want = (a["attention_mask"].cumsum(1) - 1).clamp(min=0)  # plain decoding: verl's positions
    assert torch.equal(a["position_ids"][real], want[real])
    assert torch.allclose(a["rollout_log_probs"], parallel_logprobs(engine.model, a), atol=1e-4)


def test_base_rollout_methods(engine):
    tok = engine.tokenizer
    ids, am = left_padded([tok.encode("abc", add_special_tokens=False)])
    roll = NPRRollout(engine, response_length=16, pad_token_id=0, parallel="off")
    asyncio.run(roll.release())
    with pytest.raises(RuntimeError, match="sleeping"):
        roll.generate_sequences({"input_ids": ids, "attention_mask": am})
    asyncio.run(roll.resume(["weights", "kv_cache"]))
    greedy = {"batch": {"input_ids": ids, "attention_mask": am}, "meta_info": {"do_sample": False}}
    before = roll.generate_sequences(greedy)["batch"]["rollout_log_probs"]
    new = {n: t + 0.05 * torch.randn_like(t) for n, t in engine.model.hf_weight_map().items()}
    asyncio.run(roll.update_weights(iter(new.items())))  # a generator, as verl passes
    assert torch.equal(engine.model.hf_weight_map()["model.norm.weight"], new["model.norm.weight"])
    after = roll.generate_sequences(greedy)["batch"]["rollout_log_probs"]
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError, match="not parameters"):
        asyncio.run(roll.update_weights([("transformer.wte.weight", torch.zeros(3, 3))]))
    with pytest.raises(ValueError, match="unknown tags"):
        asyncio.run(roll.resume(["everything"]))
    roll.update_weight("model.norm.weight", torch.ones(64))  # OpenRLHF pushes one at a time
    assert bool((engine.model.hf_weight_map()["model.norm.weight"] == 1).all())
    roll.reset_prefix_cache()
    roll.sleep()
    roll.wake_up()
    assert engine.pool_stats()["used_blocks"] == 0


def test_bad_prompts(engine):
    tok = engine.tokenizer
    roll = NPRRollout(engine, response_length=16, pad_token_id=0, parallel="off")
    ids = torch.tensor([[5, 0, 6, 7]])
    with pytest.raises(ValueError, match="mismatched pad settings"):
        roll.generate_sequences({"input_ids": ids, "attention_mask": (ids != 0).long()})
    with pytest.raises(ValueError, match="no real token"):
        roll.generate_sequences({"input_ids": ids, "attention_mask": torch.zeros_like(ids)})
    with pytest.raises(KeyError, match="attention_mask"):
        roll.generate_sequences({"input_ids": ids})
    with pytest.raises(TypeError, match="DataProto or a dict"):
        roll.generate_sequences([ids])
    with pytest.raises(ValueError, match="logprobs_mode"):
        NPRRollout(engine, response_length=16, logprobs_mode="logits")
    # right-padded prompts are read correctly and returned left-padded (verl's convention)
    r = [tok.encode("ab", add_special_tokens=False), tok.encode("abcd", add_special_tokens=False)]
    right = torch.zeros(2, 4, dtype=torch.long)
    right[0, :2], right[1] = torch.tensor(r[0]), torch.tensor(r[1])
    out = roll.generate_sequences({"input_ids": right, "attention_mask": (right != 0).long()})
    assert torch.equal(out["batch"]["prompts"], left_padded(r)[0])


def test_verl_dataproto_round_trip(engine):
    verl = pytest.importorskip("verl", reason="verl is not installed (it needs Ray; its pins "
                                              "conflict with transformers 5.24): the dict "
                                              "contract above is what runs here")
    import numpy as np
    from verl.workers.rollout.base import BaseRollout

    class Rollout(NPRRollout, BaseRollout):
        pass

    tok = engine.tokenizer
    ids, am = left_padded([tok.encode(s, add_special_tokens=False) for s in ("ab", "xyz")])
    data = verl.DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": am},
                                    non_tensors={"uid": np.array(["a", "b"], dtype=object)},
                                    meta_info={"global_steps": 1})
    roll = Rollout(engine, response_length=600, pad_token_id=0, n=2,
                   logits_processors=forced(engine))
    out = roll.generate_sequences(data)
    assert isinstance(out, verl.DataProto) and len(out) == 4
    for k in VERL_KEYS + ("step_ids", "block_ids"):
        assert k in out.batch.keys()
    assert list(out.non_tensor_batch["uid"]) == ["a", "a", "b", "b"]
    asyncio.run(roll.release())
    asyncio.run(roll.resume(["kv_cache"]))
