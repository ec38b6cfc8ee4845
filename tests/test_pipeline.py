"""The base model's pretraining and the stages of npr.train.pipeline on a tiny model: configs,
`npr train STAGE`, checkpoints that npr and transformers load, stage 2's kept trajectories and
resume, evaluation metrics on known outputs."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

import npr
from npr.tasks import multiples as mt
from npr.tasks.evaluate import EvalItem, markdown_table, summarize
from npr.train.config import ConfigError
from npr.train.pipeline import STAGES, resolve_model, stage_config
from npr.train.pretrain import PretrainConfig, is_done, pretrain

TASK = "multiples:k=2,n=1"
TINY = dict(task=TASK, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
            intermediate_size=64, batch_size=4, warmup_steps=2)
RL = {"rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 24},
      "train": {"steps": 1, "micro_batch_tokens": 512, "progress": False, "plot": False},
      "task": {"spec": TASK}}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("pipeline") / "base")
    return pretrain(PretrainConfig(steps=4, **TINY), out, progress=False)


def _hf_load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_pretrain_writes_a_model_both_loaders_read(base, tmp_path):
    assert is_done(base)
    model, tok = npr.load_model(base), npr.load_tokenizer(base)
    hf = _hf_load(base)
    ids = torch.tensor([tok.encode(mt.prompt_text("a=7*1 b=3*1"), add_special_tokens=False)])
    ref = hf(ids).logits
    assert torch.allclose(model(ids), ref, atol=1e-4, rtol=1e-4)
    with open(os.path.join(base, "pretrain.json")) as f:
        assert json.load(f)["config"]["steps"] == 4
    # A finished folder is kept as it is.
    mtime = os.path.getmtime(os.path.join(base, "model.safetensors"))
    assert pretrain(PretrainConfig(steps=4, **TINY), base, progress=False) == base
    assert os.path.getmtime(os.path.join(base, "model.safetensors")) == mtime


def test_pretraining_learns(tmp_path):
    torch.set_num_threads(1)
    out = pretrain(PretrainConfig(steps=40, lr=1e-2, **{**TINY, "batch_size": 8}),
                   str(tmp_path / "b"), progress=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_pretrain_config_is_validated():
    with pytest.raises(ValueError, match="p_parallel"):
        PretrainConfig(p_parallel=0.8, p_flawed=0.5)
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)


def test_stage_configs_are_what_the_stages_are():
    z = stage_config("zero")
    assert (z.stage, z.algo.preset, z.rollout.parallel, z.reward.kind) == ("zero", "dapo", "off", "stage1")
    p = stage_config("papo")
    assert (p.algo.preset, p.rollout.parallel, p.reward.kind) == ("papo", "native", "stage3")
    s = stage_config("sr", overrides=["train.steps=3"])
    assert (s.algo.preset, s.rollout.parallel, s.train.steps) == ("papo", "off", 3)
    b = stage_config("beta", overrides=["sample.tries=3"])
    assert b.model.add_tags and b.sample.tries == 3
    with pytest.raises(ConfigError, match="rollout.parallel"):
        stage_config("zero", overrides=["rollout.parallel=native"])
    with pytest.raises(ConfigError, match="rollout.parallel"):
        stage_config("sr", overrides=["rollout.parallel=native"])
    with pytest.raises(ConfigError, match="algo.preset"):
        stage_config("papo", overrides=["algo.preset=dapo"])
    with pytest.raises(ConfigError, match="add_tags"):
        stage_config("beta", overrides=["model.add_tags=false"])
    with pytest.raises(ConfigError, match="sample.tries"):
        stage_config("beta", overrides=["sample.tries=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        stage_config("zero", overrides=["task.nope=1"])
    with pytest.raises(ConfigError, match="unknown stage"):
        stage_config("omega")
    with pytest.raises(FileNotFoundError, match="no such"):
        resolve_model("/nonexistent/stage")


def _toml(d: dict) -> str:
    """Top-level keys and one level of [section] tables of scalars, as TOML."""
    top = [f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, dict)]
    out = "\n".join(top) + "\n"
    for k, v in d.items():
        if isinstance(v, dict):
            out += f"[{k}]\n" + "".join(f"{kk} = {json.dumps(vv)}\n" for kk, vv in v.items())
    return out


def _write_config(path, d: dict) -> str:
    path.write_text(_toml(d))
    return str(path)


def test_the_four_stages_from_config_files(base, tmp_path):
    """npr train zero -> beta -> papo, and sr: each reads the previous stage's folder, writes a
    checkpoint that npr.load_model and transformers load; stage 2 adds the tags."""
    root = tmp_path
    zero = _write_config(root / "zero.toml", {**RL, "model": {"path": base},
                                              "train": {**RL["train"], "out_dir": str(root / "zero")}})
    assert STAGES["zero"](zero, []) == 0
    beta = _write_config(root / "beta.toml", {
        "model": {"path": base}, "task": {"spec": TASK}, "batch_sequences": 2,
        "train": {"out_dir": str(root / "beta"), "progress": False, "plot": False,
                  "micro_batch_tokens": 512},
        "sample": {"model": str(root / "zero"), "problems": 4, "tries": 2, "per_round": 2,
                   "max_new_tokens": 24, "require_correct": False}})
    kept = root / "beta" / "kept.jsonl"
    os.makedirs(root / "beta")
    # The toy model cannot write the format yet: stage 2 is given the kept trajectories
    # (what rejection sampling writes; tested on its own below).
    p = mt.parse_problem("a=7*1 b=3*1")
    kept.write_text(json.dumps({"prompt": mt.prompt_text(p.text), "response": mt.parallel_solution(p),
                                "answer": p.answer, "tries": 1, "correct": True}) + "\n"
                    + json.dumps({"prompt": mt.prompt_text("a=2*1 b=9*1"),
                                  "response": mt.parallel_solution(mt.parse_problem("a=2*1 b=9*1")),
                                  "answer": "11", "tries": 2, "correct": True}) + "\n")
    assert STAGES["beta"](beta, []) == 0
    beta_ckpt = resolve_model(str(root / "beta"))
    tok = npr.load_tokenizer(beta_ckpt)
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in npr.format.TAGS)
    assert npr.load_model(beta_ckpt).config.vocab_size == len(tok)
    for stage in ("papo", "sr"):
        cfg = _write_config(root / f"{stage}.toml", {
            **RL, "model": {"path": str(root / "beta")},
            "train": {**RL["train"], "out_dir": str(root / stage)}})
        assert STAGES[stage](cfg, []) == 0
        final = resolve_model(str(root / stage))
        hf = _hf_load(final)
        ours = npr.load_model(final)
        ids = torch.tensor([[1, 5, 9, 12]])
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        with open(os.path.join(final, "trainer_state.json")) as f:
            assert json.load(f)["stage"] == stage
    # A finished stage run again does nothing and keeps its checkpoint.
    before = resolve_model(str(root / "papo"))
    assert STAGES["papo"](str(root / "papo.toml"), []) == 0
    assert resolve_model(str(root / "papo")) == before


def test_rejection_sampling_keeps_only_correct_and_exact(base, tmp_path, monkeypatch):
    """With a sampler that writes a known mix of answers, the kept rows are exactly the first
    correct and exactly formatted sample of each problem, and kept.jsonl is written once."""
    from npr.train import pipeline

    cfg = stage_config("beta", base={
        "model": {"path": base}, "task": {"spec": TASK},
        "train": {"out_dir": str(tmp_path / "beta"), "progress": False, "plot": False},
        "sample": {"model": base, "problems": 6, "tries": 4, "per_round": 2, "max_new_tokens": 8}})
    src, _ = pipeline._prompts_and_checker(cfg)
    golds = [src(d) for d in range(6)]
    calls = []

    class FakeEngine:
        def __init__(self, *a, **k):
            pass

        def generate(self, prompts, params):
            calls.append(len(prompts))
            outs = []
            for text, sp in zip(prompts, params):
                p = mt.parse_problem(text.split("\n")[1])
                rng = random.Random(text + str(len(calls)))
                cands = []
                for _ in range(sp.n):
                    u = rng.random()
                    good = mt.parallel_solution(p)
                    cands.append(good if u < 0.3 else good.replace("<takeaway>", "") if u < 0.6
                                 else good.replace(f"{{{p.answer}}}", "{99}"))
                outs.append(type("O", (), {"outputs": [type("C", (), {"text": c})() for c in cands]}))
            return outs

    monkeypatch.setattr(npr, "Engine", FakeEngine)
    kept, stats = pipeline.rejection_sample(cfg, progress=False)
    assert stats["samples"] <= 6 * 4 and len(calls) <= 2
    for row in kept:
        assert npr.format.format_score(row["response"]) == 0.0
        assert npr.format.extract_answer(row["response"]) == row["answer"]
        assert row["answer"] in {g.answer for g in golds} and 1 <= row["tries"] <= 4
    assert stats["kept"] == len(kept) == stats["kept_correct"]


def test_summarize_counts_forks_branches_and_format():
    from npr.tasks.tokenizer import build_tokenizer
    from npr.tokenizer import add_tag_tokens

    tok = build_tokenizer()
    tags = add_tag_tokens(tok)
    probs = [mt.parse_problem("a=7*2 b=3*3 c=2*2"), mt.parse_problem("a=4*1 b=5*5")]
    items = [EvalItem(mt.prompt_text(p.text), p.answer, p.text) for p in probs]

    def out(p, text, forks):
        prompt = tok.encode(mt.prompt_text(p.text), add_special_tokens=False)
        c = type("C", (), {"text": text, "token_ids": tok.encode(text, add_special_tokens=False),
                           "structure_valid": True, "stats": {"forks": forks}})()
        return c, prompt

    outs = []
    p0, p1 = probs
    samples = [[mt.parallel_solution(p0), mt.sequential_solution(p0)],
               [mt.parallel_solution(p1).replace(p1.answer + "}", "0}"), mt.parallel_solution(p1)]]
    for p, texts in zip(probs, samples):
        cs = [out(p, t, 1 if "<guideline>" in t else 0) for t in texts]
        outs.append(type("O", (), {"outputs": [c for c, _ in cs], "prompt_token_ids": cs[0][1]})())
    r = summarize(outs, items, k=2, tag_ids=tags)
    assert r.accuracy_avg == 3 / 4 and r.accuracy_best == 1.0
    assert r.format_rate == 3 / 4 and r.parallel_rate == 3 / 4
    assert r.branches_per_fork == (3 + 2 + 2) / 3
    plain = summarize(outs, items, k=2, tag_ids=None)
    assert plain.parallel_rate == 0.0 and plain.branches_per_fork == 0.0
    table = markdown_table([("x", r)])
    assert "| x | 75.0% | 100.0% | 75.0% | 75.0% | 2.33 |" in table
    with pytest.raises(ValueError, match="samples each"):
        summarize(outs, items, k=3, tag_ids=tags)
