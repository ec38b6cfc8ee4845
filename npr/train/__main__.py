"""`python -m npr.train {rl,sft,STAGE} --config FILE [section.key=value ...]`, also under
`torchrun --nproc-per-node N -m npr.train ...` (one process per rank).

rl / sft: the generic runs (npr.train.rl.run_from_config, npr.train.sft.run_from_config).
STAGE: a stage of npr.train.pipeline (zero / beta / papo / sr) when that module provides
STAGES = {name: fn(config_path | None, overrides: list[str]) -> int}.
"""
from __future__ import annotations

import argparse
import sys


def _stages() -> dict:
    import importlib

    try:
        pipeline = importlib.import_module("npr.train.pipeline")
    except ModuleNotFoundError as e:
        if e.name != "npr.train.pipeline":
            raise
        return {}
    return dict(getattr(pipeline, "STAGES", {}))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = _stages()
    names = ["rl", "sft", *sorted(stages)]
    p = argparse.ArgumentParser(prog="python -m npr.train", description="train (RL / SFT / a stage)")
    p.add_argument("command", choices=names)
    p.add_argument("--config", help="TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_intermixed_args(argv)
    from npr.train.config import ConfigError, RLConfig, SFTConfig, load_config

    try:
        if args.command in stages:
            return int(stages[args.command](args.config, args.overrides) or 0)
        if args.command == "rl":
            from npr.train.rl import run_from_config

            run_from_config(load_config(RLConfig, args.config, args.overrides))
        else:
            from npr.train.sft import run_from_config as run_sft

            run_sft(load_config(SFTConfig, args.config, args.overrides))
    except ConfigError as e:
        print(f"npr.train: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
