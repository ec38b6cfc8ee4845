"""npr.integrations.layout against npr.format.layout and the engine's own log-probs, over random
forced structures (several blocks, up to 8 branches, ragged prompts and steps, left/right
padding); the transformers 4-D mask path against the npr path; bad input."""
from __future__ import annotations

import copy
import random

import pytest
import torch

import npr
from npr import format as fmt
from npr.engine.outputs import derive_block_ids, fork_ids
from npr.integrations.layout import (parallel_attention_mask, parallel_logprobs, record_layout,
                                     to_batch)
from npr.integrations.weights import sync_weights
from test_integrations_helpers import RawRecorder, hf_folder, random_forcer
from tiny import CHARS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(str(tmp_path_factory.mktemp("tiny_llama")), seed=3)


@pytest.fixture(scope="module")
def engine(folder):
    return npr.Engine(folder)


@pytest.fixture(scope="module")
def rollouts(engine):
    """Engine outputs of random forced structures + the raw log-prob rows the engine used."""
    tok, rng = engine.tokenizer, random.Random(0)
    prompts, params, recorders = [], [], []
    for r in range(6):
        ids = tok.encode("".join(rng.choice(CHARS) for _ in range(rng.randint(1, 12))),
                         add_special_tokens=False)
        widest = [8, 1, 3] if r == 0 else None  # the widest fork the engine allows
        rec = RawRecorder(random_forcer(tok, engine.tag_ids, len(ids), rng, branches=widest))
        prompts.append(ids)
        recorders.append(rec)
        params.append(npr.SamplingParams(temperature=1.0, max_new_tokens=1500, n=2,
                                         logits_processors=[rec], seed=r))
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert all(c.structure_valid and c.finish_reason == "stop" for o in outs for c in o.outputs)
    assert max(n for o in outs for c in o.outputs
               for n in fmt.layout(list(o.prompt_token_ids) + c.token_ids, engine.tag_ids,
                                   prompt_len=len(o.prompt_token_ids)).branches) == 8
    return outs, recorders


def rows(outs):
    return [(r, o, c) for r, o in enumerate(outs) for c in o.outputs]


@pytest.mark.parametrize("prompt_padding,response_padding", [("left", "right"), ("right", "right"),
                                                             ("left", "left")])
def test_to_batch_matches_format_layout(engine, rollouts, prompt_padding, response_padding):
    outs, _ = rollouts
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, prompt_padding=prompt_padding,
                 response_padding=response_padding)
    P, C = b["prompts"].shape[1], b["responses"].shape[1]
    assert b["input_ids"].shape == (12, P + C)
    assert torch.equal(b["input_ids"], torch.cat([b["prompts"], b["responses"]], 1))
    for k, (r, o, c) in enumerate(rows(outs)):
        full = list(o.prompt_token_ids) + c.token_ids
        lay = fmt.layout(full, engine.tag_ids, prompt_len=len(o.prompt_token_ids))
        real = b["attention_mask"][k].bool()
        assert b["input_ids"][k, real].tolist() == full
        assert torch.equal(b["position_ids"][k, real], lay.position_ids)
        assert torch.equal(b["step_ids"][k, real], lay.step_ids)
        assert torch.equal(b["block_ids"][k, real], lay.block_ids)
        assert derive_block_ids(c.token_ids, c.branch_ids, engine.tag_ids) == \
            lay.block_ids[len(o.prompt_token_ids):].tolist()
        assert bool((b["position_ids"][k, ~real] == 0).all())
        resp_real = real[P:]
        assert b["response_mask"][k, resp_real].tolist() == [int(not j) for j in c.injected]
        assert not bool(b["response_mask"][k, ~resp_real].any())
        lp = b["rollout_log_probs"][k, resp_real]
        want = torch.tensor([0.0 if v is None else v for v in c.logprobs])
        assert torch.allclose(lp, want)
        assert b["row_index"][k].tolist() == [r, c.index]
        # one side padded, the other flush
        cols = real.nonzero()[:, 0]
        pcols, rcols = cols[cols < P], cols[cols >= P]
        assert (pcols[0] == P - len(o.prompt_token_ids)) if prompt_padding == "left" else pcols[0] == 0
        assert (rcols[-1] == P + C - 1) if response_padding == "left" else rcols[0] == P
    assert bool(b["structure_valid"].all())


def test_record_layout_equals_format_layout(engine, rollouts):
    outs, _ = rollouts
    for _, o, c in rows(outs):
        full = list(o.prompt_token_ids) + c.token_ids
        want = fmt.layout(full, engine.tag_ids, prompt_len=len(o.prompt_token_ids))
        got = record_layout(len(o.prompt_token_ids), c.position_ids, c.branch_ids,
                            derive_block_ids(c.token_ids, c.branch_ids, engine.tag_ids))
        for f in ("position_ids", "step_ids", "block_ids", "hole_start", "hole_end"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert got.step_lengths == want.step_lengths
        assert got.critical_path_tokens == want.critical_path_tokens
        assert max(fork_ids(c.branch_ids)) == want.num_blocks


@pytest.mark.parametrize("prompt_padding", ["left", "right"])
def test_parallel_attention_mask(engine, rollouts, prompt_padding):
    outs, _ = rollouts
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, prompt_padding=prompt_padding)
    m = parallel_attention_mask(b)
    add = parallel_attention_mask(b, dtype=torch.float32)
    L = b["input_ids"].shape[1]
    assert m.shape == (12, 1, L, L) and m.dtype == torch.bool
    assert torch.equal(add == 0, m) and bool((add[~m] == torch.finfo(torch.float32).min).all())
    for k, (_, o, c) in enumerate(rows(outs)):
        real = b["attention_mask"][k].bool()
        lay = fmt.layout(list(o.prompt_token_ids) + c.token_ids, engine.tag_ids,
                         prompt_len=len(o.prompt_token_ids))
        assert torch.equal(m[k, 0][real][:, real], lay.mask())
        assert not bool(m[k, 0][real][:, ~real].any())          # nobody sees padding
        pads = (~real).nonzero()[:, 0]
        assert torch.equal(m[k, 0, pads].sum(-1), torch.ones(len(pads), dtype=torch.long))


def engine_raw_and_processed(outs, recorders, tag_ids, temperature=1.0):
    """Per row: the engine's decode-time raw log-probs at `temperature` (model only) and the
    processed ones (through its forcer), at each sampled token."""
    res = []
    for r, o, c in rows(outs):
        rec = recorders[r]
        full = list(o.prompt_token_ids) + c.token_ids
        mask = fmt.layout(full, tag_ids, prompt_len=len(o.prompt_token_ids)).mask()
        raw, proc = [], []
        for j, (t, inj) in enumerate(zip(c.token_ids, c.injected)):
            if inj:
                continue
            i = len(o.prompt_token_ids) + j
            lsm = rec.raw(full, mask, i)
            raw.append(float(torch.log_softmax(lsm / temperature, -1)[t]))
            visible = [full[q] for q in range(i) if bool(mask[i - 1, q])]
            forced = rec.inner(visible, lsm.clone())  # processors may write in place
            proc.append(float(torch.log_softmax(forced / temperature, -1)[t]))
        res.append((raw, proc))
    return res


@pytest.mark.parametrize("prompt_padding,response_padding", [("left", "right"), ("right", "left")])
def test_parallel_logprobs_equal_the_engines(engine, rollouts, prompt_padding, response_padding):
    outs, recorders = rollouts
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, prompt_padding=prompt_padding,
                 response_padding=response_padding)
    lp = parallel_logprobs(engine.model, b, temperature=1.0)
    P = b["prompts"].shape[1]
    want = engine_raw_and_processed(outs, recorders, engine.tag_ids)
    worst = 0.0
    for k, (raw, proc) in enumerate(want):
        scored = b["response_mask"][k].bool()
        got = lp[k, scored]
        worst = max(worst, float((got.detach() - torch.tensor(raw)).abs().max()))
        # the engine's recorded (processed) log-probs are those of the forced distribution
        assert torch.allclose(b["rollout_log_probs"][k, scored], torch.tensor(proc), atol=1e-4)
        assert not bool(lp[k, ~scored].any())
    assert worst < 1e-4, worst
    assert P > 0


def test_parallel_logprobs_temperature(engine, rollouts):
    outs, recorders = rollouts
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids)
    lp = parallel_logprobs(engine.model, b, temperature=0.7)
    for k, (raw, _) in enumerate(engine_raw_and_processed(outs, recorders, engine.tag_ids, 0.7)):
        got = lp[k, b["response_mask"][k].bool()]
        assert torch.allclose(got, torch.tensor(raw), atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_model_through_the_4d_mask(folder, engine, rollouts, attn):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
    outs, _ = rollouts
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, prompt_padding="right")
    want = parallel_logprobs(engine.model, b)
    got = parallel_logprobs(hf, b)
    assert (got - want).abs().max() < 1e-4
    # The causal forward frameworks run by default is measurably wrong on these rows.
    causal = dict(b, step_ids=torch.zeros_like(b["step_ids"]),
                  position_ids=(b["attention_mask"].cumsum(1) - 1).clamp(min=0))
    assert (parallel_logprobs(hf, causal) - want).abs().max() > 1e-2


def test_flash_attention_model_is_refused(folder, engine, rollouts):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    hf.config._attn_implementation = "flash_attention_2"
    b = to_batch(rollouts[0][:1], pad_id=0, tag_ids=engine.tag_ids)
    with pytest.raises(ValueError, match="sdpa"):
        parallel_logprobs(hf, b)
    with pytest.raises(TypeError, match="LlamaDecoder"):
        parallel_logprobs(torch.nn.Linear(2, 2), b)


def test_gradients_flow(folder, engine, rollouts):
    import transformers

    outs, _ = rollouts
    b = to_batch(outs[:2], pad_id=0, tag_ids=engine.tag_ids)
    model = npr.load_model(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for m in (model, hf):
        loss = -(parallel_logprobs(m, b) * b["response_mask"]).sum()
        loss.backward()
        g = [p.grad for p in m.parameters() if p.grad is not None]
        assert g and all(bool(torch.isfinite(x).all()) for x in g)
        assert sum(float(x.abs().sum()) for x in g) > 0


# ----------------------------------------------------------------------------- bad input

def test_invalid_structures_are_flagged_or_dropped_never_causal(folder):
    eng = npr.Engine(folder, max_branches=2)
    tok = eng.tokenizer
    rng = random.Random(5)
    ids = tok.encode("abc", add_special_tokens=False)
    good = random_forcer(tok, eng.tag_ids, len(ids), rng, max_blocks=1, max_branches=2)
    bad = copy.copy(good)
    bad.branches = [3]  # more plans than the engine's max_branches: invalid_structure
    outs = eng.generate(input_ids=[ids, ids, ids], sampling_params=[
        npr.SamplingParams(max_new_tokens=500, logits_processors=[good], seed=1),
        npr.SamplingParams(max_new_tokens=500, logits_processors=[bad], seed=2),
        npr.SamplingParams(max_new_tokens=12, logits_processors=[good], seed=3)])  # cut: length
    valid = [o.outputs[0].structure_valid for o in outs]
    assert valid == [True, False, False]
    assert outs[1].outputs[0].finish_reason == "invalid_structure"
    b = to_batch(outs, pad_id=0, tag_ids=eng.tag_ids)
    assert b["structure_valid"].tolist() == valid
    assert bool(b["response_mask"][0].any()) and not bool(b["response_mask"][1:].any())
    assert not bool(b["rollout_log_probs"][1:].any())
    lp = parallel_logprobs(eng.model, b)
    assert not bool(lp[1:].any()) and bool(lp[0].any())
    d = to_batch(outs, pad_id=0, tag_ids=eng.tag_ids, invalid="drop")
    assert d["row_index"].tolist() == [[0, 0]] and d["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="request 1 sample 0: structure invalid"):
        to_batch(outs, pad_id=0, tag_ids=eng.tag_ids, invalid="raise")
    with pytest.raises(ValueError, match="all 2 completions are invalid"):
        to_batch(outs[1:], pad_id=0, tag_ids=eng.tag_ids, invalid="drop")
    k = to_batch(outs, pad_id=0, tag_ids=eng.tag_ids, invalid="keep")  # the record as decoded
    assert bool(k["response_mask"][1:].any())


def test_a_record_that_is_not_a_layout_is_flagged(engine, rollouts):
    outs = copy.deepcopy(rollouts[0][:1])
    c = outs[0].outputs[0]
    j = c.branch_ids.index(2)  # first token of a second step: must start at p + 1
    c.position_ids[j] += 1
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids)
    assert b["structure_valid"].tolist() == [False, True]
    assert not bool(b["response_mask"][0].any())
    with pytest.raises(ValueError, match="not a §2 layout.*in step 2; its step starts"):
        to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, invalid="raise")
    with pytest.raises(ValueError, match="no layout to keep"):
        to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, invalid="keep")
    c2 = copy.deepcopy(outs)
    c2[0].outputs[1].injected.pop()
    with pytest.raises(ValueError, match="corrupted CompletionOutput"):
        to_batch(c2, pad_id=0, tag_ids=engine.tag_ids)


def test_bad_arguments(engine, rollouts):
    outs = rollouts[0][:2]
    for kw, err, msg in [({"pad_id": -1}, ValueError, "pad_id"),
                         ({"pad_id": True}, TypeError, "pad_id"),
                         ({"pad_id": 0, "prompt_padding": "middle"}, ValueError, "prompt_padding"),
                         ({"pad_id": 0, "invalid": "ignore"}, ValueError, "invalid"),
                         ({"pad_id": 0, "max_response_len": 3}, ValueError, "nothing is truncated"),
                         ({"pad_id": 0, "max_prompt_len": 1}, ValueError, "max_prompt_len")]:
        with pytest.raises(err, match=msg):
            to_batch(outs, tag_ids=engine.tag_ids, **kw)
    with pytest.raises(ValueError, match="tag token ids"):
        to_batch(outs, pad_id=0)  # forked completions, no recorded block ids, no tag ids
    with pytest.raises(TypeError, match="RequestOutput"):
        to_batch([{"a": 1}], pad_id=0)
    with pytest.raises(ValueError, match="no completions"):
        to_batch([], pad_id=0)
    b = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids)
    with pytest.raises(ValueError, match="temperature"):
        parallel_logprobs(engine.model, b, temperature=0.0)
    with pytest.raises(KeyError, match="step_ids"):
        parallel_logprobs(engine.model, {k: v for k, v in b.items() if k != "step_ids"})


def test_mismatched_pad_settings(engine, rollouts):
    outs = rollouts[0][:3]
    left = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, prompt_padding="left")
    right = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, prompt_padding="right")
    assert not torch.equal(left["attention_mask"], right["attention_mask"])
    mixed = dict(right, attention_mask=left["attention_mask"])
    with pytest.raises(ValueError, match="mismatched pad settings"):
        parallel_logprobs(engine.model, mixed)
    with pytest.raises(ValueError, match="prompts"):
        parallel_logprobs(engine.model, dict(right, input_ids=left["input_ids"]))
    rl = to_batch(outs, pad_id=0, tag_ids=engine.tag_ids, response_padding="left")
    with pytest.raises(ValueError, match="mismatched pad settings|differ from responses"):
        parallel_logprobs(engine.model, dict(left, response_mask=rl["response_mask"]))


def test_weight_names_that_do_not_match_the_engine(folder, tmp_path):
    import transformers

    eng = npr.Engine(folder)
    before = {k: v.clone() for k, v in eng.model.hf_weight_map().items()}
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(eng.tokenizer), n_embd=64, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="not parameters of the engine's llama model"):
        sync_weights(eng, other)
    bigger = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder(str(tmp_path / "wide"), hidden=96))
    with pytest.raises(ValueError, match="has shape"):
        sync_weights(eng, bigger)
    deeper = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder(str(tmp_path / "deep"), layers=3))
    with pytest.raises(ValueError, match="model.layers.2"):
        sync_weights(eng, deeper)
    same = transformers.AutoModelForCausalLM.from_pretrained(folder)
    partial = [(n, p) for n, p in same.named_parameters() if "layers.1" not in n]
    with pytest.raises(ValueError, match="not given"):
        sync_weights(eng, partial)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        sync_weights(eng, [("model.norm.weight", torch.ones(64, dtype=torch.long))])
    for k, v in eng.model.hf_weight_map().items():  # nothing was copied by any of these
        assert torch.equal(v, before[k]), k
    # a DDP-style prefix is fine, and the copy lands
    shifted = {f"module.{n}": p.detach() + 1.0 for n, p in same.named_parameters()}
    assert sync_weights(eng, shifted) == len(shifted)
    assert torch.equal(eng.model.hf_weight_map()["model.norm.weight"],
                       shifted["module.model.norm.weight"])


def test_frameworks_are_imported_lazily_with_a_clear_message():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import npr.integrations.layout, npr.integrations.trl as t, npr.integrations.verl\n"
        "assert 'trl' not in sys.modules and 'verl' not in sys.modules, 'imported eagerly'\n"
        "sys.modules['trl'] = None  # as if not installed\n"
        "try:\n"
        "    t.ParallelGRPOTrainer\n"
        "except ImportError as e:\n"
        "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'npr[trl]'" in out.stdout
