"""`npr bench threads`: decoding when the machine is shared with a busy process.

Colocated training (trainer and engine in one process, torchrun ranks on a small box) leaves the
engine's threads competing with other busy processes for cores. A fork-join team that ends every
parallel region at a barrier (OpenMP, at::parallel_for) then waits a scheduler time slice for any
thread a neighbour has descheduled, hundreds of times per decode step; npr's pool
(csrc/thread_pool.h) lets the running threads take the items of one that is not running.

Greedy decoding of SmolLM2-135M (or a tiny random Llama with --quick), `rows` prompts at once,
at 1 thread and at torch's default thread count, with the decode kernels on npr's pool and on
at::parallel_for, with no neighbour and with --busy busy processes (Python spinning, started
before the runs, stopped after). Every configuration runs --repeat times interleaved; the median
is kept (a busy machine's times spread widely). `vs_1_thread` is the time over the 1-thread time
of the same neighbour and backend: what adding threads costs (> 1) or saves (< 1).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from npr.bench import common

_SPIN = "import time\nwhile True:\n    pass\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="1,16", help="prompts decoded at once")
    p.add_argument("--tokens", type=int, default=40, help="new tokens per prompt")
    p.add_argument("--busy", type=int, default=1, help="busy neighbour processes")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backends", default="npr,openmp",
                   help="where the decode kernels split their work: npr's pool, at::parallel_for")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="the default thread count compared with 1 (default: torch's, %(default)s)")


def _model(quick: bool, tmp: str):
    import npr
    from npr.bench.speedup import smollm2_gguf
    from npr.bench.throughput import tiny_model_folder

    path = tiny_model_folder(os.path.join(tmp, "tiny")) if quick else smollm2_gguf()
    return npr.load_model(path, dtype=torch.float32), npr.load_tokenizer(path)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import npr
    from npr import _C

    if args.quick:
        args.rows, args.tokens, args.repeat, args.busy = "1,8", 8, 1, 1
    with tempfile.TemporaryDirectory(prefix="npr-threads-") as tmp:
        model, tok = _model(args.quick, tmp)
    eng = npr.Engine(model, tok, kv_cache_tokens=8192)
    eng.eos_ids = []  # no stop but the budget: every run decodes the same token count
    all_rows = [int(r) for r in args.rows.split(",")]
    prompt = list(range(10, 42))
    sp = npr.SamplingParams(temperature=0, max_new_tokens=args.tokens, parallel="off")

    def decode(rows: int) -> tuple[float, float, int]:
        """(seconds of the whole generation, seconds of its decode steps (one token per row),
        tokens those steps decoded)."""
        for _ in range(rows):
            eng.add_request(params=sp, input_ids=prompt)
        total = decode_s = 0.0
        decoded = 0
        while eng.has_unfinished_requests():
            before = eng.stats["tokens"]
            t0 = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t0
            total += dt
            if eng.stats["tokens"] - before == rows:  # every row fed one token: a decode step
                decode_s += dt
                decoded += rows
        return total, decode_s, decoded

    configs = [(b, t) for b in args.backends.split(",") for t in sorted({1, args.threads})]
    default_backend = _C.parallel_backend()
    default_threads = torch.get_num_threads()
    out = []
    try:
        for busy in (0, args.busy):
            procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(busy)]
            try:
                times: dict[tuple, list[tuple[float, float, int]]] = {}
                for r in all_rows:  # warm-up outside the timings
                    decode(r)
                for _ in range(max(1, args.repeat)):
                    for r in all_rows:
                        for backend, nth in configs:
                            _C.set_parallel_backend(backend)
                            torch.set_num_threads(nth)
                            times.setdefault((r, backend, nth), []).append(decode(r))
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            for (r, backend, nth), ts in times.items():
                one = times[(r, backend, 1)]
                med = statistics.median(t for t, _, _ in ts)
                dec = statistics.median(d for _, d, _ in ts)
                out.append({"busy_neighbours": busy, "rows": r, "backend": backend, "threads": nth,
                            "tokens": r * args.tokens, "median_s": med, "tok_s": r * args.tokens / med,
                            "decode_tok_s": ts[0][2] / dec,
                            "vs_1_thread": med / statistics.median(t for t, _, _ in one),
                            "decode_vs_1_thread": dec / statistics.median(d for _, d, _ in one)})
    finally:
        _C.set_parallel_backend(default_backend)
        torch.set_num_threads(default_threads)
    return out


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--quick", action="store_true")
    common.print_table("threads", run(p.parse_args()))
