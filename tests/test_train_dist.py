"""torch.distributed: 2 ranks of gloo (torchrun) train exactly like 1 process on the same global
batch, and the ranks' parameters stay identical. Run as a script, this file is the worker."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def make_trainer(out_dir: str, strategy: str, ctx=None, resume: bool = False):
    from test_train_rollout import forcers

    from npr.train.config import RLConfig, load_config
    from npr.train.data import Prompt, ShuffledPrompts
    from npr.train.rewards import Scored
    from npr.train.rl import RLTrainer
    from tiny import tiny_model, tiny_tokenizer

    class CharReward:  # deterministic in every process (no str hash)
        def __call__(self, texts, golds):
            return [Scored(reward=1.0 if sum(map(ord, t)) % 3 == 0 else -1.0, correct=False,
                           format_ok=True) for t in texts]

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=11, layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32)
    make, _ = forcers(tok, max_n=4, blocks=2)
    cfg = load_config(RLConfig, overrides=[
        f"train.out_dir='{out_dir}'", f"train.resume={str(resume).lower()}", "train.progress=false",
        "train.plot=false", "train.steps=2", "train.micro_batch_tokens=300",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=3",
        "rollout.max_new_tokens=200", "optim.optimizer='sgd'", "optim.lr=0.5",
        "optim.max_grad_norm=0.5",  # clipped: the norm is of the global gradient
        f"dist.strategy='{strategy}'"])
    prompts = ShuffledPrompts([Prompt(answer="1", text=f"p{i} xy"[: 2 + i % 5]) for i in range(8)])
    return RLTrainer(cfg, model, tok, CharReward(), prompts, ctx=ctx, processors=make)


def _worker(out_dir: str, strategy: str) -> None:
    from npr.train.dist import gather_full_state, init_distributed

    ctx = init_distributed("gloo")
    t = make_trainer(out_dir, strategy, ctx)
    hist = t.run()
    state = gather_full_state(t.train_model)
    norms = [h["grad_norm"] for h in hist]
    sharded = any(hasattr(p, "full_tensor") for p in t.train_model.parameters())
    # the checkpoint run() wrote at the end (optimizer sharded under FSDP) loads back
    back = make_trainer(out_dir, strategy, ctx, resume=True)
    assert back.step == 2 and back.resumed_from
    again = gather_full_state(back.train_model)
    assert all(torch.equal(again[n], v) for n, v in state.items())
    torch.save({"params": state, "threads": torch.get_num_threads(), "world": ctx.world_size,
                "sharded": sharded,
                "losses": [h["loss"] for h in hist], "norms": norms, "rollouts": [h["rollouts"] for h in hist]},
               os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    ctx.close()


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_process(tmp_path, strategy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun sets 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + os.getpid() % 1000), __file__, str(tmp_path / "two"),
           strategy]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    r0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "two" / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["threads"] == r1["threads"] == 1  # 2 ranks on 2 cores: one thread each
    assert r0["sharded"] == (strategy == "fsdp")  # FSDP2 really sharded the parameters
    for name, p0 in r0["params"].items():
        assert torch.equal(p0, r1["params"][name]), name
    assert r0["rollouts"] == [12.0, 12.0]  # metrics are global: 4 prompts x 3 samples

    one = make_trainer(str(tmp_path / "one"), strategy)
    hist = one.run()
    assert [h["loss"] for h in hist] == pytest.approx(r0["losses"], rel=1e-4, abs=1e-7)
    assert [h["grad_norm"] for h in hist] == pytest.approx(r0["norms"], rel=1e-5)
    assert max(r0["norms"]) > 0.5  # the clip was active
    for name, p in one.model.named_parameters():
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    start = make_trainer(str(tmp_path / "start"), strategy)
    moved = sum(float((p.detach() - start.model.get_parameter(n).detach()).abs().sum())
                for n, p in one.model.named_parameters())
    assert moved > 1e-3  # the steps changed the weights


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
