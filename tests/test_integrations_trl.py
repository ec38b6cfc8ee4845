"""Real TRL runs (GRPOTrainer / RLOOTrainer, 2 steps each) with npr rollouts on a tiny local
model, plain and native parallel: the engine's weights follow the trainer's after every step,
and TRL's recomputed log-probs equal the engine's on every sampled token (1e-4, fp32)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[trl]' "
                                         "(CI installs it)")

import npr  # noqa: E402
from npr import format as fmt  # noqa: E402
from npr.bench.forcing import ForcedStructure  # noqa: E402
from npr.integrations import trl as ntrl  # noqa: E402
from test_integrations_helpers import RawRecorder, hf_folder, labels_of  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(str(tmp_path_factory.mktemp("tiny_llama_trl")), seed=7)


def dataset():
    import datasets

    return datasets.Dataset.from_dict({"prompt": ["ab", "hello w", "xyz 12", "q", "2+2=",
                                                  "abc de", "77", "k"]})


def reward(completions, npr_text, npr_structure_valid, **kwargs):
    assert all(isinstance(t, str) for t in npr_text)
    return [float(t.count("e") + t.count("a")) for t in npr_text]


class Probe:
    """Watches a run: each rollout (weights after the sync, the rows it returned, the raw rows
    the engine decoded with) and each TRL log-prob pass."""

    def __init__(self, engine, rollout_func):
        self.engine, self.rollout_func = engine, rollout_func
        self.rollouts: list[dict] = []
        self.recorders: list[list[RawRecorder]] = []
        self.passes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.engine_lag: list[float] = []

    def rollout(self, prompts, trainer):
        self.recorders.append([])
        out = self.rollout_func(prompts, trainer)
        self.after_rollout(trainer, out)
        return out

    def after_rollout(self, trainer, out):
        model = trainer.accelerator.unwrap_model(trainer.model)
        mine = dict(model.named_parameters())
        eng = self.engine.model.hf_weight_map()
        self.engine_lag.append(max(float((eng[n] - p.detach()).abs().max())
                                   for n, p in mine.items()))
        self.weights.append({n: p.detach().clone() for n, p in mine.items()})
        self.rollouts.append(out)

    def spy(self, trainer):
        orig = trainer._get_per_token_logps_and_entropies

        def spied(model, input_ids, attention_mask, logits_to_keep, *a, **k):
            res = orig(model, input_ids, attention_mask, logits_to_keep, *a, **k)
            self.passes.append((input_ids.clone(), attention_mask.clone(), res[0].detach().clone()))
            return res

        trainer._get_per_token_logps_and_entropies = spied

    def processors(self, inner_of):
        def fn(prompt_ids):
            rec = RawRecorder(inner_of(prompt_ids))
            self.recorders[-1].append(rec)
            return [rec]
        return fn


def compare(probe, tag_ids, *, pass_for_step, parallel):
    """TRL's log-probs of step s (its first pass after rollout s) vs the rollout's log-probs and
    vs the engine's own decode-time raw rows (parallel runs)."""
    worst, worst_engine, n = 0.0, 0.0, 0
    for s, out in enumerate(probe.rollouts):
        ids, am, logps = probe.passes[pass_for_step(s)]
        rows = {tuple(p + c): k for k, (p, c) in enumerate(zip(out["prompt_ids"],
                                                               out["completion_ids"]))}
        assert len(rows) >= 2
        for b in range(ids.shape[0]):
            k = rows[tuple(ids[b, am[b].bool()].tolist())]
            comp, lp, env = out["completion_ids"][k], out["logprobs"][k], out["env_mask"][k]
            prompt = out["prompt_ids"][k]
            for c, (v, m) in enumerate(zip(lp, env)):
                if m:
                    worst = max(worst, abs(float(logps[b, c]) - v))
                    n += 1
                else:
                    assert float(logps[b, c]) == 0.0
            if parallel:  # the engine's decode-time numbers, independent of npr's layout code
                full = prompt + comp
                mask = fmt.layout(full, tag_ids, prompt_len=len(prompt)).mask()
                rec = next(r for r in probe.recorders[s] if r.inner.prompt_len == len(prompt)
                           and any(key[:len(prompt)] == tuple(prompt) for key in r.rows))
                for c, m in enumerate(env):
                    if m:
                        raw = float(rec.raw(full, mask, len(prompt) + c)[comp[c]])
                        worst_engine = max(worst_engine, abs(float(logps[b, c]) - raw))
    return worst, worst_engine, n


def grpo_args(tmp_path, temperature=1.0, **kw):
    return trl.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2,
                          per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=kw.pop("max_completion_length", 160),
                          learning_rate=1e-2, beta=0.0, temperature=temperature, use_cpu=True,
                          bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                          seed=0, disable_tqdm=True, **kw)


def check_weights_follow(probe, trainer, rollouts):
    assert len(probe.rollouts) == 2
    assert probe.engine_lag == [0.0, 0.0]  # engine == trainer right after each step's sync
    moved = max(float((probe.weights[1][n] - probe.weights[0][n]).abs().max())
                for n in probe.weights[0])
    assert moved > 1e-3  # the first optimizer step changed the weights the second rollout used
    rollouts.sync_from(trainer)  # after the last step too
    model = trainer.accelerator.unwrap_model(trainer.model)
    eng = probe.engine.model.hf_weight_map()
    assert all(torch.equal(eng[n], p.detach()) for n, p in model.named_parameters())


def test_grpo_plain_rollouts(folder, tmp_path):
    """parallel='off' with a plain GRPOTrainer: causal rollouts, engine log-probs at T=0.7."""
    engine = npr.Engine(folder)
    rf = ntrl.make_rollout_func(engine, parallel="off")
    probe = Probe(engine, rf)
    trainer = trl.GRPOTrainer(model=folder, reward_funcs=reward, args=grpo_args(
        tmp_path, temperature=0.7, max_completion_length=48), train_dataset=dataset(),
        processing_class=engine.tokenizer, rollout_func=probe.rollout)
    probe.spy(trainer)
    trainer.train()
    check_weights_follow(probe, trainer, rf.rollouts)
    worst, _, n = compare(probe, engine.tag_ids, pass_for_step=lambda s: s, parallel=False)
    assert n > 100 and worst < 1e-4, (worst, n)


@pytest.mark.parametrize("logprobs_mode", ["raw", "processed"])
def test_grpo_native_parallel_rollouts(folder, tmp_path, logprobs_mode):
    engine = npr.Engine(folder)
    tok, labels = engine.tokenizer, labels_of(engine.tokenizer)

    def forcer(prompt_ids):
        return ForcedStructure(engine.tag_ids, labels, tok.eos_token_id, len(prompt_ids),
                               branches=[3, 2], step_tokens=lambda b, k: 2 + k + b,
                               prefix_tokens=0, plan_tokens=2, takeaway_tokens=3, final_tokens=3)

    probe = Probe(engine, None)
    rf = ntrl.make_rollout_func(engine, logits_processors=probe.processors(forcer),
                                logprobs_mode=logprobs_mode)
    probe.rollout_func = rf
    trainer = ntrl.ParallelGRPOTrainer(model=folder, reward_funcs=reward,
                                       args=grpo_args(tmp_path), train_dataset=dataset(),
                                       processing_class=tok, rollout_func=probe.rollout)
    probe.spy(trainer)
    trainer.train()
    check_weights_follow(probe, trainer, rf.rollouts)
    for out in probe.rollouts:
        assert all(out["npr_structure_valid"])
        assert all(t.count("<step>") == 5 for t in out["npr_text"])
        assert all(sum(m) < len(m) for m in out["env_mask"])  # injected tokens carry no loss
    worst, worst_engine, n = compare(probe, engine.tag_ids, pass_for_step=lambda s: s,
                                     parallel=True)
    assert worst_engine < 1e-4 and n > 300, (worst_engine, n)
    if logprobs_mode == "raw":
        assert worst < 1e-4, worst
    else:  # processed: the forced distribution, not the model's
        assert worst > 1e-2


def test_rloo_native_parallel_rollouts(folder, tmp_path):
    engine = npr.Engine(folder)
    tok, labels = engine.tokenizer, labels_of(engine.tokenizer)

    def forcer(prompt_ids):
        return ForcedStructure(engine.tag_ids, labels, tok.eos_token_id, len(prompt_ids),
                               branches=[4], step_tokens=lambda b, k: 1 + 2 * k, prefix_tokens=0)

    probe = Probe(engine, None)
    args = trl.RLOOConfig(output_dir=str(tmp_path / "out"), max_steps=2,
                          per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=160, learning_rate=1e-2, beta=0.0,
                          use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                          logging_steps=1, seed=0, disable_tqdm=True)
    trainer = ntrl.ParallelRLOOTrainer(model=folder, reward_funcs=reward, args=args,
                                       train_dataset=dataset(), processing_class=tok,
                                       engine=engine, logits_processors=probe.processors(forcer),
                                       logprobs_mode="raw")
    ro = trainer._npr_rollouts
    orig = ro.generate

    def generate(prompt_ids, tr):
        probe.recorders.append([])
        out = orig(prompt_ids, tr)
        probe.after_rollout(tr, out)
        return out

    ro.generate = generate
    probe.spy(trainer)
    trainer.train()
    check_weights_follow(probe, trainer, ro)
    # RLOO: per step one no-grad pass (old log-probs, right after the rollout), one with grad
    assert len(probe.passes) == 4
    worst, worst_engine, n = compare(probe, engine.tag_ids, pass_for_step=lambda s: 2 * s,
                                     parallel=True)
    assert worst < 1e-4 and worst_engine < 1e-4 and n > 200, (worst, worst_engine, n)


def test_misuse_is_a_clear_error(folder, tmp_path):
    engine = npr.Engine(folder)
    with pytest.raises(ValueError, match="rollout_func"):
        ntrl.ParallelGRPOTrainer(model=folder, reward_funcs=reward, args=grpo_args(tmp_path),
                                 train_dataset=dataset(), processing_class=engine.tokenizer)
    trainer = trl.GRPOTrainer(model=folder, reward_funcs=reward, args=grpo_args(tmp_path),
                              train_dataset=dataset(), processing_class=engine.tokenizer,
                              rollout_func=ntrl.make_rollout_func(engine))
    with pytest.raises(TypeError, match="ParallelGRPOTrainer"):
        trainer.train()  # a parallel rollout into a causal log-prob pass
    with pytest.raises(ValueError, match="min_p"):
        bad = trl.GRPOTrainer(model=folder, reward_funcs=reward,
                              args=grpo_args(tmp_path, min_p=0.1), train_dataset=dataset(),
                              processing_class=engine.tokenizer,
                              rollout_func=ntrl.make_rollout_func(engine, parallel="off"))
        bad.train()
    with pytest.raises(ValueError, match="logprobs_mode"):
        ntrl.make_rollout_func(engine, logprobs_mode="logits")
    reg = ntrl.LayoutRegistry()
    with pytest.raises(KeyError, match="not produced by an npr rollout"):
        ntrl.layout_tensors(reg, torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long), 2)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    """docs/integrations.md's TRL example, exactly as written (the README section)."""
    text = (ROOT / "docs" / "integrations.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__main__"}
    exec(compile(code, "docs/integrations.md", "exec"), scope)
    logs = [h for h in scope["trainer"].state.log_history if "reward" in h]
    assert [h["step"] for h in logs] == [1, 2]
