"""npr: native parallel reasoning — a branch-tree KV-cache engine and a PAPO trainer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from npr import _ext, ops  # noqa: F401  (loads torch.ops.npr when built)

__version__ = "0.1.0"

# Heavy submodules (transformers, gguf) load on first use.
_LAZY = {
    "load_model": ("npr.models.loader", "load_model"),
    "load_tokenizer": ("npr.models.loader", "load_tokenizer"),
    "Engine": ("npr.engine.engine", "Engine"),
    "SamplingParams": ("npr.engine.sampling_params", "SamplingParams"),
    "format": ("npr.format", None),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(mod_name)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'npr' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from npr import format  # noqa: F401
    from npr.engine.engine import Engine  # noqa: F401
    from npr.engine.sampling_params import SamplingParams  # noqa: F401
    from npr.models.loader import load_model, load_tokenizer  # noqa: F401
