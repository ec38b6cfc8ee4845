"""The engine against a naive decoder that recomputes the whole visible context from scratch for
every token with the reference model path under the spec §2 mask and positions."""
from __future__ import annotations

import math
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
def model(tok):
    return tiny_model(len(tok), seed=1)


@pytest.fixture(scope="module")
def tag_ids(tok):
    v = tok.get_vocab()
    return {t: v[t] for t in TAGS}


@pytest.fixture(scope="module")
def labels(tok):
    return [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]


def make_forcer(tok, tag_ids, labels, prompt_len, branches, seed):
    rng = random.Random(seed)
    lens = {(b, k): rng.randint(1, 9) for b in range(len(branches)) for k in range(1, 9)}
    return ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=prompt_len,
                           branches=branches, step_tokens=lambda b, k: lens[(b, k)],
                           plan_tokens=rng.randint(1, 2), prefix_tokens=0,
                           takeaway_tokens=rng.randint(1, 3), final_tokens=rng.randint(1, 3))


def naive_decode(model, prompt, forcer, tag_ids, labels, eos, max_new):
    """Greedy decoding by full recomputation. Returns (token_ids, position_ids) of the completion
    in canonical order. Siblings are decoded one after another; each sees only its own step."""
    seq = [(t, i, None) for i, t in enumerate(prompt)]  # (token, position, (block, k) or None)
    P = len(prompt)

    def next_tok(vis):
        ids = torch.tensor([[t for t, _, _ in vis]])
        pos = torch.tensor([[p for _, p, _ in vis]])
        L = len(vis)
        mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
        sid = [s for _, _, s in vis]
        for i in range(L):
            for j in range(i):
                if sid[i] is not None and sid[j] is not None and sid[i][0] == sid[j][0] and sid[i] != sid[j]:
                    mask[i, j] = False
        with torch.no_grad():
            out = model(ids, position_ids=pos, attention_mask=mask[None])
        logits = (out.logits if hasattr(out, "logits") else out)[0, -1].float()
        logits = forcer([t for t, _, _ in vis], logits)
        return int(torch.argmax(logits))

    block = 0
    plans = 0
    while len(seq) - P < max_new:
        t = next_tok(seq)
        seq.append((t, seq[-1][1] + 1, None))
        if t == eos:
            break
        if t == tag_ids["<guideline>"]:
            plans = 0
        elif t == tag_ids["<plan>"]:
            plans += 1
        elif t == tag_ids["</guideline>"]:
            p = seq[-1][1]
            steps = []
            for k in range(1, plans + 1):
                own = [(tag_ids["<step>"], p + 1, (block, k))]
                for lab in labels[k - 1]:
                    own.append((lab, own[-1][1] + 1, (block, k)))
                while True:
                    t2 = next_tok(seq + own)
                    own.append((t2, own[-1][1] + 1, (block, k)))
                    if t2 == tag_ids["</step>"]:
                        break
                steps.append(own)
            for own in steps:
                seq += own
            seq.append((tag_ids["<takeaway>"], p + max(len(o) for o in steps) + 1, None))
            block += 1
    comp = seq[P:]
    return [t for t, _, _ in comp], [p for _, p, _ in comp]


def engine_for(model, tok, **kw):
    kw.setdefault("kv_cache_tokens", 4096)
    return npr.Engine(model, tok, **kw)


CASES = [  # (prompt, branches per block)
    ("what is 2+2", [2]),
    ("abc", [1, 3]),
    ("solve x", [8]),
    ("q", [4, 2, 5]),
]


@pytest.mark.parametrize("parallel", ["native", "sequential"])
def test_greedy_matches_naive_decoder(model, tok, tag_ids, labels, parallel):
    eng = engine_for(model, tok)
    prompts, params, forcers = [], [], []
    for i, (text, branches) in enumerate(CASES):
        ids = tok.encode(text, add_special_tokens=False)
        f = make_forcer(tok, tag_ids, labels, len(ids), branches, seed=100 + i)
        prompts.append(text)
        forcers.append((ids, f))
        params.append(npr.SamplingParams(temperature=0, max_new_tokens=400, parallel=parallel,
                                         logits_processors=[f]))
    outs = eng.generate(prompts, params)  # all requests decode concurrently
    for (ids, f), out, (_, branches) in zip(forcers, outs, CASES):
        c = out.outputs[0]
        want_ids, want_pos = naive_decode(model, ids, f, tag_ids, labels, tok.eos_token_id, 400)
        assert c.finish_reason == "stop", c.finish_detail
        assert c.token_ids == want_ids
        assert c.position_ids == want_pos
        assert c.structure_valid
        assert c.stats["forks"] == len(branches)
        lay = fmt.layout(ids + c.token_ids, tag_ids, prompt_len=len(ids))
        assert lay.position_ids[len(ids):].tolist() == c.position_ids
        # branch ids: 0 outside steps, one id per step
        steps_in_layout = (lay.step_ids[len(ids):] > 0).tolist()
        assert [b > 0 for b in c.branch_ids] == steps_in_layout
    assert eng.pool_stats()["used_blocks"] == 0


def test_native_equals_sequential_and_ideal_speedup_counts(model, tok, tag_ids, labels):
    eng = engine_for(model, tok)
    ids = tok.encode("hello", add_special_tokens=False)
    f = make_forcer(tok, tag_ids, labels, len(ids), [4], seed=7)
    outs = {}
    for mode in ("native", "sequential"):
        sp = npr.SamplingParams(temperature=0, max_new_tokens=300, parallel=mode, logits_processors=[f])
        outs[mode] = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0]
    a, b = outs["native"], outs["sequential"]
    assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
    lay = fmt.layout(ids + a.token_ids, tag_ids, prompt_len=len(ids))
    assert a.stats["critical_path_tokens"] == lay.critical_path_tokens  # both: response only
    assert a.stats["generated_tokens"] == len(a.token_ids)


def teacher_forced_logprobs(model, prompt_ids, comp_ids, injected, tag_ids, forcer):
    ids = list(prompt_ids) + list(comp_ids)
    lay = fmt.layout(ids, tag_ids, prompt_len=len(prompt_ids))
    mask = lay.mask()
    with torch.no_grad():
        out = model(torch.tensor([ids]), position_ids=lay.position_ids[None], attention_mask=mask[None])
    logits = (out.logits if hasattr(out, "logits") else out)[0].float()
    lps = []
    for i in range(len(prompt_ids), len(ids)):
        if injected[i - len(prompt_ids)]:
            lps.append(None)
            continue
        src = i - 1
        # The token at i was sampled from the logits of the last token the row saw before it.
        visible = [ids[j] for j in range(i) if mask[i, j]]
        while not mask[i, src]:
            src -= 1
        row = forcer(visible, logits[src].clone()) if forcer else logits[src]
        lps.append(float(torch.log_softmax(row, -1)[ids[i]]))
    return lps


def test_logprobs_match_teacher_forcing(model, tok, tag_ids, labels):
    eng = engine_for(model, tok)
    ids = tok.encode("think", add_special_tokens=False)
    f = make_forcer(tok, tag_ids, labels, len(ids), [3, 2], seed=11)
    sp = npr.SamplingParams(temperature=1.0, seed=5, max_new_tokens=300, logits_processors=[f])
    c = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0]
    assert c.finish_reason == "stop", c.finish_detail
    want = teacher_forced_logprobs(model, ids, c.token_ids, c.injected, tag_ids, f)
    for got, w, inj in zip(c.logprobs, want, c.injected):
        if inj:
            assert got is None
        else:
            assert math.isclose(got, w, rel_tol=1e-4, abs_tol=1e-4), (got, w)


def test_preemption_keeps_greedy_outputs_and_frees_everything(model, tok, tag_ids, labels):
    rng = random.Random(3)
    reqs = []
    for i in range(64):
        ids = [rng.randint(3, 40) for _ in range(rng.randint(1, 12))]
        branches = [rng.randint(1, 8) for _ in range(rng.randint(1, 2))]
        f = make_forcer(tok, tag_ids, labels, len(ids), branches, seed=i)
        reqs.append((ids, npr.SamplingParams(temperature=0, max_new_tokens=300, logits_processors=[f])))
    big = engine_for(model, tok, kv_cache_tokens=64 * 1024)
    small = engine_for(model, tok, kv_cache_tokens=1024)   # far less than 64 requests need at once
    out_big = big.generate(input_ids=[r[0] for r in reqs], sampling_params=[r[1] for r in reqs])
    out_small = small.generate(input_ids=[r[0] for r in reqs], sampling_params=[r[1] for r in reqs])
    assert small.scheduler.num_preemptions() > 0
    for a, b in zip(out_big, out_small):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason == "stop"
    assert small.pool_stats()["used_blocks"] == 0 and big.pool_stats()["used_blocks"] == 0


def test_greedy_does_not_depend_on_batch_composition(model, tok, tag_ids, labels):
    eng = engine_for(model, tok)
    ids = tok.encode("alone", add_special_tokens=False)
    f = make_forcer(tok, tag_ids, labels, len(ids), [3], seed=9)
    sp = npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[f])
    alone = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids
    others = [tok.encode(f"other {i}", add_special_tokens=False) for i in range(5)]
    fo = [make_forcer(tok, tag_ids, labels, len(o), [i % 4 + 1], seed=i) for i, o in enumerate(others)]
    sps = [npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[x]) for x in fo]
    mixed = eng.generate(input_ids=others[:2] + [ids] + others[2:], sampling_params=sps[:2] + [sp] + sps[2:])
    assert mixed[2].outputs[0].token_ids == alone


def test_n_samples_share_prompt_and_seeds_reproduce(model, tok, tag_ids, labels):
    eng = engine_for(model, tok)
    ids = tok.encode("many samples share one prompt of three blocks", add_special_tokens=False)
    assert len(ids) > 2 * eng.block_size

    def first_step(n: int) -> tuple[int, int, int, int]:
        """(tokens, rows, KV blocks used) after the request's first step, rows of its second."""
        f = make_forcer(tok, tag_ids, labels, len(ids), [2], seed=4)
        before = dict(eng.stats)
        eng.add_request(input_ids=ids, params=npr.SamplingParams(
            temperature=1.0, n=n, seed=123, max_new_tokens=200, logits_processors=[f]))
        eng.step()
        got = (eng.stats["tokens"] - before["tokens"], eng.stats["rows"] - before["rows"],
               eng.scheduler.pool_stats()["used_blocks"])
        rows = eng.stats["rows"]
        eng.step()
        got += (eng.stats["rows"] - rows,)
        while eng.has_unfinished_requests():
            eng.step()
        return got

    one, four = first_step(1), first_step(4)
    # The 4 samples' prompt is computed once, as one row, into one copy of its KV blocks (not
    # 4 rows, 4x the tokens and blocks); then 4 trunks decode off it as 4 rows.
    assert four[:3] == one[:3] and one[1] == 1 and one[0] >= len(ids) - 1
    assert one[2] <= -(-len(ids) // eng.block_size)
    assert (one[3], four[3]) == (1, 4)
    assert eng.scheduler.pool_stats()["used_blocks"] == 0
    f = make_forcer(tok, tag_ids, labels, len(ids), [2], seed=4)
    sp = npr.SamplingParams(temperature=1.0, n=4, seed=123, max_new_tokens=200, logits_processors=[f])
    a = eng.generate(input_ids=[ids], sampling_params=sp)[0]
    b = eng.generate(input_ids=[ids], sampling_params=sp)[0]
    assert len(a.outputs) == 4
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # samples differ
    assert all(o.finish_reason == "stop" and o.structure_valid for o in a.outputs)


def test_parallel_off_is_plain_decoding(model, tok):
    eng = engine_for(model, tok)
    ids = tok.encode("plain", add_special_tokens=False)
    c = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(
        temperature=0, max_new_tokens=20, parallel="off"))[0].outputs[0]
    # naive greedy with a causal mask
    seq = list(ids)
    for _ in range(len(c.token_ids)):
        with torch.no_grad():
            out = model(torch.tensor([seq]))
        seq.append(int((out.logits if hasattr(out, "logits") else out)[0, -1].argmax()))
        if seq[-1] == tok.eos_token_id:
            break
    assert c.token_ids == seq[len(ids):]
    assert c.position_ids == list(range(len(ids), len(seq)))
    assert c.stats["forks"] == 0


class _InvalidAfter:
    """Forces a step to open a nested <guideline>: invalid structure."""

    def __init__(self, forcer, tag_ids):
        self.f, self.t = forcer, tag_ids

    def __call__(self, visible, logits):
        ids = visible[self.f.prompt_len:]
        if self.t["<step>"] in ids and ids.count(self.t["<step>"]) > ids.count(self.t["</step>"]):
            out = torch.full_like(logits, float("-inf"))
            out[self.t["<guideline>"]] = 0.0
            return out
        return self.f(visible, logits)


def test_bad_inputs_and_engine_stays_usable(model, tok, tag_ids, labels):
    eng = engine_for(model, tok, max_branches=4)
    ok_ids = tok.encode("fine", add_special_tokens=False)
    ok_f = make_forcer(tok, tag_ids, labels, len(ok_ids), [2], seed=1)
    ok_sp = npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[ok_f])
    ref = eng.generate(input_ids=[ok_ids], sampling_params=ok_sp)[0].outputs[0].token_ids

    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate(input_ids=[[]])
    with pytest.raises(ValueError, match="longer than the model's context"):
        eng.generate(input_ids=[[5] * 5000])
    with pytest.raises(ValueError, match="temperature"):
        npr.SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        npr.SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="parallel"):
        npr.SamplingParams(parallel="fast")
    # more plans than max_branches -> invalid_structure
    f6 = make_forcer(tok, tag_ids, labels, len(ok_ids), [6], seed=2)
    c = eng.generate(input_ids=[ok_ids], sampling_params=npr.SamplingParams(
        temperature=0, max_new_tokens=200, logits_processors=[f6]))[0].outputs[0]
    assert c.finish_reason == "invalid_structure" and not c.structure_valid
    assert "plans" in c.finish_detail
    # a model that nests a guideline inside a step
    bad = _InvalidAfter(make_forcer(tok, tag_ids, labels, len(ok_ids), [2], seed=3), tag_ids)
    c = eng.generate(input_ids=[ok_ids], sampling_params=npr.SamplingParams(
        temperature=0, max_new_tokens=200, logits_processors=[bad]))[0].outputs[0]
    assert c.finish_reason == "invalid_structure" and "nesting" in c.finish_detail
    # a processor that raises: the error surfaces, nothing leaks
    def boom(visible, logits):
        raise RuntimeError("processor failed")
    with pytest.raises(RuntimeError, match="processor failed"):
        eng.generate(input_ids=[ok_ids], sampling_params=npr.SamplingParams(logits_processors=[boom]))
    # the token budget cannot fit the fork
    c = eng.generate(input_ids=[ok_ids], sampling_params=npr.SamplingParams(
        temperature=0, max_new_tokens=12, logits_processors=[ok_f]))[0].outputs[0]
    assert c.finish_reason == "length"
    assert eng.pool_stats()["used_blocks"] == 0
    again = eng.generate(input_ids=[ok_ids], sampling_params=ok_sp)[0].outputs[0].token_ids
    assert again == ref


def test_tags_outside_the_model_vocabulary_are_refused(tok, tag_ids):
    # the engine writes tags and step labels itself and the forward does not re-check ids:
    # a tokenizer with tags the model's embeddings lack is refused up front
    small = tiny_model(min(tag_ids.values()), seed=1)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        npr.Engine(small, tok, kv_cache_tokens=256)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        npr.Engine(small, None, kv_cache_tokens=256).generate(input_ids=[[len(tok) - 1]])


def test_abort_sleep_wake_update_weights(model, tok, tag_ids, labels):
    eng = engine_for(model, tok)
    ids = tok.encode("abort me", add_special_tokens=False)
    f = make_forcer(tok, tag_ids, labels, len(ids), [3], seed=5)
    sp = npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[f])
    rid = eng.add_request(None, sp, input_ids=ids)
    for _ in range(6):
        eng.step()
    outs = eng.abort([rid])
    assert outs[0].outputs[0].finish_reason == "abort"
    assert eng.pool_stats()["used_blocks"] == 0 and not eng.has_unfinished_requests()
    eng.sleep()
    eng.wake_up()
    ref = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids
    # same weights pushed back: same output
    eng.update_weights(list(model.hf_weight_map().items()))
    assert eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids == ref


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not npr._ext.with_cuda(),
                    reason="needs a CUDA device and npr._C built with CUDA")
def test_cuda_engine_matches_naive_decoder(model, tok, tag_ids, labels):
    import copy

    gpu_model = copy.deepcopy(model).cuda()
    eng = npr.Engine(gpu_model, tok, kv_cache_tokens=4096, device="cuda")
    for i, (text, branches) in enumerate(CASES):
        ids = tok.encode(text, add_special_tokens=False)
        f = make_forcer(tok, tag_ids, labels, len(ids), branches, seed=100 + i)
        sp = npr.SamplingParams(temperature=0, max_new_tokens=400, logits_processors=[f])
        c = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0]
        want_ids, want_pos = naive_decode(model, ids, f, tag_ids, labels, tok.eos_token_id, 400)
        assert c.token_ids == want_ids and c.position_ids == want_pos
    assert eng.pool_stats()["used_blocks"] == 0


def test_row_and_token_budgets_do_not_change_outputs(model, tok, tag_ids, labels):
    """Tiny per-step budgets (chunked prefill, branches split over steps) and one-token prompts
    give the same greedy outputs as the defaults."""
    reqs = []
    for i, (text, branches) in enumerate(CASES + [("z", [3])]):
        ids = tok.encode(text, add_special_tokens=False) if text != "z" else [7]
        f = make_forcer(tok, tag_ids, labels, len(ids), branches, seed=40 + i)
        reqs.append((ids, npr.SamplingParams(temperature=0, max_new_tokens=300, n=1 + i % 2,
                                             logits_processors=[f])))
    ref = engine_for(model, tok).generate(input_ids=[r[0] for r in reqs],
                                          sampling_params=[r[1] for r in reqs])
    tight = engine_for(model, tok, max_rows=2, max_tokens_per_step=5)
    got = tight.generate(input_ids=[r[0] for r in reqs], sampling_params=[r[1] for r in reqs])
    for a, b in zip(ref, got):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert [o.position_ids for o in a.outputs] == [o.position_ids for o in b.outputs]
        assert all(o.finish_reason == "stop" and o.structure_valid for o in b.outputs)
    assert tight.pool_stats()["used_blocks"] == 0
