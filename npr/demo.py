"""`npr demo [--quick] [--out DIR]`: the whole NPR story (spec/NPR.md §4) on one CPU.

A tiny Llama is pretrained from nothing on the `multiples` task (npr.tasks), then taken through
the three stages and the sequential-RL baseline (npr.train.pipeline):

    base      pretrained on sequential solutions, the parallel format only partly followed
    NPR-ZERO  stage 1: DAPO, tags as text, format penalty else +-1
    NPR-BETA  stage 2: rejection sampling from NPR-ZERO, tags added to the base model, parallel SFT
    NPR       stage 3: PAPO with native parallel rollouts
    SR        the baseline: the stage-3 recipe and budget from the base model, plain rollouts

Everything lands in one folder: results.md / results.json (the table: accuracy avg@k, format rate,
parallel rate, tokens/s native and sequential, speedup; and the story's checks), curves.png,
speedup.png (speedup per branch count of the final model), transcript.txt (`npr generate` on the
final model, branches shown), the checkpoints (base/, zero/, beta/, npr/, sr/) and eval/*.json.
Seeded and reproducible; a killed demo resumes where it stopped. `--quick` runs the same pipeline
at toy size (CI: every stage runs and writes a loadable checkpoint; accuracy is not the point).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from npr.train.pretrain import PretrainConfig

LATENCY_ROWS = ("NPR", "SR")  # measured again one problem at a time
ROWS = ("base", "SR", "NPR-ZERO", "NPR-BETA", "NPR")


@dataclass
class DemoConfig:
    seed: int = 0
    task: str = "multiples:k=2-4,n=2-6"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # Stage overrides (npr.train.pipeline configs as nested dicts, under the demo's paths).
    zero: dict[str, Any] = field(default_factory=dict)
    beta: dict[str, Any] = field(default_factory=dict)
    rl: dict[str, Any] = field(default_factory=dict)   # papo and sr alike: same recipe, budget
    eval_problems: int = 64
    eval_k: int = 4
    eval_temperature: float = 0.6  # at 1.0 the tiny NPR-BETA breaks its format in ~half the samples
    eval_repeats: int = 2
    max_new_tokens: int = 320
    branch_counts: tuple[int, ...] = (1, 2, 3, 4)
    branch_problems: int = 16
    branch_task_n: str = "4-6"
    threads: int = 2


def full_config(seed: int = 0) -> DemoConfig:
    rollout = {"prompts_per_step": 8, "samples_per_prompt": 8, "temperature": 1.0,
               "max_new_tokens": 320}
    train = {"micro_batch_tokens": 2048, "save_every": 5, "seed": seed}
    return DemoConfig(
        seed=seed,
        pretrain=PretrainConfig(steps=1000, batch_size=16, lr=3e-3, seed=seed),
        zero={"rollout": rollout, "optim": {"lr": 3e-4, "warmup_steps": 2},
              "train": {**train, "steps": 16}},
        # stage 2 re-learns every step under the parallel layout (siblings hidden, positions
        # restarted): ~21 SFT steps left the model writing broken tags, ~120 copied the wrong
        # group into steps 2+ (51% accuracy), ~240 (16 epochs) give 87%
        # (1024 problems x 4 epochs: the same SFT steps, fewer repeats; NPR-BETA 87% -> 94.5%)
        beta={"sample": {"problems": 1024, "tries": 8, "per_round": 4, "max_new_tokens": 320},
              "optim": {"lr": 1e-3, "warmup_steps": 5, "schedule": "cosine"},
              "batch_sequences": 16, "epochs": 4, "train": {**train}},
        # PAPO and SR: at lr 1e-4 both lost accuracy over 16 steps; at 2e-5 neither moved
        rl={"rollout": {**rollout, "temperature": 0.6}, "optim": {"lr": 5e-5, "warmup_steps": 2},
            "train": {**train, "steps": 32}},
        eval_problems=128,  # 512 samples at k = 4: one sample is 0.2 points
    )


def quick_config(seed: int = 0) -> DemoConfig:
    """Toy size: a few steps of everything (CI). Its barely trained model rarely answers right,
    so stage 2 keeps format-exact samples even when wrong (sample.require_correct = false)."""
    rollout = {"prompts_per_step": 2, "samples_per_prompt": 4, "temperature": 1.0,
               "max_new_tokens": 96}
    train = {"micro_batch_tokens": 1024, "save_every": 1, "seed": seed}
    return DemoConfig(
        seed=seed, task="multiples:k=2,n=1-2",
        pretrain=PretrainConfig(task="multiples:k=2,n=1-2", hidden_size=64, num_layers=2,
                                num_heads=2, head_dim=32, intermediate_size=128, steps=200,
                                batch_size=8, lr=5e-3, warmup_steps=10, p_parallel=0.7,
                                p_flawed=0.2, seed=seed),
        zero={"rollout": rollout, "optim": {"lr": 1e-4}, "train": {**train, "steps": 2}},
        beta={"sample": {"problems": 8, "tries": 4, "per_round": 4, "max_new_tokens": 96,
                         "require_correct": False},
              "optim": {"lr": 1e-3}, "batch_sequences": 2, "epochs": 1, "train": {**train}},
        rl={"rollout": rollout, "optim": {"lr": 1e-4}, "train": {**train, "steps": 2}},
        eval_problems=8, eval_k=1, eval_temperature=0.0, eval_repeats=1, max_new_tokens=96,
        branch_counts=(1, 2), branch_problems=2, branch_task_n="1-2",
    )


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    from npr.train.config import _merge as merge

    return merge(a, b)


def _metrics(folder: str) -> list[dict[str, Any]]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def _ends(folder: str, key: str, n: int = 3) -> tuple[float | None, float | None]:
    rows = _metrics(folder)
    return _mean(rows[:n], key), _mean(rows[-n:], key)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


class Demo:
    def __init__(self, cfg: DemoConfig, out: str, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.out, self.progress, self.log = cfg, out, progress, log
        self.dirs = {k: os.path.join(out, k) for k in ("base", "zero", "beta", "npr", "sr", "eval")}
        self.times: dict[str, float] = {}

    # ------------------------------------------------------------------ stages
    def _stage_cfg(self, stage: str, model: str, out: str, extra: dict[str, Any]) -> Any:
        from npr.train.pipeline import stage_config

        base = {"model": {"path": model}, "task": {"spec": self.cfg.task, "seed": self.cfg.seed},
                "train": {"out_dir": out, "progress": self.progress}}
        return stage_config(stage, base=_merge(base, extra))

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        r = fn()
        self.times[name] = time.perf_counter() - t0
        return r

    def run_stages(self) -> dict[str, str]:
        from npr.train.pipeline import run_beta, run_rl_stage
        from npr.train.pretrain import pretrain

        c, d = self.cfg, self.dirs
        self.log(f"npr demo: {c.task}, seed {c.seed} -> {self.out}")
        base = self._timed("base", lambda: pretrain(c.pretrain, d["base"], progress=self.progress))
        with open(os.path.join(base, "pretrain.json")) as f:
            pj = json.load(f)
        self.log(f"[1/5] base      pretrained {c.pretrain.steps} steps "
                 f"({_param_count(base) / 1e6:.2f} M params), final loss "
                 f"{pj['final_loss_ema']:.3f}, {pj['wall_s']:.0f} s")

        zero_cfg = self._stage_cfg("zero", base, d["zero"], c.zero)
        zero = self._timed("zero", lambda: run_rl_stage(zero_cfg))
        f0, f1 = _ends(d["zero"], "format_rate")
        a0, a1 = _ends(d["zero"], "accuracy")
        self.log(f"[2/5] NPR-ZERO  {zero_cfg.train.steps} DAPO steps: rollout format "
                 f"{_pct(f0)} -> {_pct(f1)}, accuracy {_pct(a0)} -> {_pct(a1)}, "
                 f"{self.times['zero']:.0f} s")

        beta_cfg = self._stage_cfg("beta", base, d["beta"],
                                   _merge({"sample": {"model": d["zero"]}}, c.beta))
        beta = self._timed("beta", lambda: run_beta(beta_cfg, progress=self.progress))
        with open(os.path.join(d["beta"], "sampling.json")) as f:
            sj = json.load(f)
        nll0, nll1 = _ends(d["beta"], "nll")
        self.log(f"[3/5] NPR-BETA  kept {sj['kept']}/{sj['problems']} problems "
                 f"({sj['samples']} samples, {_pct(sj['sample_accuracy'])} correct), parallel "
                 f"SFT nll {nll0 or 0:.3f} -> {nll1 or 0:.3f}, {self.times['beta']:.0f} s")

        papo_cfg = self._stage_cfg("papo", d["beta"], d["npr"], c.rl)
        final = self._timed("papo", lambda: run_rl_stage(papo_cfg))
        a0, a1 = _ends(d["npr"], "accuracy")
        p1 = _ends(d["npr"], "parallel_rate")[1]
        self.log(f"[4/5] NPR       {papo_cfg.train.steps} PAPO steps (native rollouts): accuracy "
                 f"{_pct(a0)} -> {_pct(a1)}, parallel {_pct(p1)}, {self.times['papo']:.0f} s")

        # SR: the same RL recipe and budget from the pipeline's start (the base model), with
        # sequential rollouts; from NPR-BETA it would decode plainly a model trained in parallel
        sr_cfg = self._stage_cfg("sr", base, d["sr"], c.rl)
        sr = self._timed("sr", lambda: run_rl_stage(sr_cfg))
        a0, a1 = _ends(d["sr"], "accuracy")
        self.log(f"[5/5] SR        {sr_cfg.train.steps} steps (sequential rollouts, causal): "
                 f"accuracy {_pct(a0)} -> {_pct(a1)}, {self.times['sr']:.0f} s")
        return {"base": base, "NPR-ZERO": zero, "NPR-BETA": beta, "NPR": final, "SR": sr}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, models: dict[str, str]) -> dict[str, Any]:
        from npr import tasks
        from npr.tasks import evaluate as ev

        c = self.cfg
        os.makedirs(self.dirs["eval"], exist_ok=True)
        task = tasks.get_task(c.task)
        probs = tasks.eval_set(task, c.eval_problems, seed=c.seed + 1)
        tasks.write_jsonl(os.path.join(self.dirs["eval"], "eval_set.jsonl"), probs, task)
        items = [ev.EvalItem(tasks.prompt_text(p.text), p.answer, p.text) for p in probs]
        t0 = time.perf_counter()

        def cached(row: str, suffix: str, k: int, run: Callable[[], Any]) -> Any:
            """The row's result from eval/{row}{suffix}.json when it is of this model and k,
            else run() (and saved there): a rerun of the demo skips what it has."""
            cache = os.path.join(self.dirs["eval"], f"{row}{suffix}.json")
            if os.path.isfile(cache):
                with open(cache) as f:
                    d = json.load(f)
                if d.get("model") == models[row] and d.get("k") == k:
                    return _result(d)
            r = run()
            with open(cache, "w") as f:
                json.dump(r.to_dict(), f, indent=2)
            return r

        def mode(row: str) -> str | None:
            return "off" if row == "SR" else None

        results = {row: cached(row, "", c.eval_k, lambda row=row: ev.evaluate(
            models[row], items, k=c.eval_k, temperature=c.eval_temperature,
            max_new_tokens=c.max_new_tokens, seed=c.seed, checker="exact",
            repeats=c.eval_repeats, name=models[row], data=task.spec, parallel=mode(row)))
            for row in ROWS}
        # Latency: the set again, one problem at a time (what parallel decoding shortens is a
        # request's wall time; the table's speed columns decode the whole set at once, where a
        # CPU step's cost grows with its rows and parallel decoding gains less).
        latency = {row: cached(row, ".latency", 1, lambda row=row: ev.evaluate(
            models[row], items, k=1, temperature=0.0, max_new_tokens=c.max_new_tokens,
            seed=c.seed, checker="exact", repeats=c.eval_repeats, batch=1, name=models[row],
            data=task.spec, parallel=mode(row)))
            for row in LATENCY_ROWS}
        self.times["eval"] = time.perf_counter() - t0
        branches = self._branch_speedups(models["NPR"])
        self.log(f"[eval]          {len(ROWS)} models x {len(items)} problems "
                 f"(k={c.eval_k}), latency, speed per branch count, {self.times['eval']:.0f} s")
        return {"results": results, "latency": latency, "branches": branches}

    def _branch_speedups(self, model_path: str) -> list[dict[str, Any]]:
        import npr
        from npr import tasks
        from npr.tasks import evaluate as ev

        c = self.cfg
        cache = os.path.join(self.dirs["eval"], "branches.json")
        if os.path.isfile(cache):
            with open(cache) as f:
                d = json.load(f)
            if d.get("model") == model_path:
                return d["rows"]
        model, tok = npr.load_model(model_path), npr.load_tokenizer(model_path)
        rows = []
        for b in c.branch_counts:
            task = tasks.get_task(f"multiples:k={b},n={c.branch_task_n}")
            # a speed measurement: training problems are fine (k=1 has only 3 held-out ones)
            probs = tasks.eval_set(task, c.branch_problems, seed=c.seed + 2, heldout=False)
            prompts = [tasks.prompt_text(p.text) for p in probs]
            eng = ev.make_engine(model, tok, prompts, rows=len(prompts),
                                 max_new_tokens=c.max_new_tokens, seed=c.seed)
            items = [ev.EvalItem(pr, p.answer, p.text) for pr, p in zip(prompts, probs)]
            r = ev.accuracy_pass(eng, items, max_new_tokens=c.max_new_tokens)
            ev.speed_pass(eng, prompts, r, max_new_tokens=c.max_new_tokens, repeats=c.eval_repeats)
            rows.append({"branches": b, "ideal": r.ideal_speedup, "achieved": r.achieved_speedup,
                         "native_tok_s": r.native_tok_s, "sequential_tok_s": r.sequential_tok_s,
                         "accuracy": r.accuracy_avg, "parallel_rate": r.parallel_rate})
        with open(cache, "w") as f:
            json.dump({"model": model_path, "rows": rows}, f, indent=2)
        return rows

    # ------------------------------------------------------------------ report
    def checks(self, res: dict[str, Any]) -> list[dict[str, Any]]:
        r = res["results"]
        f0, f1 = _ends(self.dirs["zero"], "format_rate")
        npr_, sr, beta = r["NPR"], r["SR"], r["NPR-BETA"]

        def row(name: str, value: Any, target: str, ok: bool | None) -> dict[str, Any]:
            return {"check": name, "value": value, "target": target, "pass": ok}

        def speed(n: ev.EvalResult, s: ev.EvalResult, how: str) -> list[dict[str, Any]]:
            ach, ideal = n.achieved_speedup, n.ideal_speedup
            wall_ratio = (s.wall_s / n.wall_s) if s.wall_s and n.wall_s else None
            return [
                row(f"NPR native vs sequential decoding (same model, same trajectories), {how}",
                    ach, ">= 1.5x", None if ach is None else ach >= 1.5),
                row(f"NPR achieved / ideal speedup, {how}", None if ach is None else ach / ideal,
                    ">= 80%", None if ach is None else ach / ideal >= 0.8),
                row(f"NPR native vs SR plain: wall time of the eval set, {how}", wall_ratio,
                    ">= 1.5x", None if wall_ratio is None else wall_ratio >= 1.5)]

        lat = res.get("latency", {})
        return [
            row("format rate rises through stage 1 (rollouts, first 3 -> last 3 steps)",
                [f0, f1], "last > first", None if f0 is None or f1 is None else f1 > f0),
            row("format rate base -> NPR-ZERO (eval)",
                [r["base"].format_rate, r["NPR-ZERO"].format_rate], "NPR-ZERO > base",
                r["NPR-ZERO"].format_rate > r["base"].format_rate),
            row("NPR-BETA parallel rate", beta.parallel_rate, ">= 99%", beta.parallel_rate >= 0.99),
            row("NPR accuracy >= SR", [npr_.accuracy_avg, sr.accuracy_avg], "NPR >= SR",
                npr_.accuracy_avg >= sr.accuracy_avg),
            row("NPR accuracy > NPR-BETA", [npr_.accuracy_avg, beta.accuracy_avg],
                "NPR > NPR-BETA", npr_.accuracy_avg > beta.accuracy_avg),
            *(speed(lat["NPR"], lat["SR"], "one problem at a time") if lat else []),
            *speed(npr_, sr, "the whole set at once"),
        ]

    def report(self, models: dict[str, str], res: dict[str, Any], wall: float) -> dict[str, Any]:
        from npr.tasks.evaluate import markdown_table

        c = self.cfg
        checks = self.checks(res)
        table = markdown_table([(row, res["results"][row]) for row in ROWS])
        machine = _machine()
        sr, n = res["results"]["SR"], res["results"]["NPR"]
        lines = [
            f"# npr demo ({'quick' if c.task.endswith('n=1-2') else 'full'})", "",
            f"{machine['cpu']}, {machine['threads']} threads, {machine['date']}; "
            f"task {c.task}; {c.eval_problems} held-out problems, avg@{c.eval_k} / best@{c.eval_k} "
            f"at temperature {c.eval_temperature}; speed: greedy, the whole set at once, "
            f"fastest of {c.eval_repeats}; wall time of the demo {wall / 60:.1f} min.", "",
            table, "",
            "tok/s sequential is the plain decode for models without tag tokens (base, SR, "
            "NPR-ZERO); speedup = sequential / native wall time of the same model on the same "
            "trajectories (ideal: tokens / critical-path tokens).", "",
            f"NPR (native) vs SR (plain): eval set in {n.wall_s or 0:.2f} s vs {sr.wall_s or 0:.2f} s.",
            "", "Latency: the eval set greedy, one problem at a time (k = 1):", "",
            "| model | tok/s native | tok/s sequential | speedup (ideal) | wall s |",
            "|---|---|---|---|---|",
            *[_latency_row(row, x) for row, x in res["latency"].items()],
            "", "Per branch count (16 problems of k groups, decoded at once):", "",
            "| branches | ideal | achieved | tok/s native | tok/s sequential |",
            "|---|---|---|---|---|",
            *[f"| {b['branches']} | {b['ideal']:.2f}x | {b['achieved'] or 0:.2f}x | "
              f"{b['native_tok_s'] or 0:.0f} | {b['sequential_tok_s'] or 0:.0f} |"
              for b in res["branches"]],
            "", "| check | value | target | pass |", "|---|---|---|---|",
            *[f"| {ck['check']} | {_fmt(ck['value'])} | {ck['target']} | "
              f"{'-' if ck['pass'] is None else ('yes' if ck['pass'] else 'NO')} |" for ck in checks],
            "", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.times.items()),
        ]
        md = "\n".join(lines) + "\n"
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(md)
        payload = {"machine": machine, "config": _jsonable(asdict(c)), "wall_s": wall,
                   "stage_s": self.times, "models": models,
                   "table": {row: res["results"][row].to_dict() for row in ROWS},
                   "latency": {row: x.to_dict() for row, x in res["latency"].items()},
                   "branches": res["branches"], "checks": checks}
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(payload, f, indent=2)
        return payload

    def plots(self, res: dict[str, Any]) -> None:
        from npr.demo_plots import plot_curves, plot_speedup

        plot_curves(self.dirs, os.path.join(self.out, "curves.png"))
        plot_speedup(res["branches"], os.path.join(self.out, "speedup.png"))

    def transcript(self, model: str) -> str:
        from npr import tasks
        from npr.cli import _cmd_generate

        task = tasks.get_task(f"multiples:k={max(self.cfg.branch_counts)},n={self.cfg.branch_task_n}")
        p = tasks.eval_set(task, 1, seed=self.cfg.seed + 3)[0]
        prompt = tasks.prompt_text(p.text)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _cmd_generate([model, "--prompt", prompt, "--max-new-tokens", str(self.cfg.max_new_tokens)])
        text = (f"$ npr generate {model} --prompt {prompt!r}\n" + buf.getvalue()
                + f"-- gold answer: {p.answer}\n")
        with open(os.path.join(self.out, "transcript.txt"), "w") as f:
            f.write(text)
        return text

    def run(self) -> dict[str, Any]:
        import torch

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        t0 = time.perf_counter()
        models = self.run_stages()
        res = self.evaluate(models)
        self.plots(res)
        self.transcript(models["NPR"])
        wall = time.perf_counter() - t0
        payload = self.report(models, res, wall)
        self.log("")
        with open(os.path.join(self.out, "results.md")) as f:
            self.log(f.read())
        self.log(f"npr demo: done in {wall / 60:.1f} min -> {self.out}")
        return payload


def _param_count(path: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())


def _result(d: dict[str, Any]) -> Any:
    from npr.tasks.evaluate import EvalResult

    d = {k: v for k, v in d.items() if k != "wall_s"}
    return EvalResult(**d)


def _latency_row(name: str, r: Any) -> str:
    """A markdown row of the latency table from an EvalResult (plain models: no native column)."""
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    seq = r.sequential_tok_s if r.sequential_tok_s is not None else r.plain_tok_s
    speed = ("-" if r.achieved_speedup is None
             else f"{r.achieved_speedup:.2f}x ({r.ideal_speedup:.2f}x)")
    return f"| {name} | {num(r.native_tok_s, '.0f')} | {num(seq, '.0f')} | {speed} | {num(r.wall_s, '.2f')} |"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return " -> ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}


def add_arguments(p: Any) -> None:
    p.add_argument("--quick", action="store_true", help="toy size (CI smoke run, ~2 min)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: Any) -> dict[str, Any]:
    cfg = quick_config(args.seed) if args.quick else full_config(args.seed)
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    return Demo(cfg, out, progress=not args.no_progress).run()
