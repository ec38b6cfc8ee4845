"""Tag tokens on a real tokenizer (SmolLM2's, built from its GGUF file)."""
from __future__ import annotations

import pytest
import torch

import npr
from npr.models.config import ModelConfig
from npr.models.llama import LlamaDecoder
from npr.tags import PLAN_OPEN, STEP_CLOSE, STEP_OPEN, TAGS
from npr.tokenizer import add_tag_tokens, step_label_ids, tag_ids

VOCAB = 49152
TEXT = ("Let me think. <guideline><plan>1: add</plan><plan>2: check</plan></guideline>"
        "<step>1: 2+3=5</step><step>2: 5-3=2 ok</step><takeaway>It is 5.</takeaway> "
        "So the answer is \\boxed{5}.")


def _tiny_npr_model(tied: bool, seed: int = 0) -> LlamaDecoder:
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=tied)
    model = LlamaDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tok(smollm2_tokenizer_dir):
    return npr.load_tokenizer(smollm2_tokenizer_dir)  # a fresh, unmodified copy per test


def test_tags_become_single_tokens_and_round_trip(tok):
    assert len(tok) == VOCAB
    with pytest.raises(KeyError, match="add_tag_tokens"):
        tag_ids(tok)
    pieces = {t: tok.encode(t, add_special_tokens=False) for t in TAGS}
    assert all(len(p) > 1 for p in pieces.values())  # the base vocab splits every tag
    ids = add_tag_tokens(tok)
    assert sorted(ids.values()) == list(range(VOCAB, VOCAB + 8)) and len(tok) == VOCAB + 8
    assert ids == tag_ids(tok)
    for tag, i in ids.items():
        assert tok.encode(tag, add_special_tokens=False) == [i]
        assert tag in tok.all_special_tokens
    enc = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(enc) == TEXT
    assert sum(i in ids.values() for i in enc) == sum(TEXT.count(t) for t in TAGS) == 12
    # idempotent
    assert add_tag_tokens(tok) == ids and len(tok) == VOCAB + 8
    assert tok.encode(TEXT, add_special_tokens=False) == enc


def test_step_labels_are_the_in_context_tokens(tok):
    ids = add_tag_tokens(tok)
    for k in (1, 2, 3, 10):
        label = step_label_ids(tok, k)
        assert tok.decode(label) == f"{k}:"
        for tag in (STEP_OPEN, PLAN_OPEN):
            enc = tok.encode(f"{tag}{k}: text{STEP_CLOSE}", add_special_tokens=False)
            assert enc[: 1 + len(label)] == [ids[tag], *label]
    with pytest.raises(ValueError, match=">= 1"):
        step_label_ids(tok, 0)


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_mean_of_piece_rows(tok, tied):
    pieces = {t: tok.encode(t, add_special_tokens=False) for t in TAGS}
    model = _tiny_npr_model(tied)
    emb0, head0 = model.embed_tokens.detach().clone(), model.head_weight().detach().clone()
    ids = add_tag_tokens(tok, model)
    assert model.config.vocab_size == VOCAB + 8 and model.embed_tokens.shape[0] == VOCAB + 8
    assert (model.lm_head is None) == tied
    for tag, i in ids.items():
        mean_emb, mean_head = emb0[pieces[tag]].mean(0), head0[pieces[tag]].mean(0)
        torch.testing.assert_close(model.embed_tokens[i], mean_emb, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.head_weight()[i], mean_head, rtol=0, atol=1e-6)
    assert torch.equal(model.embed_tokens[:VOCAB], emb0)
    assert torch.equal(model.head_weight()[:VOCAB], head0)
    # the tags now run through the model as single tokens
    with torch.inference_mode():
        logits = model(torch.tensor([tok.encode(TEXT, add_special_tokens=False)]))
    assert logits.shape[-1] == VOCAB + 8 and torch.isfinite(logits).all()
    # idempotent: a second call changes nothing
    after = [t.detach().clone() for t in (model.embed_tokens, model.head_weight())]
    assert add_tag_tokens(tok, model) == ids
    assert torch.equal(model.embed_tokens, after[0]) and torch.equal(model.head_weight(), after[1])


def test_tokenizer_with_tags_and_fresh_model(tok):
    """A tokenizer saved with the tags meets the original model: rows still come from the
    pieces the base vocabulary makes of each tag."""
    add_tag_tokens(tok)
    reference = _tiny_npr_model(tied=False, seed=3)
    fresh_tok = npr.load_tokenizer(tok.name_or_path)  # original again
    add_tag_tokens(fresh_tok, reference)
    model = _tiny_npr_model(tied=False, seed=3)
    ids = add_tag_tokens(tok, model)  # tok already has the tags
    assert torch.equal(model.embed_tokens, reference.embed_tokens)
    assert torch.equal(model.lm_head, reference.lm_head)
    assert ids == tag_ids(fresh_tok)


def test_transformers_model_is_resized_too(tok):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    pieces = {t: tok.encode(t, add_special_tokens=False) for t in TAGS}
    emb0 = hf.get_input_embeddings().weight.detach().clone()
    head0 = hf.get_output_embeddings().weight.detach().clone()
    ids = add_tag_tokens(tok, hf)
    emb, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == VOCAB + 8
    for tag, i in ids.items():
        torch.testing.assert_close(emb[i], emb0[pieces[tag]].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(head[i], head0[pieces[tag]].mean(0), rtol=0, atol=1e-6)
