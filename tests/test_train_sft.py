"""SFT under the parallel layout: which tokens are scored, the loss, and that it learns."""
from __future__ import annotations

import pytest
import torch

from npr import format as fmt
from npr.train.config import SFTConfig, load_config
from npr.train.logprobs import pack, token_logprobs
from npr.train.sft import SFTExample, SFTTrainer, encode_example, injected_mask, sft_item, sft_loss
from tiny import tiny_model, tiny_tokenizer

RESP = ("<guideline>\n<plan>1: add a</plan>\n<plan>2: add b</plan></guideline>\n"
        "<step>1: 3+4=7</step>\n<step>2: 5+6=11</step>\n<takeaway>7+11=18</takeaway>"
        " so \\boxed{18}</s>")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_encode_example_and_scored_tokens(tok):
    from npr.tokenizer import step_label_ids, tag_ids

    ex = encode_example(tok, "sum 3+4 and 5+6", RESP)
    tags = tag_ids(tok)
    labels = [step_label_ids(tok, k) for k in range(1, 9)]
    ids, lay, mask = sft_item(ex, tags, labels)
    assert lay.branches == [2]
    id2tag = {v: k for k, v in tags.items()}
    P = ex.prompt_len
    assert not any(mask[:P])
    for i in range(P, len(ids)):
        tag = id2tag.get(ids[i])
        if tag in ("<step>", "<takeaway>"):
            assert not mask[i], tag
        elif tag is not None:
            assert mask[i], tag  # the model's own tags learn
        if i > 0 and id2tag.get(ids[i - 1]) == "<step>":
            assert not mask[i] and ids[i:i + len(labels[0])] in (labels[0], labels[1])
    assert tok.decode(ids[P:], skip_special_tokens=False).replace("\n", "") == RESP.replace("\n", "")
    pack([(ids, lay, mask)])  # scores nothing a sibling predicts
    inj = injected_mask(ids, lay, tags, labels)
    assert sum(inj) == 2 * (1 + len(labels[0])) + 1
    bad = list(ids)
    j = ids.index(tags["<step>"])
    bad[j + 1] = tok.get_vocab()["x"]
    with pytest.raises(ValueError, match="does not start with <step> and its label"):
        injected_mask(bad, fmt.layout(bad, tags, prompt_len=P), tags, labels)
    with pytest.raises(fmt.FormatError):
        sft_item(encode_example(tok, "q", "<guideline><plan>1: a</plan></guideline> oops"), tags, labels)
    with pytest.raises(ValueError, match="prompt_len"):
        SFTExample((1, 2), 2)


def test_sft_loss_is_the_global_token_mean_nll(tok):
    model = tiny_model(len(tok), seed=1)
    exs = [encode_example(tok, f"q{i}", RESP.replace("18", str(10 + i))) for i in range(3)]
    from npr.tokenizer import step_label_ids, tag_ids

    items = [sft_item(e, tag_ids(tok), [step_label_ids(tok, k) for k in range(1, 9)]) for e in exs]
    b = pack(items)
    lp = token_logprobs(model, b)
    want = -float(lp[b.loss_mask].mean().detach())
    N = b.num_scored
    parts = [sft_loss(model, pack([it]), 1.0 / N)[0] for it in items]
    assert float(sum(p.detach() for p in parts)) == pytest.approx(want, rel=1e-5)


def test_sft_trainer_learns(tok, tmp_path):
    model = tiny_model(len(tok), seed=2)
    exs = [encode_example(tok, f"q{i % 3}", RESP) for i in range(8)]
    exs.append(encode_example(tok, "plain", "just text \\boxed{1}</s>", parallel=False))
    cfg = load_config(SFTConfig, overrides=[
        f"train.out_dir='{tmp_path}'", "train.progress=false", "train.plot=false",
        "batch_sequences=3", "epochs=4", "optim.lr=3e-3", "train.micro_batch_tokens=120"])
    t = SFTTrainer(cfg, model, tok, exs)
    hist = t.run()
    assert len(hist) == 4 * 3
    assert hist[-1]["nll"] < 0.6 * hist[0]["nll"], [h["nll"] for h in hist]
    assert all(h["loss"] == pytest.approx(h["nll"], rel=1e-5) for h in hist)
    # resumable: a finished run continues from its checkpoint and does nothing
    assert SFTTrainer(cfg, tiny_model(len(tok), seed=2), tok, exs).run() == []
