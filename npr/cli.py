"""Command line: `npr demo | generate | bench | train | eval`.

Each bench suite lives in npr/bench/<suite>.py and exposes `add_arguments(parser)` and
`run(args) -> list[dict]`; the rows are printed as a table and written as JSON with --json.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCH_SUITES = ("attention", "kv", "linear", "speedup", "peers")


def _bench_module(suite: str):
    return importlib.import_module(f"npr.bench.{suite}")


def _available_suites() -> list[str]:
    out = []
    for s in BENCH_SUITES:
        try:
            _bench_module(s)
            out.append(s)
        except ModuleNotFoundError as e:
            if e.name != f"npr.bench.{s}":
                raise
    return out


def _cmd_bench(argv: list[str]) -> int:
    from npr.bench import common

    suites = _available_suites()
    p = argparse.ArgumentParser(prog="npr bench", description="microbenchmarks")
    p.add_argument("suite", choices=suites + ["all"])
    p.add_argument("--json", metavar="PATH", help="write the result rows as JSON here")
    p.add_argument("--quick", action="store_true", help="a few small cases (smoke run)")
    args, rest = p.parse_known_args(argv)
    chosen = suites if args.suite == "all" else [args.suite]
    all_rows: dict[str, list[dict]] = {}
    for s in chosen:
        mod = _bench_module(s)
        sp = argparse.ArgumentParser(prog=f"npr bench {s}")
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(sp)
        sargs = sp.parse_args(rest if args.suite != "all" else [])
        sargs.quick = args.quick
        rows = mod.run(sargs)
        common.print_table(s, rows)
        all_rows[s] = rows
    if args.json:
        payload = all_rows if args.suite == "all" else all_rows[args.suite]
        common.write_json(args.json, payload)
    return 0


COMMANDS = {
    "bench": _cmd_bench,
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
