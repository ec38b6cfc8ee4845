"""Loads the compiled extension npr._C once; says clearly what is missing when it is absent."""
from __future__ import annotations

import warnings
from types import ModuleType

import torch  # noqa: F401  (the extension links against libtorch; load it first)

BUILD_HINT = (
    "build it with: pip install torch==2.13.0 && "
    "MAX_JOBS=2 pip install -e . --no-build-isolation"
)

_C: ModuleType | None
_IMPORT_ERROR: str | None
try:
    from npr import _C  # type: ignore[attr-defined,no-redef]

    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(e)
    warnings.warn(
        "npr._C (the compiled extension) is not available: torch.ops.npr kernels, the KV block "
        "pool and the C++ scheduler are disabled (the pure-torch reference ops still work); "
        f"{BUILD_HINT}. Import error: {e}",
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def require(feature: str) -> ModuleType:
    """Returns npr._C or raises a RuntimeError that names the feature and how to build."""
    if _C is None:
        raise RuntimeError(f"{feature} needs the compiled extension npr._C; {BUILD_HINT} "
                           f"(import error: {_IMPORT_ERROR})")
    return _C
