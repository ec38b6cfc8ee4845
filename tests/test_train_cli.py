"""`python -m npr.train`: a real run killed (SIGKILL) after a checkpoint and restarted ends
exactly where an uninterrupted run ends; config errors are clear."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from npr.train.checkpoint import latest_checkpoint, save_model
from npr.train.metrics import read_jsonl
from tiny import tiny_model, tiny_tokenizer

CONFIG = """
[model]
path = "{model}"
[data]
path = "{data}"
[reward]
kind = "stage3"
checker = "exact"
[rollout]
parallel = "off"
prompts_per_step = 2
samples_per_prompt = 4
max_new_tokens = 24
[algo]
preset = "dapo"          # the soft overlong penalty makes the rewards differ by length
overlong_cache = 16
[optim]
lr = 0.01
[train]
steps = 5
save_every = 1
keep_last = 10
progress = false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    save_model(str(d / "model"), tiny_model(len(tok), seed=4, layers=2, hidden=64, heads=2,
                                            kv_heads=1, head_dim=32), tok)
    with open(d / "data.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"problem": f"add {i} {i}", "answer": str(2 * i)}) + "\n")
    (d / "c.toml").write_text(CONFIG.format(model=d / "model", data=d / "data.jsonl"))
    return d


def _cmd(d, out):
    return [sys.executable, "-m", "npr.train", "rl", "--config", str(d / "c.toml"),
            f"train.out_dir={out}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_killed_run_resumes_exactly(setup):
    d = setup
    full = subprocess.run(_cmd(d, d / "full"), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-4000:]
    want = read_jsonl(str(d / "full" / "metrics.jsonl"))
    assert [r["step"] for r in want] == [1, 2, 3, 4, 5]
    assert (d / "full" / "metrics.png").exists()
    assert len({r["loss"] for r in want}) > 1  # it trains on something

    proc = subprocess.Popen(_cmd(d, d / "kill"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        ck = latest_checkpoint(str(d / "kill"))
        if ck is not None and int(ck[-6:]) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed: " + proc.stderr.read()[-3000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(str(d / "kill"))[-6:])
    assert killed_at < 5, "killed too late"
    again = subprocess.run(_cmd(d, d / "kill"), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    got = read_jsonl(str(d / "kill" / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for g, w in zip(got[killed_at:], want[killed_at:]):
        for k in ("loss", "grad_norm", "reward", "lr", "gen_tokens", "cursor"):
            assert g[k] == w[k], (g["step"], k, g[k], w[k])
    from safetensors.torch import load_file

    a = load_file(os.path.join(latest_checkpoint(str(d / "full")), "model.safetensors"))
    b = load_file(os.path.join(latest_checkpoint(str(d / "kill")), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_exit_2(setup):
    p = subprocess.run(_cmd(setup, setup / "x") + ["algo.clip_hi=0.3"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "unknown key 'algo.clip_hi'" in p.stderr
