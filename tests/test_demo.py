"""`npr demo --quick`: the whole pipeline at toy size. Every stage runs and leaves a checkpoint
that npr and transformers load; the table, the plots and the transcript are written. (Accuracy
is not checked: the toy model is trained for seconds.)"""
from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage(tmp_path):
    from transformers import AutoModelForCausalLM

    import npr
    from npr.cli import main

    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert list(res["table"]) == ["base", "SR", "NPR-ZERO", "NPR-BETA", "NPR"]
    for row, path in res["models"].items():
        assert os.path.isdir(path), row
        model = npr.load_model(path)
        assert model.config.vocab_size == len(npr.load_tokenizer(path))
        AutoModelForCausalLM.from_pretrained(path)
    for stage in ("zero", "beta", "npr", "sr"):
        with open(os.path.join(out, stage, "metrics.jsonl")) as f:
            assert sum(1 for _ in f) >= 1, stage
    assert res["table"]["NPR"]["mode"] == "native" and res["table"]["SR"]["mode"] == "off"
    for name in ("results.md", "curves.png", "speedup.png", "transcript.txt"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "transcript.txt")) as f:
        assert "npr generate" in f.read()
    # Run again: everything is found done, nothing is retrained.
    stamp = os.path.getmtime(os.path.join(res["models"]["NPR"], "model.safetensors"))
    assert main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    assert os.path.getmtime(os.path.join(res["models"]["NPR"], "model.safetensors")) == stamp
