"""The paged KV cache's block pool (C++, csrc/block_pool.h), re-exported from npr._C.

    pool = BlockPool(num_blocks, block_size=16)
    t = pool.create(); r = pool.append(t, n)   # r.slots: physical slots, r.copies: (src, dst)
    pool.seal(t); kids = pool.fork(t, n); ...; pool.join(t, kids); pool.free(t)

Errors: OutOfBlocksError (a MemoryError; .needed, .available; the pool is left unchanged),
ValueError for unknown tables / bad arguments. See csrc/block_pool.h for the exact semantics.
"""
from __future__ import annotations

from typing import Any

from npr import _ext

__all__ = ["AppendResult", "BlockPool", "OutOfBlocksError"]


def __getattr__(name: str) -> Any:
    # Resolved lazily so `import npr.block_pool` works without the extension and fails clearly
    # (naming the build command) only when the pool is actually used.
    if name in __all__:
        return getattr(_ext.require("the KV block pool"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
