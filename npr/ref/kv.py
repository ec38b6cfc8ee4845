"""Reference paged-KV writes: write_kv (tokens -> cache slots) and copy_blocks (whole blocks).

Cache layout per layer: k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim].
Both functions mutate the caches in place, like the kernels.
"""
from __future__ import annotations

import torch


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; slots: [T] int64 physical slot (block * block_size + offset), < 0 = skip.

    Writes k[t] to k_cache[slot // block_size, :, slot % block_size, :] (same for v).
    """
    bs = k_cache.shape[2]
    keep = slots >= 0
    s = slots[keep]
    if s.numel() and int(s.max()) >= k_cache.shape[0] * bs:
        raise ValueError(f"write_kv: slot {int(s.max())} out of range for "
                         f"{k_cache.shape[0]} blocks x {bs}")
    blk, off = s // bs, s % bs
    k_cache[blk, :, off, :] = k[keep]
    v_cache[blk, :, off, :] = v[keep]


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> None:
    """src, dst: [N] int64 block ids; k_cache[dst[i]] = k_cache[src[i]] (and v)."""
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]
