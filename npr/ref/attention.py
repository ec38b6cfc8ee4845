"""Reference branch-tree attention over a paged KV cache: gather each row's keys, masked softmax.

The tree is given as segments (lists of cache-block entries with a fill each) and, per row, a path
of segment ids; row r's keys are the concatenation of its segments' entries' first `fill` tokens.
Row r's queries are the last q_len_r positions of its keys (causal among themselves).
"""
from __future__ import annotations

import math

import torch


def _ints(x: torch.Tensor | list[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def row_slots(
    seg_indptr: torch.Tensor | list[int],
    seg_blocks: torch.Tensor | list[int],
    seg_fills: torch.Tensor | list[int],
    row_seg_indptr: torch.Tensor | list[int],
    row_segs: torch.Tensor | list[int],
) -> list[tuple[list[int], list[int]]]:
    """Per row: (block ids, in-block offsets) of its keys in order, one pair per key token."""
    si, sb, sf = _ints(seg_indptr), _ints(seg_blocks), _ints(seg_fills)
    ri, rs = _ints(row_seg_indptr), _ints(row_segs)
    out = []
    for r in range(len(ri) - 1):
        blocks: list[int] = []
        offs: list[int] = []
        for s in rs[ri[r]:ri[r + 1]]:
            for e in range(si[s], si[s + 1]):
                blocks.extend([sb[e]] * sf[e])
                offs.extend(range(sf[e]))
        out.append((blocks, offs))
    return out


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seg_indptr: torch.Tensor | list[int],
    seg_blocks: torch.Tensor | list[int],
    seg_fills: torch.Tensor | list[int],
    row_seg_indptr: torch.Tensor | list[int],
    row_segs: torch.Tensor | list[int],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k_cache, v_cache: [NB, Hkv, BS, D] -> per row (K [Hkv, L_r, D], V [Hkv, L_r, D]), contiguous
    (the layout torch SDPA takes; also the baseline's gather)."""
    out = []
    for blocks, offs in row_slots(seg_indptr, seg_blocks, seg_fills, row_seg_indptr, row_segs):
        b = torch.tensor(blocks, dtype=torch.long, device=k_cache.device)
        o = torch.tensor(offs, dtype=torch.long, device=k_cache.device)
        # advanced indices on dims 0 and 2 -> [L, Hkv, D]
        out.append((k_cache[b, :, o].transpose(0, 1).contiguous(),
                    v_cache[b, :, o].transpose(0, 1).contiguous()))
    return out


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_indptr: torch.Tensor | list[int],
    seg_indptr: torch.Tensor | list[int],
    seg_blocks: torch.Tensor | list[int],
    seg_fills: torch.Tensor | list[int],
    row_seg_indptr: torch.Tensor | list[int],
    row_segs: torch.Tensor | list[int],
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """q: [T, Hq, D], k_cache/v_cache: [NB, Hkv, BS, D] -> o: [T, Hq, D] in q.dtype.

    Computed in compute_dtype (float64 for a tight oracle). Row r's query i attends its keys
    j <= L_r - q_len_r + i.
    """
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"tree_attention: Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qi = _ints(q_indptr)
    if qi[-1] != T:
        raise ValueError(f"tree_attention: q_indptr[-1]={qi[-1]} != T={T}")
    o = torch.empty(T, Hq, D, dtype=compute_dtype, device=q.device)
    kv = gather_kv(k_cache, v_cache, seg_indptr, seg_blocks, seg_fills, row_seg_indptr, row_segs)
    for r, (K, V) in enumerate(kv):
        a, b = qi[r], qi[r + 1]
        n, L = b - a, K.shape[1]
        if n == 0:
            continue
        if n > L:
            raise ValueError(f"tree_attention: row {r} has {n} queries but only {L} keys")
        Kc = K.to(compute_dtype).repeat_interleave(G, dim=0)  # [Hq, L, D]
        Vc = V.to(compute_dtype).repeat_interleave(G, dim=0)
        Q = q[a:b].to(compute_dtype).transpose(0, 1)  # [Hq, n, D]
        s = torch.matmul(Q, Kc.transpose(1, 2)) * scale  # [Hq, n, L]
        pos = torch.arange(L - n, L, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(L, device=q.device)[None, :] > pos, float("-inf"))
        o[a:b] = torch.matmul(torch.softmax(s, dim=-1), Vc).transpose(0, 1)
    return o.to(q.dtype)
