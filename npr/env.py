"""Every environment knob npr reads, in one place."""
from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def force_reference() -> bool:
    """NPR_FORCE_REF=1: use the pure-torch reference of every op (debugging, oracle runs)."""
    return _flag("NPR_FORCE_REF")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (tests in CI)."""
    return _flag("TRITON_INTERPRET")


def num_threads() -> int | None:
    """NPR_NUM_THREADS: threads for CPU kernels (default: torch's setting)."""
    v = os.environ.get("NPR_NUM_THREADS")
    return int(v) if v else None
