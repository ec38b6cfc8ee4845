"""Shared benchmark helpers: timing, machine facts, table/JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10, min_time_s: float = 0.0,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and best wall time (seconds) of fn() over iters runs after warmup runs."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * max(iters, 1):
            break
    return {"median_s": statistics.median(times), "best_s": min(times), "iters": len(times)}


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


def _keep_best(key: str, value: float) -> float:
    """Stores the best of this process's measurements of key: the VM's bandwidth drifts by up to
    ~1.6x within minutes, and a floor must not be slower than what the machine has shown."""
    _MEASURED[key] = max(value, _MEASURED.get(key, 0.0))
    return _MEASURED[key]


def read_bandwidth_gbs(device: str = "cpu", nbytes: int = 256 << 20,
                       refresh: bool = False) -> float:
    """Measured streaming read bandwidth (GB/s): a sum over a buffer larger than the caches (on
    this VM within ~5% of a hand-written AVX2 stream). Measured once per process, again on
    refresh; the best measurement is returned."""
    key = "read:" + device
    if key in _MEASURED and not refresh:
        return _MEASURED[key]
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = time_fn(lambda: x.sum(), warmup=2, iters=8, sync=sync)
    return _keep_best(key, nbytes / t["best_s"] / 1e9)


def gemm_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                refresh: bool = False) -> float:
    """Measured GEMM rate (GFLOP/s) of torch.mm at n x n x n: the practical peak of the machine's
    multiply-add units for dtype, with which benchmarks bound what any kernel could reach
    (roofline_ms). npr's CPU kernels compute in fp32 whatever the storage: pass float32 there.
    Measured once per process, again on refresh; the best measurement is returned."""
    key = f"gemm:{device}:{dtype}"
    if key in _MEASURED and not refresh:
        return _MEASURED[key]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = time_fn(lambda: torch.mm(a, b, out=c), warmup=2, iters=8, sync=sync)
    return _keep_best(key, 2 * n**3 / t["best_s"] / 1e9)


def refresh_rooflines(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Measures the read bandwidth and GEMM rate again (keeping the best): benchmarks call this
    between and after their passes, then derive roofline fields from the best rates."""
    read_bandwidth_gbs(device, refresh=True)
    gemm_gflops(device, dtype, refresh=True)


def roofline_ms(nbytes: float, flops: float, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """The least time (ms) a kernel could take to read nbytes from memory and do flops of
    multiply-add work in dtype on this machine: max(bytes / measured read bandwidth, flops /
    measured GEMM rate). Both rates are measured (the best so far in this process), so this is
    a practical bound, not a datasheet."""
    return max(nbytes / read_bandwidth_gbs(device), flops / gemm_gflops(device, dtype)) / 1e6


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
