"""The stages on real weights (SmolLM2-135M-Instruct, GGUF): stage-1 rollouts and a DAPO update,
the tags added for stage 2 and a parallel SFT step, one PAPO step on native parallel rollouts
(a forced structure places the tags: the real model has never seen the format), and the
checkpoint reloaded by transformers with the same logits."""
from __future__ import annotations

import json
import os

import pytest
import torch

import npr
from npr.tasks import multiples as mt
from npr.train.pipeline import resolve_model, run_beta, run_rl_stage, stage_config

pytestmark = pytest.mark.slow

TASK = "multiples:k=2,n=1-2"
TRAIN = {"steps": 1, "micro_batch_tokens": 1024, "progress": False, "plot": False}


def test_stages_on_smollm2(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from npr.bench.forcing import ForcedStructure
    from npr.tokenizer import step_label_ids, tag_ids

    torch.manual_seed(0)
    zero = stage_config("zero", base={
        "model": {"path": smollm2_gguf}, "task": {"spec": TASK},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 24,
                    "chat_template": True},
        "algo": {"max_refill_rounds": 0}, "optim": {"lr": 1e-6},
        "train": {**TRAIN, "out_dir": str(tmp_path / "zero")}})
    z = run_rl_stage(zero)
    with open(os.path.join(tmp_path / "zero", "metrics.jsonl")) as f:
        m = json.loads(f.readline())
    assert m["rollouts"] == 4 and m["gen_tokens"] > 0
    assert AutoModelForCausalLM.from_pretrained(z) is not None

    # Stage 2 from the real model: the kept trajectories are given (SmolLM2 does not write the
    # format); the tags become special tokens with initialised rows, one parallel SFT step.
    beta_dir = tmp_path / "beta"
    os.makedirs(beta_dir)
    with open(beta_dir / "kept.jsonl", "w") as f:
        for text in ("a=7*2 b=3*1", "a=4*2 b=9*2"):
            p = mt.parse_problem(text)
            f.write(json.dumps({"prompt": mt.prompt_text(p.text), "response": mt.parallel_solution(p),
                                "answer": p.answer, "tries": 1, "correct": True}) + "\n")
    beta = stage_config("beta", base={
        "model": {"path": smollm2_gguf}, "task": {"spec": TASK}, "batch_sequences": 2,
        "optim": {"lr": 1e-6}, "train": {**TRAIN, "out_dir": str(beta_dir)},
        "sample": {"model": str(tmp_path / "zero")}})
    b = run_beta(beta, progress=False)
    tok = npr.load_tokenizer(b)
    tags = tag_ids(tok)
    assert len(tok) == 49152 + 8 and min(tags.values()) == 49152

    # One PAPO step with native parallel rollouts from NPR-BETA.
    labels = [step_label_ids(tok, k) for k in range(1, 9)]

    class HalfRight:
        """The forced structure, then in the final text: the first sample of the request to get
        there writes the gold \\boxed{answer}, the next one the model's own tokens, and so on,
        so each group holds a right and a wrong answer (the rewards differ, PAPO trains)."""

        def __init__(self, prompt, ids):
            self.inner = ForcedStructure(tag_ids=tags, labels=labels, eos_id=tok.eos_token_id,
                                         prompt_len=len(ids), branches=[2], step_tokens=4,
                                         plan_tokens=2, prefix_tokens=0, takeaway_tokens=3,
                                         final_tokens=2)
            self.answer = tok.encode(f"\\boxed{{{prompt.answer}}}", add_special_tokens=False)
            self.right: dict[tuple[int, ...], bool] = {}

        def __call__(self, visible, logits):
            out = self.inner(visible, logits)
            if tags["</takeaway>"] not in visible:
                return out
            end = len(visible) - visible[::-1].index(tags["</takeaway>"])  # after it
            key = tuple(visible[:end])
            if key not in self.right:
                self.right[key] = len(self.right) % 2 == 0
            j = len(visible) - end
            if not self.right[key]:
                return out
            force = self.answer[j] if j < len(self.answer) else tok.eos_token_id
            return torch.full_like(logits, float("-inf")).index_fill_(0, torch.tensor([force]), 0.0)

    def forced(prompt, ids):
        return [HalfRight(prompt, ids)]

    papo = stage_config("papo", base={
        "model": {"path": str(beta_dir)}, "task": {"spec": TASK},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 64,
                    "temperature": 1.0},
        "optim": {"lr": 1e-6}, "train": {**TRAIN, "out_dir": str(tmp_path / "papo")}})
    final = run_rl_stage(papo, processors=forced)
    with open(os.path.join(tmp_path / "papo", "metrics.jsonl")) as f:
        m = json.loads(f.readline())
    assert m["parallel_rate"] == 1.0 and m["valid_rate"] == 1.0
    assert m["accuracy"] == 0.5 and m["trained_tokens"] > 0
    assert resolve_model(str(tmp_path / "papo")) == final

    hf = AutoModelForCausalLM.from_pretrained(final)
    ours = npr.load_model(final)
    ids = torch.tensor([tok.encode(mt.prompt_text("a=7*2 b=3*1") + "<guideline><plan>1: a",
                                   add_special_tokens=False)])
    assert tags["<plan>"] in ids[0].tolist()  # the tags are single tokens of the saved tokenizer
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=2e-4, rtol=1e-4)
