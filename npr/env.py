"""Every environment knob npr reads, in one place.

One more is read by the compiled kernels themselves (csrc/cpu_isa.cpp): NPR_CPU_ISA=avx2 makes the
CPU kernels use their AVX2 variants even on a CPU with AVX-512 (npr._C.cpu_isa() says which run).
"""
from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


_cached: dict[str, bool] = {}


def reload() -> None:
    """Forget cached settings: the next query re-reads the environment (after changing
    os.environ in-process, e.g. in tests)."""
    _cached.clear()


def force_reference() -> bool:
    """NPR_FORCE_REF=1: use the pure-torch reference of every op (debugging, oracle runs).
    Read once and cached (every op asks, ~1 us per environment read); see reload()."""
    v = _cached.get("NPR_FORCE_REF")
    if v is None:
        v = _cached["NPR_FORCE_REF"] = _flag("NPR_FORCE_REF")
    return v


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (tests in CI)."""
    return _flag("TRITON_INTERPRET")


def num_threads() -> int | None:
    """NPR_NUM_THREADS: threads for CPU kernels (default: torch's setting)."""
    v = os.environ.get("NPR_NUM_THREADS")
    return int(v) if v else None
