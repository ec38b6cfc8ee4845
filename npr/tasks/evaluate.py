"""`npr eval MODEL --data FILE|TASK`: accuracy, format, parallelism and decoding speed of a model.

Two passes over the evaluation set, both through npr.Engine:

1. Accuracy: k samples per problem (greedy when k = 1 and temperature 0) -> avg@k (mean over all
   samples) and best@k (share of problems with >= 1 correct sample); format rate (the text
   passes the format check, spec §1); parallel rate (share of answers that executed >= 1 forked
   block of n >= 2 branches; 0 for plain decoding, which never forks); mean branches per fork.
2. Speed: the whole set decoded greedily, every problem at once, natively (branches as rows of
   one batch) and sequentially (same structure, one branch after another) on the same model,
   alternated `repeats` times, fastest kept. Achieved speedup = sequential / native wall time of
   the same trajectories (the token ids are compared); ideal = total / critical-path tokens
   (spec §3). A model without the tag tokens decodes plainly (parallel="off") once.

Answers: the last \\boxed{...} of the text against the gold answer, by exact match for the
built-in tasks and by npr.train.verify's math-verify checker for other JSONL files.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from npr import format as fmt


@dataclass(frozen=True)
class EvalItem:
    prompt: str    # the model's prompt text
    answer: str    # gold answer
    problem: str = ""


@dataclass
class EvalResult:
    model: str
    data: str
    problems: int
    k: int
    temperature: float
    mode: str                      # "native" (tag tokens) | "off" (plain decoding)
    accuracy_avg: float            # avg@k
    accuracy_best: float           # best@k
    format_rate: float
    parallel_rate: float
    branches_per_fork: float       # mean n over executed forked blocks (0: none)
    tokens: int = 0                # speed pass: generated tokens (all branches)
    critical_tokens: int = 0
    ideal_speedup: float = 1.0
    native_s: float | None = None
    sequential_s: float | None = None
    native_tok_s: float | None = None
    sequential_tok_s: float | None = None
    achieved_speedup: float | None = None
    same_trajectories: float | None = None   # share of problems decoded identically both ways
    plain_s: float | None = None             # mode "off": the plain decode's wall time
    plain_tok_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float | None:
        """The model's own way of answering the set: native when it can fork, else plain."""
        return self.native_s if self.mode == "native" else self.plain_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wall_s"] = self.wall_s
        return d


def load_items(data: str, n: int = 128, seed: int = 0,
               template: str | None = None) -> tuple[list[EvalItem], str]:
    """data: a JSONL file of {"problem", "answer"[, "task"]} rows or a task spec ("multiples",
    "multiples:k=4,n=5"; n held-out problems from `seed`). -> (items, checker kind)."""
    from npr import tasks
    from npr.tasks.multiples import prompt_text

    if os.path.isfile(data):
        rows = tasks.read_jsonl(data)
        specs = {r.get("task") for r in rows}
        if len(specs) == 1 and None not in specs and template is None:
            tasks.get_task(specs.pop())  # validates the spec
            return [EvalItem(prompt_text(r["problem"]), r["answer"], r["problem"]) for r in rows], "exact"
        tpl = template or "{problem}"
        return [EvalItem(tpl.format(problem=r["problem"]), r["answer"], r["problem"])
                for r in rows], "math"
    if data.endswith(".jsonl") or os.sep in data:
        raise FileNotFoundError(f"npr eval: no such data file {data!r}")
    task = tasks.get_task(data)
    return [EvalItem(prompt_text(p.text), p.answer, p.text) for p in tasks.eval_set(task, n, seed)], "exact"


def _forked_blocks(c: Any, prompt_ids: list[int], tag_ids: dict[str, int] | None,
                   max_branches: int) -> list[int]:
    """Branch counts of the blocks a native output executed ([] when none / invalid)."""
    if tag_ids is None or not c.structure_valid or not c.stats.get("forks"):
        return []
    try:
        lay = fmt.layout(prompt_ids + list(c.token_ids), tag_ids, prompt_len=len(prompt_ids),
                         max_branches=max_branches)
    except fmt.FormatError:
        return []
    return lay.branches


def _timed(engine: Any, prompts: Sequence[str], params: Any, batch: int) -> tuple[float, list[Any]]:
    """Wall time of decoding prompts `batch` at a time (0: all at once)."""
    step = batch or len(prompts)
    outs: list[Any] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), step):
        outs += engine.generate(list(prompts[i:i + step]), params)
    return time.perf_counter() - t0, outs


def make_engine(model: Any, tokenizer: Any, prompts: Sequence[str], *, rows: int,
                max_new_tokens: int, max_branches: int = 8, seed: int = 0) -> Any:
    """An engine sized for `rows` concurrent samples of these prompts."""
    import npr

    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    per_req = longest + max_new_tokens + 16
    return npr.Engine(model, tokenizer, max_branches=max_branches, seed=seed,
                      kv_cache_tokens=max(per_req * rows, 1024),
                      max_rows=max(64, rows * max_branches))


def accuracy_pass(engine: Any, items: Sequence[EvalItem], *, k: int = 1, temperature: float = 0.0,
                  max_new_tokens: int = 512, seed: int = 0, checker: str = "exact",
                  max_branches: int = 8, progress: bool = False, name: str = "",
                  data: str = "", parallel: str | None = None) -> EvalResult:
    """k samples per problem -> accuracy, format, parallel rate (see the module doc).
    parallel: None = native when the tokenizer has the tag tokens, else "off"; "off" decodes a
    tag model plainly (a sequential baseline)."""
    import npr

    if k < 1:
        raise ValueError(f"evaluate: k must be >= 1, got {k}")
    if not items:
        raise ValueError("evaluate: no problems")
    mode = parallel or ("native" if engine.tag_ids is not None else "off")
    if mode not in ("native", "off"):
        raise ValueError(f"evaluate: parallel must be native | off, got {mode!r}")
    sp = npr.SamplingParams(temperature=temperature, n=k, seed=seed, max_new_tokens=max_new_tokens,
                            parallel=mode)
    outs = engine.generate([it.prompt for it in items], sp, use_tqdm=progress)
    res = summarize(outs, items, k=k, checker=checker, tag_ids=engine.tag_ids if mode == "native"
                    else None, max_branches=max_branches)
    res.model, res.data, res.temperature, res.mode = name, data, temperature, mode
    return res


def summarize(outs: Sequence[Any], items: Sequence[EvalItem], *, k: int, checker: str = "exact",
              tag_ids: dict[str, int] | None = None, max_branches: int = 8) -> EvalResult:
    """Engine RequestOutputs (k samples each, in items' order) -> the accuracy-pass metrics.
    tag_ids None: plain decoding (nothing forked)."""
    from npr.train.verify import ExactMatch, MathVerifier

    if len(outs) != len(items) or any(len(o.outputs) != k for o in outs):
        raise ValueError(f"summarize: need {len(items)} outputs of {k} samples each")
    texts = [c.text for o in outs for c in o.outputs]
    golds = [it.answer for it in items for _ in range(k)]
    check = ExactMatch() if checker == "exact" else MathVerifier()
    try:
        correct = check([fmt.extract_answer(t) for t in texts], golds)
    finally:
        if hasattr(check, "close"):
            check.close()
    n_all = len(texts)
    forks = [_forked_blocks(c, list(o.prompt_token_ids), tag_ids, max_branches)
             for o in outs for c in o.outputs]
    sizes = [n for f in forks for n in f]
    return EvalResult(
        model="", data="", problems=len(items), k=k, temperature=0.0,
        mode="native" if tag_ids is not None else "off",
        accuracy_avg=sum(correct) / n_all,
        accuracy_best=sum(any(correct[i * k:(i + 1) * k]) for i in range(len(items))) / len(items),
        format_rate=sum(fmt.format_score(t, max_branches) == 0.0 for t in texts) / n_all,
        parallel_rate=sum(any(n >= 2 for n in f) for f in forks) / n_all,
        branches_per_fork=sum(sizes) / len(sizes) if sizes else 0.0,
        extra={"samples": [{"prompt": items[i // k].prompt, "text": t, "correct": bool(ok)}
                           for i, (t, ok) in enumerate(zip(texts[:k * 4], correct[:k * 4]))]},
    )


def speed_pass(engine: Any, prompts: Sequence[str], res: EvalResult, *, max_new_tokens: int = 512,
               repeats: int = 1, batch: int = 0) -> EvalResult:
    """Greedy decoding of the whole set: native vs sequential (res.mode "native") or plain
    (res.mode "off"); fills the speed fields of res (see the module doc) and returns it."""
    import npr

    if repeats < 1:
        raise ValueError(f"evaluate: repeats must be >= 1, got {repeats}")

    def params(parallel: str) -> Any:
        return npr.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, parallel=parallel,
                                  logprobs=False)

    if res.mode == "off":
        best = None
        for _ in range(repeats):
            wall, o = _timed(engine, prompts, params("off"), batch)
            best = wall if best is None else min(best, wall)
        toks = sum(len(x.outputs[0].token_ids) for x in o)
        res.tokens = res.critical_tokens = toks
        res.plain_s, res.plain_tok_s = best, toks / best
        return res
    t_nat: list[float] = []
    t_seq: list[float] = []
    for _ in range(repeats):  # alternated: drift of the machine hits both alike
        w, nat = _timed(engine, prompts, params("native"), batch)
        t_nat.append(w)
        w, seq = _timed(engine, prompts, params("sequential"), batch)
        t_seq.append(w)
    toks = sum(len(x.outputs[0].token_ids) for x in nat)
    crit = sum(int(x.outputs[0].stats["critical_path_tokens"]) for x in nat)
    res.tokens, res.critical_tokens = toks, crit
    res.ideal_speedup = toks / max(crit, 1)
    res.native_s, res.sequential_s = min(t_nat), min(t_seq)
    res.native_tok_s = toks / res.native_s
    res.sequential_tok_s = sum(len(x.outputs[0].token_ids) for x in seq) / res.sequential_s
    res.achieved_speedup = res.sequential_s / res.native_s
    res.same_trajectories = sum(a.outputs[0].token_ids == b.outputs[0].token_ids
                                for a, b in zip(nat, seq)) / len(prompts)
    return res


def evaluate(model: Any, items: Sequence[EvalItem], *, tokenizer: Any = None, k: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 512, seed: int = 0,
             checker: str = "exact", speed: bool = True, repeats: int = 1, batch: int = 0,
             max_branches: int = 8, name: str = "", data: str = "",
             progress: bool = False, parallel: str | None = None) -> EvalResult:
    """model: a path (HF folder / .gguf) or an npr model with `tokenizer`. See the module doc."""
    import npr

    if isinstance(model, str):
        from npr.train.pipeline import resolve_model

        name = name or model
        path = resolve_model(model) if os.path.isdir(model) else model  # a stage's out_dir too
        tokenizer = tokenizer or npr.load_tokenizer(path)
        model = npr.load_model(path)
    if tokenizer is None:
        raise ValueError("evaluate: pass the tokenizer with a model object")
    if not items:
        raise ValueError("evaluate: no problems")
    prompts = [it.prompt for it in items]
    engine = make_engine(model, tokenizer, prompts, rows=len(items) * max(k, 1),
                         max_new_tokens=max_new_tokens, max_branches=max_branches, seed=seed)
    res = accuracy_pass(engine, items, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                        seed=seed, checker=checker, max_branches=max_branches, progress=progress,
                        name=name, data=data, parallel=parallel)
    if speed:
        speed_pass(engine, prompts, res, max_new_tokens=max_new_tokens, repeats=repeats,
                   batch=batch)
    return res


COLUMNS = (("accuracy avg@k", "accuracy_avg", "pct"), ("best@k", "accuracy_best", "pct"),
           ("format", "format_rate", "pct"), ("parallel", "parallel_rate", "pct"),
           ("branches/fork", "branches_per_fork", "f2"),
           ("tok/s native", "native_tok_s", "f0"), ("tok/s sequential", "sequential_tok_s", "f0"),
           ("speedup (ideal)", "_speedup", "speedup"), ("wall s", "wall_s", "f2"))


def _cell(r: EvalResult, key: str, kind: str) -> str:
    if key == "_speedup":
        if r.achieved_speedup is None:
            return "-"
        return f"{r.achieved_speedup:.2f}x ({r.ideal_speedup:.2f}x)"
    if key == "sequential_tok_s" and r.mode == "off":
        v = r.plain_tok_s
    else:
        v = getattr(r, key)
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "f2":
        return f"{v:.2f}"
    return f"{v:.0f}"


def markdown_table(rows: Sequence[tuple[str, EvalResult]]) -> str:
    """rows: (label, result) -> a markdown table (plain decoding counts as sequential)."""
    head = "| model | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    sep = "|---|" + "---|" * len(COLUMNS)
    body = [f"| {label} | " + " | ".join(_cell(r, key, kind) for _, key, kind in COLUMNS) + " |"
            for label, r in rows]
    return "\n".join([head, sep, *body])


def add_arguments(p: Any) -> None:
    p.add_argument("model", help="HF folder, .gguf file, or a stage's out_dir (its latest checkpoint)")
    p.add_argument("--data", required=True,
                   help='JSONL of {"problem", "answer"} rows, or a task: multiples[:k=a-b,n=a-b]')
    p.add_argument("--n", type=int, default=128, help="problems drawn for a task (default 128)")
    p.add_argument("--k", type=int, default=1, help="samples per problem (avg@k, best@k)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0 = greedy for k=1, else 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checker", choices=["auto", "exact", "math"], default="auto",
                   help="answer check (auto: exact for tasks, math-verify for other files)")
    p.add_argument("--template", default=None, help='prompt template for files, "{problem}"')
    p.add_argument("--no-speed", action="store_true", help="skip the speed pass")
    p.add_argument("--repeats", type=int, default=1, help="speed pass repeats (fastest kept)")
    p.add_argument("--batch", type=int, default=0,
                   help="speed pass: problems decoded at once (default 0: all)")
    p.add_argument("--parallel", choices=["auto", "native", "off"], default="auto",
                   help="auto: native when the model has the tag tokens, else off (plain)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here")


def run(args: Any) -> EvalResult:
    items, kind = load_items(args.data, n=args.n, seed=args.seed, template=args.template)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.k == 1 else 1.0)
    res = evaluate(args.model, items, k=args.k, temperature=temperature,
                   max_new_tokens=args.max_new_tokens, seed=args.seed,
                   checker=kind if args.checker == "auto" else args.checker,
                   speed=not args.no_speed, repeats=args.repeats, batch=args.batch,
                   data=args.data, progress=True,
                   parallel=None if args.parallel == "auto" else args.parallel)
    print(markdown_table([(os.path.basename(os.path.normpath(args.model)), res)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_dict(), f, indent=2)
    return res
