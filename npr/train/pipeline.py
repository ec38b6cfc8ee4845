"""The three stages of spec/NPR.md §4 and the sequential-RL baseline, on npr.train's RL loop and SFT.

    zero  NPR-ZERO: DAPO from the instruction model, prompts that describe the format, plain
          decoding (parallel="off", tags as text), stage-1 reward (format penalty, else +-1).
    beta  NPR-BETA: rejection sampling from NPR-ZERO (up to sample.tries per problem; the first
          sample that is correct AND passes the format check exactly is kept), the eight tags
          added as special tokens to the ORIGINAL base model (rows = mean of the tag word's
          pieces), parallel SFT of it on the kept trajectories under the §2 layout.
    papo  NPR: PAPO from NPR-BETA, native parallel rollouts (invalid structures dropped),
          weights pushed to the engine after every update.
    sr    The sequential-RL baseline: the papo recipe and budget from the same start (NPR-BETA),
          sequential rollouts (plain decoding) and causal training.

`npr train STAGE --config FILE [section.key=value ...]` runs one stage (STAGES below, the entry
point npr.train.__main__ looks for). A config is the stage's RLConfig / SFTConfig (npr.train.config)
plus a [task] section (a synthetic task spec of npr.tasks, used when data.path is empty) and, for
beta, a [sample] section. model.path (and sample.model) may name a previous stage's out_dir: its
latest checkpoint is used. Each stage writes its own out_dir and, killed, resumes from its latest
checkpoint (beta: the kept trajectories are written once, kept.jsonl, then SFT resumes).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from npr.train.config import ConfigError, RLConfig, SFTConfig, load_config

STAGE_NAMES = ("zero", "beta", "papo", "sr")
KEPT_FILE = "kept.jsonl"
OnStep = Callable[[int, dict[str, float]], None]


@dataclass
class TaskSection:
    spec: str = "multiples"  # npr.tasks spec, e.g. "multiples:k=2-4,n=2-6"
    seed: int = 0            # training draws (held-out problems are never drawn)


@dataclass
class SampleSection:
    """Stage 2's rejection sampling."""

    model: str = ""          # NPR-ZERO: a checkpoint folder or the zero stage's out_dir
    problems: int = 128      # training problems sampled for (draws 0..problems-1)
    tries: int = 8           # K: samples per problem at most
    per_round: int = 2       # samples per unsolved problem per round
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    # False keeps format-exact samples even when wrong: only for toy smoke runs (npr demo
    # --quick), whose barely trained model rarely answers right; the method keeps correct ones.
    require_correct: bool = True

    def __post_init__(self) -> None:
        for k in ("problems", "tries", "per_round", "max_new_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"sample.{k}: must be >= 1, got {getattr(self, k)}")
        if not self.temperature > 0:
            raise ConfigError(f"sample.temperature: must be > 0, got {self.temperature}")


@dataclass
class ZeroConfig(RLConfig):
    stage: str = "zero"
    task: TaskSection = field(default_factory=TaskSection)


@dataclass
class PapoConfig(RLConfig):
    stage: str = "papo"
    task: TaskSection = field(default_factory=TaskSection)


@dataclass
class SRConfig(RLConfig):
    stage: str = "sr"
    task: TaskSection = field(default_factory=TaskSection)


@dataclass
class BetaConfig(SFTConfig):
    stage: str = "beta"
    task: TaskSection = field(default_factory=TaskSection)
    sample: SampleSection = field(default_factory=SampleSection)


# Each stage's defaults under the user's file: (config class, base dict, fixed keys).
_RL_STAGES: dict[str, tuple[type, dict[str, Any]]] = {
    "zero": (ZeroConfig, {"algo": {"preset": "dapo"}, "rollout": {"parallel": "off"},
                          "reward": {"kind": "stage1"}, "train": {"out_dir": "runs/zero"}}),
    "papo": (PapoConfig, {"algo": {"preset": "papo"}, "rollout": {"parallel": "native"},
                          "reward": {"kind": "stage3"}, "train": {"out_dir": "runs/papo"}}),
    "sr": (SRConfig, {"algo": {"preset": "papo"}, "rollout": {"parallel": "off"},
                      "reward": {"kind": "stage3"}, "train": {"out_dir": "runs/sr"}}),
}
_FIXED = {"zero": {("rollout", "parallel"): "off", ("reward", "kind"): "stage1"},
          "papo": {("rollout", "parallel"): "native", ("reward", "kind"): "stage3"},
          "sr": {("rollout", "parallel"): "off", ("reward", "kind"): "stage3"}}
BETA_BASE: dict[str, Any] = {"model": {"add_tags": True}, "train": {"out_dir": "runs/beta"}}


def stage_config(stage: str, path: str | None = None, overrides: Sequence[str] = (),
                 base: dict[str, Any] | None = None) -> Any:
    """The validated config of `stage`: its defaults, then `base`, the TOML file, overrides.
    Raises ConfigError when a key contradicts what the stage is (e.g. zero with parallel rollouts)."""
    from npr.train.config import _merge

    if stage == "beta":
        cfg = load_config(BetaConfig, path, overrides, base=_merge(BETA_BASE, base or {}))
        if not cfg.model.add_tags:
            raise ConfigError("model.add_tags: stage beta adds the tag tokens (must be true)")
        return cfg
    if stage not in _RL_STAGES:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_NAMES)})")
    cls, defaults = _RL_STAGES[stage]
    cfg = load_config(cls, path, overrides, base=_merge(defaults, base or {}))
    for (sec, key), want in _FIXED[stage].items():
        got = getattr(getattr(cfg, sec), key)
        if got != want:
            raise ConfigError(f"{sec}.{key}: stage {stage} needs {want!r}, got {got!r}")
    if stage in ("papo", "sr") and cfg.algo.preset != "papo":
        raise ConfigError(f"algo.preset: stage {stage} is the PAPO recipe, got {cfg.algo.preset!r}")
    return cfg


def resolve_model(path: str) -> str:
    """A model folder, or a stage out_dir -> its latest checkpoint folder."""
    from npr.train.checkpoint import latest_checkpoint

    if not path:
        raise ConfigError("model.path is required")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: a stage folder without a finished checkpoint "
                                    "(run that stage first)")
        return latest
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model folder or stage out_dir")
    return path


def _prompts_and_checker(cfg: Any, reward_checker: str | None = None) -> tuple[Any, Any]:
    """-> (prompt source, answer checker): data.path JSONL (checker from reward.checker, math
    by default for files) or the [task] section (exact match)."""
    from npr.train.data import ShuffledPrompts, load_jsonl
    from npr.train.rewards import make_checker

    if cfg.data.path:
        prompts = ShuffledPrompts(load_jsonl(cfg.data.path, cfg.data.template),
                                  seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        return prompts, make_checker(reward_checker or "math")
    from npr.tasks import TaskPrompts, get_task

    return TaskPrompts(get_task(cfg.task.spec), seed=cfg.task.seed), make_checker("exact")


def _load(path: str, cfg: Any, device: torch.device) -> tuple[Any, Any]:
    import npr
    from npr.tokenizer import add_tag_tokens

    model = npr.load_model(path, dtype=cfg.model.dtype, device=str(device))
    tok = npr.load_tokenizer(path)
    if cfg.model.add_tags:
        add_tag_tokens(tok, model)
    return model, tok


def run_rl_stage(cfg: Any, on_step: OnStep | None = None, ctx: Any = None,
                 processors: Any = None) -> str:
    """zero / papo / sr: RLTrainer from model.path; returns the final checkpoint folder.
    processors: npr.train.rl.ProcessorsFn (logits processors per request), e.g. a forced
    structure for smoke runs of a model that cannot write the format yet."""
    from npr.train.checkpoint import latest_checkpoint
    from npr.train.dist import init_distributed
    from npr.train.rewards import Stage1Reward, Stage3Reward
    from npr.train.rl import RLTrainer

    own_ctx = ctx is None
    ctx = ctx or init_distributed(cfg.dist.backend, cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    prompts, checker = _prompts_and_checker(cfg, cfg.reward.checker)
    try:
        model, tok = _load(resolve_model(cfg.model.path), cfg, ctx.device)
        reward = (Stage1Reward if cfg.reward.kind == "stage1" else Stage3Reward)(
            checker, max_branches=cfg.rollout.max_branches)
        RLTrainer(cfg, model, tok, reward, prompts, ctx=ctx, processors=processors).run(on_step)
    finally:
        if hasattr(checker, "close"):
            checker.close()
        if own_ctx:
            ctx.close()
    final = latest_checkpoint(cfg.train.out_dir)
    assert final is not None, "RLTrainer.run saves a checkpoint at the end"
    return final


# ----------------------------------------------------------------------------- stage 2

def rejection_sample(cfg: BetaConfig, progress: bool = True) -> tuple[list[dict[str, Any]],
                                                                      dict[str, Any]]:
    """Samples from NPR-ZERO (plain decoding, tags as text) in rounds of sample.per_round tries
    per still-unsolved problem, up to sample.tries; keeps each problem's first sample that is
    correct and passes the format check exactly. -> (kept rows {"prompt", "response",
    "answer", "tries"}, stats)."""
    import npr
    from npr import format as fmt

    S = cfg.sample
    prompts, checker = _prompts_and_checker(cfg, "math")
    path = resolve_model(S.model)
    model = npr.load_model(path, dtype=cfg.model.dtype)
    tok = npr.load_tokenizer(path)
    rows = [prompts(d) for d in range(S.problems)]
    texts = [r.text if r.text is not None else tok.decode(list(r.ids)) for r in rows]
    longest = max(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    per_req = (longest + S.max_new_tokens + 16) * S.per_round
    eng = npr.Engine(model, tok, kv_cache_tokens=max(1024, per_req * min(len(rows), 64)),
                     max_rows=256, seed=cfg.train.seed)
    kept: dict[int, dict[str, Any]] = {}
    tries = [0] * len(rows)
    sampled = format_ok = correct_n = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="beta: rejection sampling", dynamic_ncols=True)
    try:
        rnd = 0
        while True:
            todo = [i for i in range(len(rows)) if i not in kept and tries[i] < S.tries]
            if not todo:
                break
            n = min(S.per_round, S.tries - min(tries[i] for i in todo))
            params = [npr.SamplingParams(temperature=S.temperature, top_p=S.top_p, n=n,
                                         max_new_tokens=S.max_new_tokens, parallel="off",
                                         seed=(cfg.train.seed * 1_000_003 + i * 101 + rnd) % (2**31 - 1),
                                         logprobs=False)
                      for i in todo]
            outs = eng.generate([texts[i] for i in todo], params)
            flat = [(i, c.text) for i, o in zip(todo, outs) for c in o.outputs]
            ok = checker([fmt.extract_answer(t) for _, t in flat],
                         [rows[i].answer for i, _ in flat])
            for (i, text), good in zip(flat, ok):
                tries[i] += 1
                sampled += 1
                f_ok = fmt.format_score(text) == 0.0
                format_ok += f_ok
                correct_n += bool(good)
                if f_ok and (good or not S.require_correct) and i not in kept:
                    kept[i] = {"prompt": texts[i], "response": text, "answer": rows[i].answer,
                               "tries": tries[i], "correct": bool(good)}
                    if bar is not None:
                        bar.update(1)
            rnd += 1
    finally:
        if bar is not None:
            bar.close()
        if hasattr(checker, "close"):
            checker.close()
    stats = {"problems": len(rows), "kept": len(kept),
             "kept_correct": sum(r["correct"] for r in kept.values()), "samples": sampled,
             "keep_rate": len(kept) / len(rows), "sample_format_rate": format_ok / max(sampled, 1),
             "sample_accuracy": correct_n / max(sampled, 1)}
    return [kept[i] for i in sorted(kept)], stats


def run_beta(cfg: BetaConfig, on_step: OnStep | None = None, ctx: Any = None,
             progress: bool = True) -> str:
    """Stage 2; returns the final checkpoint folder (the SFT'd base model with the tags)."""
    from npr.train import sft
    from npr.train.checkpoint import latest_checkpoint
    from npr.train.dist import init_distributed

    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    kept_path = os.path.join(out, KEPT_FILE)
    if not os.path.isfile(kept_path):
        kept, stats = rejection_sample(cfg, progress=progress)
        if not kept:
            raise RuntimeError(f"stage beta: no sample of NPR-ZERO ({cfg.sample.model}) was both "
                               f"correct and exactly formatted in {cfg.sample.tries} tries per "
                               f"problem: {stats}")
        tmp = kept_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        with open(os.path.join(out, "sampling.json"), "w") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp, kept_path)
    with open(kept_path) as f:
        kept = [json.loads(line) for line in f if line.strip()]
    own_ctx = ctx is None
    ctx = ctx or init_distributed(cfg.dist.backend, cfg.model.device)
    try:
        torch.manual_seed(cfg.train.seed)
        model, tok = _load(resolve_model(cfg.model.path), cfg, ctx.device)
        examples, dropped = [], 0
        for r in kept:
            try:
                ex = sft.encode_example(tok, r["prompt"], r["response"], parallel=True)
                sft.sft_item(ex, _tags(tok), _labels(tok))
            except ValueError:  # FormatError too: a text-valid sample whose tokens are not
                dropped += 1    # what the engine would decode (e.g. text between steps)
                continue
            examples.append(ex)
        if not examples:
            raise RuntimeError("stage beta: none of the kept samples encodes as a valid parallel "
                               "trajectory")
        with open(os.path.join(out, "sft_data.json"), "w") as f:
            json.dump({"kept": len(kept), "examples": len(examples), "dropped": dropped}, f)
        sft.SFTTrainer(cfg, model, tok, examples, ctx=ctx).run(on_step)
    finally:
        if own_ctx:
            ctx.close()
    final = latest_checkpoint(out)
    assert final is not None
    return final


def _tags(tok: Any) -> dict[str, int]:
    from npr.tokenizer import tag_ids

    return tag_ids(tok)


def _labels(tok: Any) -> list[list[int]]:
    from npr.format import DEFAULT_MAX_BRANCHES
    from npr.tokenizer import step_label_ids

    return [step_label_ids(tok, k) for k in range(1, DEFAULT_MAX_BRANCHES + 1)]


# ----------------------------------------------------------------------------- entry points

def run_stage(stage: str, cfg: Any, on_step: OnStep | None = None, ctx: Any = None,
              progress: bool = True) -> str:
    if stage == "beta":
        return run_beta(cfg, on_step, ctx, progress=progress)
    return run_rl_stage(cfg, on_step, ctx)


def _entry(stage: str) -> Callable[[str | None, list[str]], int]:
    def main(config_path: str | None, overrides: list[str]) -> int:
        cfg = stage_config(stage, config_path, overrides)
        final = run_stage(stage, cfg)
        print(f"npr train {stage}: done -> {final}")
        return 0

    main.__name__ = f"train_{stage}"
    return main


STAGES: dict[str, Callable[[str | None, list[str]], int]] = {s: _entry(s) for s in STAGE_NAMES}
