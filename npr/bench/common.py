"""Shared benchmark helpers: timing, machine facts, table/JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Hashable

import torch


def time_interleaved(fns: dict[Hashable, Callable[[], Any]], *, warmup: int = 2, iters: int = 10,
                     sync: Callable[[], None] | None = None) -> dict[Hashable, dict[str, float]]:
    """Median and best wall time (seconds) of each function over iters rounds after warmup
    rounds, one call of each in turn: for functions whose time ratios are reported, a drift of
    the machine's speed during the rounds (10-80% within minutes on the CPU VM) hits every
    function alike instead of whichever ran in the slow minute."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(max(iters, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "best_s": min(t), "iters": len(t)}
            for name, t in times.items()}


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and best wall time (seconds) of fn() over iters runs after warmup runs."""
    return time_interleaved({0: fn}, warmup=warmup, iters=iters, sync=sync)[0]


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans: nested or overlapping spans (a CPU op
    inside another, a copy beside a kernel) count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def busy_s(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """fn()'s result and the seconds `device` was busy while it ran: the union of the spans of
    the work torch.profiler saw there (CUDA: kernels and copies; CPU: the ops, the CPU twin the
    tests run). On a GPU, busy time / wall time says whether a loop is bound by the device (near
    1) or by the host launching its work (well below 1)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        out = fn()
        if cuda:
            torch.cuda.synchronize()
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    spans = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events()
             if e.device_type == want]
    return out, union_seconds(spans)


_MEASURED: dict[str, float] = {}


def copy_bandwidth_gbs(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured read+write copy bandwidth (GB/s, counting bytes read + written) of this machine."""
    if device in _MEASURED:
        return _MEASURED[device]
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = time_fn(lambda: dst.copy_(src), warmup=2, iters=8, sync=sync)
    _MEASURED[device] = 2 * nbytes / t["best_s"] / 1e9
    return _MEASURED[device]


def _read_gbs(device: str, nbytes: int, iters: int) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return nbytes / time_fn(lambda: x.sum(), warmup=2, iters=iters, sync=sync)["best_s"] / 1e9


def measure_rates(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(read GB/s, GEMM GFLOP/s) measured now, not cached: the VM's bandwidth drifts by up to
    ~1.8x within minutes (32-58 GB/s in one benchmark run), so a roofline must use rates
    measured next to the case it bounds. Read: torch's sum over 256 MiB (on this VM within ~5%
    of a hand-written AVX2 stream). GEMM: torch.mm at 1024^3 in dtype, a practical reference for the
    multiply-add units, not a strict peak (npr's packed linear has run 8% above it here). npr's
    CPU kernels compute in fp32 whatever the storage: pass float32 for them."""
    read = _read_gbs(device, 256 << 20, iters=5)
    n = 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = time_fn(lambda: torch.mm(a, b, out=c), warmup=2, iters=5, sync=sync)
    return read, 2 * n**3 / t["best_s"] / 1e9


def rates_around(device: str, dtype: torch.dtype,
                 run: Callable[[], Any]) -> tuple[Any, float, float]:
    """run()'s result and the best (read GB/s, GEMM GFLOP/s) of measurements just before and
    just after it: the rates the machine had while the cases in run() were timed."""
    r0, g0 = measure_rates(device, dtype)
    out = run()
    r1, g1 = measure_rates(device, dtype)
    return out, max(r0, r1), max(g0, g1)


def roofline_ms(nbytes: float, flops: float, read_gbs: float, gemm_gflops: float) -> float:
    """The least time (ms) a kernel could take to read nbytes from memory and do flops of
    multiply-add work on a machine that streams read_gbs and multiplies at gemm_gflops (both
    measured: a practical bound, not a datasheet): max(bytes / bandwidth, flops / rate)."""
    return max(nbytes / read_gbs, flops / gemm_gflops) / 1e6


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M"),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_isa": _cpu_isa(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_isa() -> str:
    """The ISA of npr's CPU kernel variants here ('avx512' / 'avx2'; NPR_CPU_ISA=avx2 forces
    AVX2), or 'none' without the extension: the VM type varies, so results record it."""
    try:
        from npr import _C

        return _C.cpu_isa()
    except ImportError:
        return "none"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print(f"== {title}: no rows")
        return
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: str, rows: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    print(f"wrote {path}")


def hf_model(path: str, device: str) -> Any:
    """HF transformers' model of the same checkpoint npr loads (an HF folder or a .gguf file),
    fp32, eval mode: the peer of the benchmarks."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.to(device).eval()
