"""Command line: `npr demo | generate | bench | train | eval`.

Each bench suite lives in npr/bench/<suite>.py and exposes `add_arguments(parser)` and
`run(args) -> list[dict]`; the rows are printed as a table and written as JSON with --json.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCH_SUITES = ("attention", "kv", "linear", "speedup", "peers", "papo", "train-attention",
               "throughput", "threads")


def _bench_module(suite: str):
    return importlib.import_module(f"npr.bench.{suite.replace('-', '_')}")


def _available_suites() -> list[str]:
    out = []
    for s in BENCH_SUITES:
        try:
            _bench_module(s)
            out.append(s)
        except ModuleNotFoundError as e:
            if e.name != f"npr.bench.{s.replace('-', '_')}":
                raise
    return out


def _cmd_bench(argv: list[str]) -> int:
    from npr.bench import common

    suites = _available_suites()
    p = argparse.ArgumentParser(prog="npr bench", description="microbenchmarks", add_help=False)
    p.add_argument("suite", nargs="?", choices=suites + ["all"])
    p.add_argument("--json", metavar="PATH", help="write the result rows as JSON here")
    p.add_argument("--quick", action="store_true", help="a few small cases (smoke run)")
    p.add_argument("-h", "--help", action="store_true", help="show this help (with the suite's "
                   "own options when a suite is named) and exit")
    args, rest = p.parse_known_args(argv)

    def suite_parser(s: str) -> argparse.ArgumentParser:
        sp = argparse.ArgumentParser(prog=f"npr bench {s}", add_help=False,
                                     description=f"options of the {s} suite")
        mod = _bench_module(s)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(sp)
        return sp

    if args.suite is None and not args.help:
        p.error("name a suite (or all)")
    if args.help:
        p.print_help()
        if args.suite not in (None, "all"):
            print()
            suite_parser(args.suite).print_help()
        return 0
    chosen = suites if args.suite == "all" else [args.suite]
    all_rows: dict[str, list[dict]] = {}
    for s in chosen:
        mod = _bench_module(s)
        sp = suite_parser(s)
        sargs = sp.parse_args(rest if args.suite != "all" else [])
        sargs.quick = args.quick
        rows = mod.run(sargs)
        common.print_table(s, rows)
        all_rows[s] = rows
    if args.json:
        payload = all_rows if args.suite == "all" else all_rows[args.suite]
        common.write_json(args.json, payload)
    return 0


def _cmd_generate(argv: list[str]) -> int:
    import torch

    import npr
    from npr.tags import TAGS

    p = argparse.ArgumentParser(prog="npr generate", description="stream a native parallel generation")
    p.add_argument("model", help="HF folder or .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--parallel", choices=["native", "sequential", "off"], default="native")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    eng = npr.Engine(args.model, device=args.device)
    tok = eng.tokenizer
    parallel = args.parallel
    if parallel != "off" and eng.tag_ids is None:
        print("npr generate: the tokenizer has no NPR tag tokens; decoding with parallel='off'", file=sys.stderr)
        parallel = "off"
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    sp = npr.SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, parallel=parallel)
    eng.add_request(prompt, sp)
    step_close = eng.tag_ids["</step>"] if eng.tag_ids else None
    pending: dict[int, list[int]] = {}

    def on_token(request_id: int, sample: int, branch: int, token: int) -> None:
        # The trunk streams inline; each step is printed apart, whole, when it closes.
        if branch == 0:
            print(tok.decode([token], skip_special_tokens=False), end="", flush=True)
            return
        pending.setdefault(branch, []).append(token)
        if token == step_close:
            text = tok.decode(pending.pop(branch), skip_special_tokens=False)
            print(f"\n    [branch {branch}] {text}", end="", flush=True)

    eng.on_token = on_token
    out = None
    while eng.has_unfinished_requests():
        for done in eng.step():
            out = done
    print()
    if out is None:
        return 1
    c = out.outputs[0]
    print(f"-- finish: {c.finish_reason} {c.finish_detail}".rstrip())
    print(f"-- structure valid: {c.structure_valid}; stats: {c.stats}")
    st = eng.stats
    print(f"-- engine: {st['steps']} steps, {st['rows']} rows, {st['forward_s']:.2f} s in the model")
    return 0


def _cmd_train(argv: list[str]) -> int:
    from npr.train.__main__ import main as train_main

    return train_main(argv)


def _cmd_eval(argv: list[str]) -> int:
    from npr.tasks import evaluate

    p = argparse.ArgumentParser(prog="npr eval", description="accuracy, format, parallel rate and "
                                "native vs sequential decoding speed of a model")
    evaluate.add_arguments(p)
    evaluate.run(p.parse_args(argv))
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from npr import demo

    p = argparse.ArgumentParser(prog="npr demo", description="the whole NPR pipeline on a "
                                "synthetic task: base -> NPR-ZERO -> NPR-BETA -> NPR, and SR")
    demo.add_arguments(p)
    demo.main(p.parse_args(argv))
    return 0


COMMANDS = {
    "demo": _cmd_demo,
    "bench": _cmd_bench,
    "generate": _cmd_generate,
    "train": _cmd_train,
    "eval": _cmd_eval,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: npr {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"npr: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
