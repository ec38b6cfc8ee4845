"""Config files, overrides and their errors; metrics JSONL and the PNG."""
from __future__ import annotations

import json

import pytest

from npr.train.config import ConfigError, RLConfig, SFTConfig, apply_overrides, load_config
from npr.train.metrics import MetricsLog, plot, read_jsonl

TOML = """
stage = "papo"
[model]
path = "some/folder"
[rollout]
prompts_per_step = 16
temperature = 0.8
[algo]
preset = "dapo"
clip_high = 0.3
[optim]
lr = 1e-6
"""


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(TOML)
    c = load_config(RLConfig, str(f), ["rollout.samples_per_prompt=8", "train.out_dir=runs/x",
                                       "algo.minibatches=4", "optim.lr=2e-6"])
    assert c.stage == "papo" and c.model.path == "some/folder"
    assert c.rollout.prompts_per_step == 16 and c.rollout.samples_per_prompt == 8
    assert c.rollout.temperature == 0.8 and c.train.out_dir == "runs/x"  # bare string value
    # the preset fills what the file left out; the file's own knobs win
    a = c.algo
    assert (a.scale, a.clip, a.clip_low, a.clip_high, a.drop_equal_groups, a.aggregation,
            a.overlong) == ("group", True, 0.2, 0.3, True, "token-mean", True)
    assert a.minibatches == 4 and c.optim.lr == 2e-6
    p = load_config(RLConfig).algo
    assert (p.preset, p.scale, p.clip, p.drop_invalid) == ("papo", "batch", False, True)
    g = load_config(RLConfig, overrides=["algo.preset=grpo"]).algo
    assert (g.scale, g.clip_high, g.aggregation) == ("group", 0.2, "seq-mean-token-mean")
    assert load_config(SFTConfig, overrides=["epochs=2"]).epochs == 2


@pytest.mark.parametrize("override, match", [
    ("algo.foo=1", "unknown key 'algo.foo'"),
    ("rollouts.n=1", "unknown key 'rollouts'"),
    ("train.steps=ten", "train.steps: expected int, got str"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.steps=0", "train.steps: must be >= 1"),
    ("rollout.temperature=0", "rollout.temperature: must be > 0"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rollout.parallel=fast", "rollout.parallel: must be one of"),
    ("algo.preset=ppo", "algo.preset: must be one of 'papo', 'dapo', 'grpo'"),
    ("algo.clip_low=1.5", "algo.clip_low"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("optim.schedule=step", "optim.schedule"),
    ("train.resume=yes", "train.resume: expected bool"),
    ("model=3", "model: expected a table"),
    ("dist.strategy=zero3", "dist.strategy"),
    ("data.template=x", "data.template: must contain {problem}"),
    ("steps", "not key=value"),
])
def test_bad_configs_name_the_problem(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RLConfig, overrides=[override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RLConfig, str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(RLConfig, str(bad))
    bad.write_text("[train]\nstep = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.step'"):
        load_config(RLConfig, str(bad))


def test_overrides_do_not_touch_the_input():
    d = {"train": {"steps": 1}}
    out = apply_overrides(d, ["train.steps=2", "algo.eps=1e-5"])
    assert d == {"train": {"steps": 1}} and out == {"train": {"steps": 2}, "algo": {"eps": 1e-5}}


def test_metrics_jsonl_resume_and_png(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path, progress=False)
    for s in range(1, 5):
        log.log(s, {"reward": 0.1 * s, "loss": float("nan") if s == 2 else -s, "accuracy": 0.5})
    log.close()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[1]["loss"] is None
    # resumed from step 2: later lines go, the new ones follow
    log = MetricsLog(path, progress=True, total_steps=4, start_step=2)
    log.log(3, {"reward": 9.0})
    log.close(png=str(tmp_path / "m.png"))
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["reward"] == 9.0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(rows)
    assert plot(path, str(tmp_path / "none.png"), keys=("absent",)) is None
