"""The RL loop: each preset steps without NaN; DAPO drops equal-reward groups and refills;
bad setups are clear errors."""
from __future__ import annotations

import math

import pytest

from npr.train.config import RLConfig, load_config
from npr.train.data import Prompt, ShuffledPrompts
from npr.train.rewards import Scored
from npr.train.rl import RLTrainer
from test_train_rollout import forcers
from tiny import tiny_model, tiny_tokenizer


class EvenPromptsAgree:
    """Prompts whose text holds "same" get one reward for all samples (a group without signal);
    the others a reward from the sample's characters (in 7 levels: rarely all equal)."""

    def __call__(self, texts, golds):
        return [Scored(reward=1.0 if g == "same" else (sum(map(ord, t)) % 7) / 3 - 1,
                       correct=g == "same", format_ok=True) for t, g in zip(texts, golds)]


def make(tmp_path, preset, **over):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=8, layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32)
    mk, _ = forcers(tok, max_n=3, blocks=1)
    o = {"train.out_dir": f"'{tmp_path}'", "train.resume": "false", "train.progress": "false",
         "train.plot": "false", "rollout.prompts_per_step": "4", "rollout.samples_per_prompt": "4",
         "rollout.max_new_tokens": "150", "algo.preset": f"'{preset}'", "optim.lr": "1e-3", **over}
    cfg = load_config(RLConfig, overrides=[f"{k}={v}" for k, v in o.items()])
    # draws 0, 2, 4, ... agree within the group
    prompts = ShuffledPrompts([Prompt(answer="same" if i % 2 == 0 else "x", text=f"t{i} ab")
                               for i in range(10)], shuffle=False)
    return RLTrainer(cfg, model, tok, EvenPromptsAgree(), prompts, processors=mk)


@pytest.mark.parametrize("preset, over", [
    ("papo", {}), ("grpo", {}), ("dapo", {}),
    ("dapo", {"algo.minibatches": "2"}),  # several updates: the clip acts on old log-probs
    ("grpo", {"algo.minibatches": "2", "train.micro_batch_tokens": "64"}),
])
def test_every_preset_steps(tmp_path, preset, over):
    t = make(tmp_path, preset, **over)
    m = t.train_step()
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values()), m
    assert m["grad_norm"] > 0 and m["trained_tokens"] > 0
    if over.get("algo.minibatches") == "2":
        assert m["ratio_mean"] != 1.0 or m["ratio_max"] > 1.0  # the 2nd update sees moved weights
    else:
        assert m["ratio_min"] == m["ratio_max"] == 1.0  # one update: strictly on-policy


def test_dapo_drops_equal_groups_and_refills(tmp_path):
    t = make(tmp_path, "dapo", **{"algo.max_refill_rounds": "3"})
    m = t.train_step()
    # round 1: draws 0..3, groups 0 and 2 agree -> dropped, 1 and 3 kept; round 2 (draws
    # 4..7): 4 and 6 dropped, 5 and 7 refill the batch
    assert m["groups_kept"] == 4 and m["groups_dropped"] == 4 and m["refill_rounds"] == 2
    assert m["groups_surplus"] == 0
    assert t.cursor == 8 and m["cursor"] == 8
    p = make(tmp_path, "papo").train_step()  # PAPO keeps them (zero advantage, no loss)
    assert p["groups_kept"] == 4 and p["groups_dropped"] == 0 and p["refill_rounds"] == 1
    assert p["adv_abs_mean"] > 0


def test_dapo_gives_up_after_max_refill_rounds(tmp_path):
    t = make(tmp_path, "dapo", **{"algo.max_refill_rounds": "1"})
    t.prompts = ShuffledPrompts([Prompt(answer="same", text="all agree")])
    m = t.train_step()  # nothing has signal: the step trains on nothing, and says so
    assert m["groups_kept"] == 0 and m["refill_rounds"] == 2 and m["loss"] == 0.0


def test_parallel_rollouts_need_tag_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "a": 2}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    cfg = load_config(RLConfig, overrides=[f"train.out_dir='{tmp_path}'", "train.resume=false"])
    with pytest.raises(ValueError, match="needs the eight tag tokens"):
        RLTrainer(cfg, tiny_model(3, layers=1, hidden=32, heads=1, kv_heads=1, head_dim=32), tok,
                  EvenPromptsAgree(), ShuffledPrompts([Prompt(answer="1", text="a")]))
