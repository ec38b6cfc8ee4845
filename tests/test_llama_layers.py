"""npr._C.llama_layers (the whole layer stack in one C++ call, the engine's CPU fp32 path)
against the per-layer Python path (LlamaLayer._forward_fused through PagedTreeAttention): the
same greedy tokens and log-probs through the engine, plain and forked, few rows (packed decode
weights) and many (torch's GEMM), with biases and grouped-query attention."""
from __future__ import annotations

import pytest
import torch

import npr
from npr import _ext
from npr.bench.forcing import ForcedStructure
from npr.models.config import ModelConfig
from npr.models.llama import LlamaDecoder
from npr.tags import TAGS
from tiny import tiny_tokenizer

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")


def _model(vocab: int, *, heads: int, kv_heads: int, bias: bool, seed: int) -> LlamaDecoder:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=64 // heads,
                      max_position_embeddings=1024, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                      tie_word_embeddings=False)
    model = LlamaDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def _run(model, tok, prompts, forked: bool, native: bool, monkeypatch) -> list:
    calls = []
    real = _ext._C.llama_layers
    monkeypatch.setattr(_ext._C, "llama_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    if not native:
        monkeypatch.setattr(LlamaDecoder, "_native_args", lambda self, attn, x: None)
    vocab = tok.get_vocab()
    labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]

    def params(i: int, p: list[int]) -> npr.SamplingParams:
        if not forked:
            return npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=12)
        return npr.SamplingParams(temperature=0, parallel="native", max_new_tokens=200,
                                  logits_processors=[ForcedStructure(
                                      tag_ids={t: vocab[t] for t in TAGS}, labels=labels,
                                      eos_id=tok.eos_token_id, prompt_len=len(p),
                                      branches=[2 + i % 3], step_tokens=3, plan_tokens=1,
                                      prefix_tokens=1, takeaway_tokens=2, final_tokens=2)])

    eng = npr.Engine(model, tok, block_size=4, kv_cache_tokens=4096, max_rows=64, seed=0)
    outs = eng.generate(input_ids=prompts, sampling_params=[params(i, p) for i, p in
                                                            enumerate(prompts)])
    monkeypatch.undo()
    assert bool(calls) == native
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("heads,kv_heads,bias", [(2, 1, False), (4, 4, True), (4, 2, True)])
@pytest.mark.parametrize("rows", [3, 40], ids=["packed-rows", "gemm-rows"])
@pytest.mark.parametrize("forked", [False, True], ids=["plain", "forked"])
def test_matches_the_per_layer_path(heads, kv_heads, bias, rows, forked, monkeypatch):
    tok = tiny_tokenizer()
    model = _model(len(tok), heads=heads, kv_heads=kv_heads, bias=bias, seed=rows + heads)
    g = torch.Generator().manual_seed(rows)
    special = set(tok.all_special_ids) | set(tok.convert_tokens_to_ids(list(TAGS)))
    ok = torch.tensor([t for t in range(len(tok)) if t not in special])
    prompts = [ok[torch.randint(len(ok), (int(torch.randint(2, 9, (1,), generator=g)),),
                                generator=g)].tolist() for _ in range(rows)]
    got = _run(model, tok, prompts, forked, True, monkeypatch)
    want = _run(model, tok, prompts, forked, False, monkeypatch)
    for (t1, lp1), (t2, lp2) in zip(got, want):
        assert t1 == t2
        nan = lambda lp: torch.tensor([float("nan") if v is None else v for v in lp])  # noqa: E731
        torch.testing.assert_close(nan(lp1), nan(lp2), rtol=0, atol=2e-5, equal_nan=True)


def test_bad_arguments_name_the_problem():
    f = _ext._C.llama_layers
    x, cs = torch.zeros(2, 8), torch.zeros(2, 4)
    kw = dict(weights=[], biases=[], norms=[], num_heads=2, num_kv_heads=2, head_dim=4,
              intermediate_size=8, eps=1e-5, k_caches=[torch.zeros(1, 2, 4, 4)], v_caches=[],
              slots=torch.zeros(2, dtype=torch.long), plan=[], max_item_parts=1, scale=0.5,
              keep=None)
    with pytest.raises(ValueError, match="per layer 4 weights"):
        f(x, cs, cs, **kw)
    kw.update(k_caches=[], v_caches=[])
    with pytest.raises(ValueError, match="12 tensors"):
        f(x, cs, cs, **kw)
    kw.update(plan=[torch.zeros(1, dtype=torch.int32)] * 12)
    with pytest.raises(ValueError, match=r"x must be fp32 \[T, H\]"):
        f(x.double(), cs, cs, **kw)
    assert torch.equal(f(x, cs, cs, **kw), x)  # no layers: x itself


@pytest.mark.parametrize("rows", [12, 40])
def test_gemm_panels_through_the_engine(rows, monkeypatch):
    """12 or 40 rows on an AVX-512 CPU read GEMM-panel copies of the weights: the same tokens and
    log-probs as the weights themselves through torch's GEMM (decode_weights="plain"), and the
    copies are re-made after an in-place weight change (a trainer's optimizer step)."""
    import importlib

    lin = importlib.import_module("npr.ops.linear")
    if not lin.gemm_panels_available():
        pytest.skip("the GEMM-panel kernel needs AVX-512")
    tok = tiny_tokenizer()
    model = _model(len(tok), heads=4, kv_heads=2, bias=True, seed=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 40, (5,), generator=g).tolist() for _ in range(rows)]
    sp = npr.SamplingParams(temperature=0, parallel="off", max_new_tokens=10)

    def run(decode_weights: str) -> list:
        eng = npr.Engine(model, tok, block_size=4, kv_cache_tokens=4096, max_rows=64,
                         decode_weights=decode_weights)
        outs = eng.generate(input_ids=prompts, sampling_params=sp)
        return [(o.outputs[0].token_ids, torch.tensor(o.outputs[0].logprobs)) for o in outs]

    packs = []
    real = npr.ops.pack_gemm_weight
    monkeypatch.setattr(npr.ops, "pack_gemm_weight", lambda w: packs.append(1) or real(w))
    for _ in range(2):
        got, want = run("auto"), run("plain")
        assert packs, "no GEMM-panel copy was made"
        for (t1, lp1), (t2, lp2) in zip(got, want):
            assert t1 == t2
            torch.testing.assert_close(lp1, lp2, rtol=0, atol=2e-5)
        packs.clear()
        with torch.no_grad():  # in place, as an optimizer step: the copies must follow
            model.layers[0].gate_up_weight.mul_(1.5)
            model.head_weight().mul_(0.7)
