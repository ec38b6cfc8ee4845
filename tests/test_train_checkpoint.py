"""Checkpoints: an HF folder transformers and npr.load_model both load (tag tokens included),
and a resumed run that continues exactly like an uninterrupted one."""
from __future__ import annotations

import os

import pytest
import torch

import npr
from npr.tags import TAGS
from npr.train import checkpoint as ckpt
from npr.train.config import RLConfig, load_config
from npr.train.data import Prompt, ShuffledPrompts
from npr.train.rewards import Scored
from npr.train.rl import RLTrainer
from test_train_rollout import forcers
from tiny import tiny_model, tiny_tokenizer


class CharReward:
    def __call__(self, texts, golds):
        return [Scored(reward=1.0 if sum(map(ord, t)) % 3 == 0 else -1.0, correct=False,
                       format_ok=True) for t in texts]


def trainer(out_dir, hidden=64, seed=3, **over):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=seed, layers=2, hidden=hidden, heads=2, kv_heads=1,
                       head_dim=32)
    make, _ = forcers(tok, max_n=3, blocks=2)
    o = {"train.out_dir": f"'{out_dir}'", "train.progress": "false", "train.plot": "false",
         "train.steps": "4", "train.save_every": "2", "rollout.prompts_per_step": "2",
         "rollout.samples_per_prompt": "3", "rollout.max_new_tokens": "150",
         "optim.lr": "0.01", "optim.warmup_steps": "3", "optim.schedule": "'cosine'", **over}
    cfg = load_config(RLConfig, overrides=[f"{k}={v}" for k, v in o.items()])
    prompts = ShuffledPrompts([Prompt(answer="1", text=f"r{i} ab"[: 2 + i % 4]) for i in range(5)])
    return RLTrainer(cfg, model, tok, CharReward(), prompts, processors=make)


class Killed(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    full = trainer(tmp_path / "full")
    want = full.run()
    assert [h["step"] for h in want] == [1, 2, 3, 4]

    def crash(step, m):
        if step == 2:
            raise Killed()

    t = trainer(tmp_path / "crash")
    with pytest.raises(Killed):
        t.run(on_step=crash)
    assert ckpt.latest_checkpoint(str(tmp_path / "crash")).endswith("step-000002")
    again = trainer(tmp_path / "crash", seed=99)  # fresh weights: the checkpoint's must win
    assert again.resumed_from and again.step == 2 and again.cursor == want[1]["cursor"]
    got = again.run()
    assert [h["step"] for h in got] == [3, 4]
    for g, w in zip(got, want[2:]):
        for k in ("loss", "grad_norm", "reward", "lr", "rollouts", "gen_tokens", "adv_abs_mean"):
            assert g[k] == w[k], (k, g[k], w[k])
    for (n, p), q in zip(full.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), n
    # the metrics file holds one line per step, the resumed ones replacing nothing twice
    from npr.train.metrics import read_jsonl

    assert [r["step"] for r in read_jsonl(os.path.join(tmp_path / "crash", "metrics.jsonl"))] == [
        1, 2, 3, 4]
    # a finished run resumed again does nothing
    assert trainer(tmp_path / "full").run() == []


def test_checkpoint_is_an_hf_folder_both_loaders_read(tmp_path):
    transformers = pytest.importorskip("transformers")
    t = trainer(tmp_path, **{"train.steps": "1"})
    t.run()
    path = ckpt.latest_checkpoint(str(tmp_path))
    assert sorted(f for f in os.listdir(path) if not f.startswith("tokenizer") and
                  f not in ("special_tokens_map.json", "chat_template.jinja")) == sorted([
        "config.json", "model.safetensors", "optimizer.pt", "rng.rank0.pt", "scheduler.pt",
        "trainer_state.json"])
    ids = torch.tensor([[5, 9, 14, 3, 7, 20]])
    want = t.model(ids).float()
    mine = npr.load_model(path)
    torch.testing.assert_close(mine(ids).float(), want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    torch.testing.assert_close(hf(ids).logits.float(), want, rtol=1e-4, atol=1e-4)
    tok = npr.load_tokenizer(path)
    for tag in TAGS:  # the tags are single special tokens of the saved tokenizer
        assert tok.encode(tag, add_special_tokens=False) == [t.tokenizer.get_vocab()[tag]]


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    trainer(tmp_path, **{"train.steps": "1"}).run()
    with pytest.raises(ckpt.CheckpointMismatch, match=r"another model: hidden_size=64 .*: 128"):
        trainer(tmp_path, hidden=128)
    with pytest.raises(ckpt.CheckpointMismatch, match="stage 'rl', this run is stage 'papo'"):
        trainer(tmp_path, **{"stage": "'papo'"})
    (tmp_path / "plain").mkdir()
    with pytest.raises(ckpt.CheckpointMismatch, match="not a trainer checkpoint"):
        ckpt.read_state(str(tmp_path / "plain"))
    # resume=false ignores it
    assert trainer(tmp_path, hidden=128, **{"train.resume": "false"}).step == 0


@pytest.mark.slow
def test_smollm2_with_tags_exports_to_transformers(tmp_path, smollm2_gguf, smollm2_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from npr.tokenizer import add_tag_tokens

    model = npr.load_model(smollm2_gguf)
    tok = npr.load_tokenizer(smollm2_tokenizer_dir)
    ids_map = add_tag_tokens(tok, model)
    ckpt.save_model(str(tmp_path), model, tok)
    text = "<guideline><plan>1: add</plan></guideline> 2+2"
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    assert ids_map["<guideline>"] in ids[0].tolist()
    with torch.no_grad():
        want = model(ids).float()
        again = npr.load_model(str(tmp_path))(ids).float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
        got = hf(ids).logits.float()
    torch.testing.assert_close(again, want)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok2.encode(text, add_special_tokens=False) == ids[0].tolist()
