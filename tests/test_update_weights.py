"""Engine.update_weights reaches every later step: on the packed decode copies (decode_weights
auto / bf16 / fp16), for requests in flight, and after a trainer changed the shared parameters in
place. The oracle is always a fresh engine built on the new weights."""
from __future__ import annotations

import copy

import pytest
import torch

import npr
from tiny import tiny_model

V = 97
PROMPTS = [[5, 17, 33, 2, 60, 41], [9, 9, 70, 12]]
DECODE = ["auto", "bf16", "fp16"]
# No tokenizer and a config without eos: every request runs its full max_new_tokens, so the
# comparisons cover that many decode steps.
SP = npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=16)


def engine(model: torch.nn.Module, decode_weights: str) -> npr.Engine:
    return npr.Engine(model, None, kv_cache_tokens=2048, decode_weights=decode_weights)


def fresh(weights: dict[str, torch.Tensor], decode_weights: str, prompts: list[list[int]],
          max_new: list[int]) -> list[tuple[list[int], list[float]]]:
    """(token ids, logprobs) per prompt from a new engine whose model holds `weights`."""
    m = tiny_model(V, seed=0)
    m.load_hf_state_dict(weights.items(), strict=True)
    sps = [npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=n) for n in max_new]
    outs = engine(m, decode_weights).generate(input_ids=prompts, sampling_params=sps)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.hf_weight_map().items()}


def run_with_update(eng: npr.Engine, prompts: list[list[int]], update, in_flight: bool):
    """Generates PROMPTS, calling update() before (in_flight False) or after a few steps. Returns
    (outputs, tokens each request had when the weights changed)."""
    if not in_flight:
        update()
        return eng.generate(input_ids=prompts, sampling_params=SP), [[] for _ in prompts]
    rids = [eng.add_request(None, SP, input_ids=p) for p in prompts]
    for _ in range(5):
        eng.step()
    done = [list(eng.scheduler.output(r, 0)["token_ids"]) for r in rids]
    assert all(0 < len(d) < SP.max_new_tokens for d in done)
    update()
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    return [outs[r] for r in rids], done


def check_against_fresh(outs, done, weights, decode_weights, prompts) -> None:
    """Tokens generated after the update equal a fresh engine's continuation of prompt + the
    tokens generated before it, under the new weights; logprobs too."""
    refs = fresh(weights, decode_weights, [p + d for p, d in zip(prompts, done)],
                 [SP.max_new_tokens - len(d) for d in done])
    for out, d, (ref_ids, ref_lps) in zip(outs, done, refs):
        o = out.outputs[0]
        assert o.token_ids[:len(d)] == d
        assert o.token_ids[len(d):] == ref_ids
        torch.testing.assert_close(torch.tensor(o.logprobs[len(d):]), torch.tensor(ref_lps),
                                   rtol=1e-4, atol=1e-4)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "in_flight"])
@pytest.mark.parametrize("decode_weights", DECODE)
def test_update_weights_with_different_weights(decode_weights, in_flight):
    eng = engine(tiny_model(V, seed=1), decode_weights)
    old = eng.generate(input_ids=PROMPTS, sampling_params=SP)  # packs the decode copies
    new = snapshot(tiny_model(V, seed=2))
    outs, done = run_with_update(eng, PROMPTS, lambda: eng.update_weights(new.items()), in_flight)
    check_against_fresh(outs, done, new, decode_weights, PROMPTS)
    # The new weights decode differently, so the comparison above has power.
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in old]
    assert eng.pool_stats()["used_blocks"] == 0


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "in_flight"])
@pytest.mark.parametrize("how", ["optimizer", "through_data"])
@pytest.mark.parametrize("decode_weights", DECODE)
def test_update_weights_after_in_place_training_step(decode_weights, how, in_flight):
    """A trainer that shares the engine's parameters steps them in place (an optimizer, or code
    writing through .data, which torch does not count in _version), then calls update_weights
    with its (already applied) weights."""
    model = tiny_model(V, seed=1)
    eng = engine(model, decode_weights)
    old = eng.generate(input_ids=PROMPTS, sampling_params=SP)
    # Two rows: more tokens than a decode step, so the training forward takes the plain
    # (differentiable) weights, not the packed decode copies.
    ids = torch.tensor([PROMPTS[0] + old[0].outputs[0].token_ids] * 2)

    def train_step() -> None:
        if how == "optimizer":
            opt = torch.optim.AdamW(model.parameters(), lr=0.05)
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            g = torch.Generator().manual_seed(4)
            for p in model.parameters():
                p.data.add_(torch.randn(p.shape, generator=g) * 0.2 * p.data.abs().mean())
        eng.update_weights(model.hf_weight_map().items())

    outs, done = run_with_update(eng, PROMPTS, train_step, in_flight)
    check_against_fresh(outs, done, snapshot(model), decode_weights, PROMPTS)
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in old]


def test_hf_weight_map_writes_count_as_parameter_versions():
    """The root of the stale packed copies: writes through hf_weight_map's views must bump the
    owning parameter's _version (what packed_copy keys on)."""
    model = tiny_model(V, seed=1)
    for name, view in model.hf_weight_map().items():
        owner = next(p for p in model.parameters()
                     if p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr())
        before = owner._version
        with torch.no_grad():
            view.copy_(view * 1.0)
        assert owner._version > before, name


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return npr.load_model(smollm2_gguf)


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "in_flight"])
def test_update_weights_real_smollm2(smollm2, in_flight):
    """The issue's probe on real weights: down_proj x 1.5 pushed into an engine on the default
    decode path equals a fresh engine on the scaled weights."""
    model = copy.deepcopy(smollm2)
    ref_model = copy.deepcopy(smollm2)
    eng = npr.Engine(model, None, kv_cache_tokens=2048)
    prompts = [[1, 9519, 253, 2644, 30, 2, 1, 4093]]
    sp = npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=10)
    old = eng.generate(input_ids=prompts, sampling_params=sp)[0].outputs[0]
    new = {n: w * 1.5 for n, w in model.hf_weight_map().items()
           if n.endswith("mlp.down_proj.weight")}
    if in_flight:
        rid = eng.add_request(None, sp, input_ids=prompts[0])
        for _ in range(4):
            eng.step()
        done = list(eng.scheduler.output(rid, 0)["token_ids"])
        eng.update_weights(new.items())
        outs = []
        while eng.has_unfinished_requests():
            outs += eng.step()
        got = outs[0].outputs[0]
    else:
        done = []
        eng.update_weights(new.items())
        got = eng.generate(input_ids=prompts, sampling_params=sp)[0].outputs[0]
    ref_model.load_hf_state_dict(new.items())
    ref = npr.Engine(ref_model, None, kv_cache_tokens=2048).generate(
        input_ids=[prompts[0] + done],
        sampling_params=npr.SamplingParams(temperature=0, parallel="off",
                                           max_new_tokens=sp.max_new_tokens - len(done)))
    ref = ref[0].outputs[0]
    assert got.token_ids[:len(done)] == done
    # eos may end either earlier; both are greedy over the same weights, so they agree
    assert got.token_ids[len(done):] == ref.token_ids
    assert old.token_ids != got.token_ids or in_flight


# --------------------------------------------------------------------------- atomic, checked

def _weights_equal(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, snap[n]) for n, t in model.hf_weight_map().items())


BAD_UPDATES = {
    "unknown_name": (lambda w: ("model.layers.99.foo.weight", w), KeyError, "model.layers.99.foo"),
    "wrong_shape": (lambda w: ("model.layers.1.mlp.down_proj.weight", w[:, :-1]), ValueError,
                    r"down_proj.weight.*shape"),
    "int64": (lambda w: ("model.layers.1.mlp.down_proj.weight", w.long()), TypeError,
              r"down_proj.weight.*torch.int64"),
    "bool": (lambda w: ("model.layers.1.mlp.down_proj.weight", w > 0), TypeError,
             r"down_proj.weight.*torch.bool"),
    "complex64": (lambda w: ("model.layers.1.mlp.down_proj.weight", w.to(torch.complex64)),
                  TypeError, r"down_proj.weight.*torch.complex64"),
    "not_a_tensor": (lambda w: ("model.layers.1.mlp.down_proj.weight", w.tolist()), TypeError,
                     r"down_proj.weight.*list"),
}


@pytest.mark.parametrize("bad", list(BAD_UPDATES))
def test_update_weights_is_atomic_and_checks_dtypes(bad):
    """A bad tensor anywhere in an update is refused naming it, before anything is applied: the
    weights, the packed copies and the KV cache of requests in flight stay as they were."""
    model = tiny_model(V, seed=1)
    eng = engine(model, "auto")
    ref = eng.generate(input_ids=PROMPTS, sampling_params=SP)
    snap = snapshot(model)
    make, exc, match = BAD_UPDATES[bad]
    w = snap["model.layers.1.mlp.down_proj.weight"]
    down0 = "model.layers.0.mlp.down_proj.weight"
    update = [(down0, snap[down0] * 0.5), ("model.norm.weight", snap["model.norm.weight"] * 2),
              make(w)]
    rids = [eng.add_request(None, SP, input_ids=p) for p in PROMPTS]
    for _ in range(3):
        eng.step()
    used = eng.pool_stats()["used_blocks"]
    assert used > 0
    with pytest.raises(exc, match=match):
        eng.update_weights(update)
    assert _weights_equal(model, snap)
    assert eng.pool_stats()["used_blocks"] == used  # KV kept: nothing changed
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    assert [outs[r].outputs[0].token_ids for r in rids] == [o.outputs[0].token_ids for o in ref]
    # A good update (a dict works too) is applied in full and drops the KV at once.
    eng.add_request(None, SP, input_ids=PROMPTS[0])
    eng.step()
    assert eng.pool_stats()["used_blocks"] > 0
    eng.update_weights(dict(update[:2]))
    assert eng.pool_stats()["used_blocks"] == 0
    got = model.hf_weight_map()
    assert torch.equal(got["model.norm.weight"], snap["model.norm.weight"] * 2)
    assert torch.equal(got[down0], snap[down0] * 0.5)
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.pool_stats()["used_blocks"] == 0


def test_update_weights_casts_floating_dtypes():
    model = tiny_model(V, seed=1)
    eng = engine(model, "auto")
    new = {n: t.double() * 0.5 for n, t in snapshot(model).items()}
    eng.update_weights(new.items())
    assert _weights_equal(model, {n: t.float() for n, t in new.items()})
