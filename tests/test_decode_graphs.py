"""Decode steps through padded piecewise graphs (npr.engine.decode_graphs): on CPU the same
padded pieces run eagerly (no GPU in CI) and must give the plain engine's outputs; on CUDA the
captured graphs must too."""
from __future__ import annotations

import copy

import pytest
import torch

import npr
from npr.engine.decode_graphs import BUCKETS, DecodeGraphs, bucket_for
# the engine tests' tiny model, tokenizer and forced workloads (fixtures included)
from test_engine import CASES, labels, make_forcer, model, naive_decode, tag_ids, tok  # noqa: F401
from tiny import tiny_model


def test_buckets():
    assert [bucket_for(r, 256) for r in (1, 2, 3, 5, 8, 9, 100, 256)] == [1, 2, 4, 8, 8, 16, 128, 256]
    assert bucket_for(257, 256) is None and bucket_for(20, 16) is None
    assert bucket_for(12, 12) == 16  # a max_rows between buckets pads up to the next one
    assert list(BUCKETS) == sorted(BUCKETS)


def test_capture_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA only"):
        DecodeGraphs(model, 8, torch.device("cpu"), capture=True)


def _run_cases(eng, tok, tag_ids, labels, parallel="native"):
    prompts, params, forcers = [], [], []
    for i, (text, branches) in enumerate(CASES):
        ids = tok.encode(text, add_special_tokens=False)
        f = make_forcer(tok, tag_ids, labels, len(ids), branches, seed=100 + i)
        prompts.append(ids)
        forcers.append((ids, f))
        params.append(npr.SamplingParams(temperature=0, max_new_tokens=400, parallel=parallel,
                                         logits_processors=[f]))
    return forcers, eng.generate(input_ids=prompts, sampling_params=params)


@pytest.mark.parametrize("parallel", ["native", "sequential"])
def test_padded_pieces_match_naive_decoder(model, tok, tag_ids, labels, parallel):
    # every request decodes concurrently: steps of 1..~13 rows, padded to buckets 1..16
    eng = npr.Engine(model, tok, kv_cache_tokens=4096, decode_graphs=True)
    forcers, outs = _run_cases(eng, tok, tag_ids, labels, parallel)
    for (ids, f), out in zip(forcers, outs):
        c = out.outputs[0]
        want_ids, want_pos = naive_decode(model, ids, f, tag_ids, labels, tok.eos_token_id, 400)
        assert c.finish_reason == "stop", c.finish_detail
        assert c.token_ids == want_ids and c.position_ids == want_pos
    graphs = eng.runner.graphs
    assert graphs.steps > 0 and graphs.steps < eng.stats["steps"]  # prefills ran the plain path
    assert len(graphs._buckets) >= 3  # several bucket sizes, most of them padded
    assert eng.pool_stats()["used_blocks"] == 0


def test_padded_pieces_logprobs_equal_plain_engine(model, tok, tag_ids, labels):
    plain = npr.Engine(model, tok, kv_cache_tokens=4096)
    padded = npr.Engine(model, tok, kv_cache_tokens=4096, decode_graphs=True)
    _, a = _run_cases(plain, tok, tag_ids, labels)
    _, b = _run_cases(padded, tok, tag_ids, labels)
    for x, y in zip(a, b):
        cx, cy = x.outputs[0], y.outputs[0]
        assert cx.token_ids == cy.token_ids
        lx = torch.tensor([v if v is not None else 0.0 for v in cx.logprobs])
        ly = torch.tensor([v if v is not None else 0.0 for v in cy.logprobs])
        torch.testing.assert_close(ly, lx, rtol=1e-4, atol=1e-4)


def test_sleep_wake_and_new_weights_recapture(model, tok, tag_ids, labels):
    m = copy.deepcopy(model)
    eng = npr.Engine(m, tok, kv_cache_tokens=4096, decode_graphs=True)
    ids = tok.encode("graphs", add_special_tokens=False)
    f = make_forcer(tok, tag_ids, labels, len(ids), [3], seed=5)
    sp = npr.SamplingParams(temperature=0, max_new_tokens=200, logits_processors=[f])
    first = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids
    eng.sleep()
    assert not eng.runner.graphs._buckets
    eng.wake_up()
    assert eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids == first
    # different weights: outputs equal a fresh engine's on them
    other = tiny_model(len(tok), seed=7)
    eng.update_weights(list(other.hf_weight_map().items()))
    assert not eng.runner.graphs._buckets
    got = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids
    fresh = npr.Engine(copy.deepcopy(other), tok, kv_cache_tokens=4096)
    assert got == fresh.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0].token_ids


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not npr._ext.with_cuda(),
                    reason="needs a CUDA device and npr._C built with CUDA")
def test_cuda_graphs_match_naive_decoder(model, tok, tag_ids, labels):
    gpu_model = copy.deepcopy(model).cuda()
    eng = npr.Engine(gpu_model, tok, kv_cache_tokens=4096, device="cuda", decode_graphs=True)
    forcers, outs = _run_cases(eng, tok, tag_ids, labels)
    for (ids, f), out in zip(forcers, outs):
        want_ids, want_pos = naive_decode(model, ids, f, tag_ids, labels, tok.eos_token_id, 400)
        assert out.outputs[0].token_ids == want_ids and out.outputs[0].position_ids == want_pos
    graphs = eng.runner.graphs
    assert graphs.captured == len(graphs._buckets) >= 3 and graphs.steps > 0
    assert eng.pool_stats()["used_blocks"] == 0


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: records capture_begin / capture_end and fails
    on the misuse CUDA would reject (nested or unbalanced captures)."""
    log: list = []
    active = None

    def capture_begin(self, pool=None):
        assert _FakeGraph.active is None, "capture begun inside another capture"
        _FakeGraph.active = self
        _FakeGraph.log.append(("begin", self, pool))

    def capture_end(self):
        assert _FakeGraph.active is self, "capture ended on a graph that is not capturing"
        _FakeGraph.active = None
        _FakeGraph.log.append(("end", self))


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    class _Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    _FakeGraph.log, _FakeGraph.active = [], None
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return _FakeGraph


def test_capture_protocol_pieces_per_layer(model, fake_cuda):
    from npr.engine.decode_graphs import _Bucket

    g = DecodeGraphs(model, 8, torch.device("cpu"), capture=False)
    b = _Bucket(4, model.num_layers, torch.device("cpu"))
    g._buckets[4] = b
    g._capture(b)
    L = model.num_layers
    log = fake_cuda.log
    # graph i captured from begin to end, one after the other, all in one pool
    assert [e[0] for e in log] == ["begin", "end"] * (L + 1)
    assert [e[1] for e in log[::2]] == b.graphs and [e[1] for e in log[1::2]] == b.graphs
    assert {e[2] for e in log[::2]} == {"pool"} and fake_cuda.active is None
    assert all(x is not None for x in b.qkv) and b.logits.shape == (4, model.config.vocab_size)
    assert g.captured == 1


def test_failed_capture_ends_it_and_drops_the_bucket(model, fake_cuda, monkeypatch):
    from npr.engine.decode_graphs import _Bucket

    g = DecodeGraphs(model, 8, torch.device("cpu"), capture=False)
    b = _Bucket(2, model.num_layers, torch.device("cpu"))
    g._buckets[2] = b
    calls = {"n": 0}
    real = type(model.layers[1]).forward

    def boom(self, *a, **k):  # layer 1 fails, but only in the captured run (the second)
        if self is model.layers[1]:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("operation not permitted when stream is capturing")
        return real(self, *a, **k)

    monkeypatch.setattr(type(model.layers[1]), "forward", boom)
    with pytest.raises(RuntimeError, match="capturing"):
        g._capture(b)
    assert fake_cuda.active is None and 2 not in g._buckets and g.captured == 0
