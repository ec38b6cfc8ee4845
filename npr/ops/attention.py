"""Branch-tree (cascade / shared-prefix) attention over a paged KV cache.

A batch step's tree is planned ONCE (`plan`, shared by all layers) into work items; each layer then
calls `tree_attention(q, k_cache, v_cache, plan)`.

Work item = (one chunk of one segment's entries, a group of rows listing that segment, with their
queries). A segment listed by several rows becomes items whose rows all read it together (for a kv
head: rows x G query heads against each key, the key read once per group); a segment listed by one
row is that row's own part. Every item writes a partial output + log-sum-exp per (query, head); a
merge combines each query's partials by log-sum-exp.

Plan tensors (all int32; P = number of partials, one per (item, query)):
    item_ents [W, 2]          entry range [e0, e1) of seg_blocks/seg_fills the item reads
    item_part_indptr [W + 1]  item w owns partials item_part_indptr[w] : item_part_indptr[w + 1]
    part_q [P]                query token of each partial
    part_nvis [P]             keys of the item that query sees (a prefix of the item's tokens:
                              the causal limit); >= 1
    q_part_indptr [T + 1], q_parts [P]   the merge lists: partials of each query
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from npr import _ext, env
from npr.ref import attention as ref_attention

_I32 = torch.int32


@dataclass(frozen=True)
class TreeAttentionPlan:
    # the tree (as given; int32)
    q_indptr: torch.Tensor  # [R + 1]
    seg_indptr: torch.Tensor  # [S + 1]
    seg_blocks: torch.Tensor  # [E]
    seg_fills: torch.Tensor  # [E]
    row_seg_indptr: torch.Tensor  # [R + 1]
    row_segs: torch.Tensor  # [sum of path lengths]
    # the work items (see module doc)
    item_ents: torch.Tensor  # [W, 2]
    item_part_indptr: torch.Tensor  # [W + 1]
    part_q: torch.Tensor  # [P]
    part_nvis: torch.Tensor  # [P]
    q_part_indptr: torch.Tensor  # [T + 1]
    q_parts: torch.Tensor  # [P]
    # host-side facts
    block_size: int
    num_queries: int  # T
    max_item_parts: int  # most queries in one item (sizes the GPU grid)
    row_lens: tuple[int, ...]  # L_r per row
    kv_tokens_read: int  # key tokens the items read per kv head (a shared chunk once per group)

    @property
    def num_items(self) -> int:
        return int(self.item_ents.shape[0])

    @property
    def num_parts(self) -> int:
        return int(self.part_q.shape[0])

    def to(self, device: torch.device | str) -> "TreeAttentionPlan":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return TreeAttentionPlan(**kw)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The op's integer tensor arguments in schema order."""
        return (self.q_indptr, self.seg_indptr, self.seg_blocks, self.seg_fills,
                self.row_seg_indptr, self.row_segs, self.item_ents, self.item_part_indptr,
                self.part_q, self.part_nvis, self.q_part_indptr, self.q_parts)


def _np(x: torch.Tensor | list[int] | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"tree_attention plan: {name} must be an integer tensor, got {x.dtype}")
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"tree_attention plan: {name} must be 1-D, got shape {tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"tree_attention plan: {name} must hold integers, got {a.dtype}")
    return a.astype(np.int64)


def _check_indptr(a: np.ndarray, name: str, n: int | None = None) -> None:
    if a.size < 1 or a[0] != 0 or np.any(np.diff(a) < 0):
        raise ValueError(f"tree_attention plan: {name} must start at 0 and be non-decreasing")
    if n is not None and a[-1] != n:
        raise ValueError(f"tree_attention plan: {name}[-1]={a[-1]} but the array it indexes "
                         f"has {n} elements")


def plan(
    q_indptr: torch.Tensor | list[int],
    seg_indptr: torch.Tensor | list[int],
    seg_blocks: torch.Tensor | list[int],
    seg_fills: torch.Tensor | list[int],
    row_seg_indptr: torch.Tensor | list[int],
    row_segs: torch.Tensor | list[int],
    block_size: int,
    *,
    num_blocks: int | None = None,
    kv_chunk: int | None = None,
    max_item_queries: int = 64,
    device: torch.device | str | None = None,
    reference: bool = False,
) -> TreeAttentionPlan:
    """Plans one batch step's tree attention (shared by all layers). Validates the tree.

    q_indptr [R+1]: row r owns queries q_indptr[r]:q_indptr[r+1] (the last positions of its keys).
    seg_indptr [S+1], seg_blocks [E], seg_fills [E]: segment s = entries seg_indptr[s]:..[s+1];
        each entry is (cache block id, tokens used in it: 1..block_size).
    row_seg_indptr [R+1], row_segs: row r's path = row_segs[row_seg_indptr[r]:..[r+1]], root first.
    kv_chunk: split long segments into items of about this many tokens (parallelism / split-KV;
        default 1024 on CPU, 256 on CUDA). max_item_queries: at most this many queries per item.
    device: where the plan tensors go (default: where q_indptr is).
    reference: plan with the step-by-step numpy version (the compiled planner's oracle).
    """
    if device is None:
        device = q_indptr.device if isinstance(q_indptr, torch.Tensor) else "cpu"
    device = torch.device(device)
    if kv_chunk is None:
        kv_chunk = 256 if device.type == "cuda" else 1024
    if block_size < 1 or kv_chunk < 1 or max_item_queries < 1:
        raise ValueError("tree_attention plan: block_size, kv_chunk and max_item_queries must be "
                         f">= 1, got {block_size}, {kv_chunk}, {max_item_queries}")
    arrays = [_np(a, name) for a, name in ((q_indptr, "q_indptr"), (seg_indptr, "seg_indptr"),
                                           (seg_blocks, "seg_blocks"), (seg_fills, "seg_fills"),
                                           (row_seg_indptr, "row_seg_indptr"), (row_segs, "row_segs"))]
    if reference or not _ext.available():
        return _plan_numpy(*arrays, block_size, num_blocks, kv_chunk, max_item_queries, device)
    buf, sizes, max_parts, row_lens, kv_read = _ext._C.plan_tree_attention(
        *(torch.from_numpy(a) for a in arrays), block_size,
        -1 if num_blocks is None else num_blocks, kv_chunk, max_item_queries)
    return _package(buf, sizes, block_size, max_parts, tuple(row_lens), kv_read, device)


def _plan_numpy(qi: np.ndarray, si: np.ndarray, sb: np.ndarray, sf: np.ndarray, ri: np.ndarray,
                rs: np.ndarray, block_size: int, num_blocks: int | None, kv_chunk: int,
                max_item_queries: int, device: torch.device) -> TreeAttentionPlan:
    """The planner step by step in numpy: the reference of csrc/tree_attention_plan.cpp (same
    items in the same order, same errors) and the path without the extension."""
    _check_indptr(qi, "q_indptr")
    _check_indptr(si, "seg_indptr", sb.size)
    _check_indptr(ri, "row_seg_indptr", rs.size)
    if sf.size != sb.size:
        raise ValueError(f"tree_attention plan: seg_fills has {sf.size} entries, seg_blocks {sb.size}")
    R, S, T = qi.size - 1, si.size - 1, int(qi[-1])
    if ri.size != R + 1:
        raise ValueError(f"tree_attention plan: row_seg_indptr has {ri.size} elements, expected "
                         f"R+1={R + 1} (q_indptr has R+1)")
    if sf.size and (sf.min() < 1 or sf.max() > block_size):
        e = int(np.flatnonzero((sf < 1) | (sf > block_size))[0])
        raise ValueError(f"tree_attention plan: seg_fills[{e}]={sf[e]} outside 1..block_size="
                         f"{block_size}")
    if sb.size and (sb.min() < 0 or (num_blocks is not None and sb.max() >= num_blocks)):
        e = int(np.flatnonzero((sb < 0) | (sb >= (np.iinfo(np.int64).max if num_blocks is None
                                                        else num_blocks)))[0])
        raise ValueError(f"tree_attention plan: seg_blocks[{e}]={sb[e]} is not a block id in "
                         f"[0, {num_blocks})")
    if rs.size and (rs.min() < 0 or rs.max() >= S):
        raise ValueError(f"tree_attention plan: row_segs holds a segment id outside [0, {S})")

    cum = np.concatenate([[0], np.cumsum(sf)])  # token offset of each entry, global
    seg_ntok = cum[si[1:]] - cum[si[:-1]]  # [S]
    qlen = np.diff(qi)
    row_len = np.zeros(R, dtype=np.int64)
    listing: list[list[tuple[int, int]]] = [[] for _ in range(S)]  # s -> [(row, key offset)]
    for r in range(R):
        path = rs[ri[r]:ri[r + 1]]
        if np.unique(path).size != path.size:
            raise ValueError(f"tree_attention plan: row {r} lists a segment twice: {path.tolist()}")
        offs = np.concatenate([[0], np.cumsum(seg_ntok[path])])
        row_len[r] = offs[-1]
        if qlen[r] > row_len[r]:
            raise ValueError(f"tree_attention plan: row {r} has {qlen[r]} queries but only "
                             f"{row_len[r]} key tokens (its queries are its last positions)")
        for s, o in zip(path.tolist(), offs[:-1].tolist()):
            listing[s].append((r, o))
    for s in range(S):
        if len(listing[s]) > 1:
            for r, o in listing[s]:
                if o + seg_ntok[s] > row_len[r] - qlen[r]:
                    raise ValueError(
                        f"tree_attention plan: segment {s} is shared by rows "
                        f"{[x for x, _ in listing[s]]} but reaches into row {r}'s query positions "
                        f"(segment ends at key {o + seg_ntok[s]}, row {r}'s queries start at "
                        f"{row_len[r] - qlen[r]}); a shared segment must lie before every "
                        "sharing row's queries")

    items: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []  # (cost, e0, e1, q, nvis)
    s = 0
    while s < S:
        # A run of consecutive segments that one row alone reads, one after the other in its
        # path (a plain row's prompt and trunk), is one segment to the items: half the tasks.
        s_end = s
        while (len(listing[s_end]) == 1 and s_end + 1 < S and len(listing[s_end + 1]) == 1
               and listing[s_end + 1][0][0] == listing[s][0][0]
               and listing[s_end + 1][0][1] == listing[s_end][0][1] + seg_ntok[s_end]):
            s_end += 1
        e_lo, e_hi = int(si[s]), int(si[s_end + 1])
        rows = [(r, o) for r, o in listing[s] if qlen[r] > 0]
        s = s_end + 1
        if e_lo == e_hi or not rows:
            continue
        tok_in_seg = cum[e_lo:e_hi + 1] - cum[e_lo]  # entry start offsets within s, + end
        # chunk c = the entries whose start lies in [c * kv_chunk, (c + 1) * kv_chunk)
        chunk_of = tok_in_seg[:-1] // kv_chunk
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        chunk_starts = np.concatenate([[0], bounds])
        chunk_ends = np.concatenate([bounds, [e_hi - e_lo]])
        # query groups: consecutive (row, query) pairs, at most max_item_queries each
        qs = np.concatenate([np.arange(qi[r], qi[r + 1]) for r, _ in rows])
        # key position of each query minus the segment's offset in that query's row
        rel = np.concatenate([row_len[r] - qlen[r] - o + np.arange(qlen[r]) for r, o in rows])
        for g0 in range(0, qs.size, max_item_queries):
            gq, grel = qs[g0:g0 + max_item_queries], rel[g0:g0 + max_item_queries]
            for c0, c1 in zip(chunk_starts.tolist(), chunk_ends.tolist()):
                t0, t1 = tok_in_seg[c0], tok_in_seg[c1]
                nvis = np.clip(grel - t0 + 1, 0, t1 - t0)
                keep = nvis > 0
                if not keep.any():
                    continue
                nmax = int(nvis.max())
                # drop trailing entries no query of this item sees (causal prefill chunks)
                c1_eff = c0 + int(np.searchsorted(tok_in_seg[c0:c1 + 1] - t0, nmax, side="left"))
                items.append((nmax * int(keep.sum()), e_lo + c0, e_lo + c1_eff, gq[keep],
                              nvis[keep]))
    # most expensive first: the CPU kernel hands items out dynamically (longest-first balance)
    items.sort(key=lambda it: -it[0])
    W = len(items)
    item_ents = np.array([[it[1], it[2]] for it in items], dtype=np.int64).reshape(W, 2)
    nparts = np.array([it[3].size for it in items], dtype=np.int64)
    item_part_indptr = np.concatenate([[0], np.cumsum(nparts)])
    part_q = np.concatenate([it[3] for it in items]) if W else np.zeros(0, np.int64)
    part_nvis = np.concatenate([it[4] for it in items]) if W else np.zeros(0, np.int64)
    q_parts = np.argsort(part_q, kind="stable")
    counts = np.bincount(part_q, minlength=T)
    if T and counts.min() < 1:  # cannot happen for a valid tree (query i sees key L - qlen + i)
        raise AssertionError(f"tree_attention plan: query {int(np.argmin(counts))} got no work")
    q_part_indptr = np.concatenate([[0], np.cumsum(counts)])
    kv_tokens_read = int(sum(cum[it[2]] - cum[it[1]] for it in items))

    parts = [qi, si, sb, sf, ri, rs, item_ents.reshape(-1), item_part_indptr, part_q, part_nvis,
             q_part_indptr, q_parts]
    buf = torch.from_numpy(np.concatenate(parts).astype(np.int32))
    return _package(buf, [a.size for a in parts], block_size, int(nparts.max()) if W else 0,
                    tuple(int(x) for x in row_len), kv_tokens_read, device)


def _package(buf: torch.Tensor, sizes: list[int], block_size: int, max_item_parts: int,
             row_lens: tuple[int, ...], kv_tokens_read: int, device: torch.device) -> TreeAttentionPlan:
    """buf: int32 [sum(sizes)], the 12 plan tensors back to back -> the plan on device: one
    host-to-device copy; the plan's tensors are contiguous views of it."""
    return plan_from_parts(torch.split(buf.to(device), list(sizes)), block_size, max_item_parts,
                           row_lens, kv_tokens_read)


def plan_from_parts(parts: tuple[torch.Tensor, ...] | list[torch.Tensor], block_size: int,
                    max_item_parts: int, row_lens: tuple[int, ...],
                    kv_tokens_read: int) -> TreeAttentionPlan:
    """The 12 int32 plan tensors in TreeAttentionPlan.tensors() order (item_ents flat) and the
    host-side facts -> a TreeAttentionPlan (no copies)."""
    (t_qi, t_si, t_sb, t_sf, t_ri, t_rs, t_ie, t_ipi, t_pq, t_pn, t_qpi, t_qp) = parts
    return TreeAttentionPlan(
        q_indptr=t_qi, seg_indptr=t_si, seg_blocks=t_sb, seg_fills=t_sf,
        row_seg_indptr=t_ri, row_segs=t_rs,
        item_ents=t_ie.view(-1, 2), item_part_indptr=t_ipi, part_q=t_pq,
        part_nvis=t_pn, q_part_indptr=t_qpi, q_parts=t_qp,
        block_size=int(block_size), num_queries=int(t_qpi.numel()) - 1,
        max_item_parts=int(max_item_parts), row_lens=tuple(row_lens),
        kv_tokens_read=int(kv_tokens_read),
    )


if _ext.available():

    @torch.library.register_fake("npr::tree_attention")
    def _tree_attention_fake(q, k_cache, v_cache, q_indptr, seg_indptr, seg_blocks, seg_fills,
                             row_seg_indptr, row_segs, item_ents, item_part_indptr, part_q,
                             part_nvis, q_part_indptr, q_parts, max_item_parts, scale):
        return torch.empty_like(q)


BACKENDS = ("auto", "cpp", "cuda", "triton", "ref")


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: TreeAttentionPlan,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q: [T, Hq, D], k_cache/v_cache: [NB, Hkv, BS, D] -> o: [T, Hq, D] (q.dtype).

    backend: "auto" (the compiled op for q's device when built, else Triton on CUDA, else the
    reference), "cpp" / "cuda" (torch.ops.npr.tree_attention), "triton", or "ref".
    """
    if backend not in BACKENDS:
        raise ValueError(f"tree_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"tree_attention: q must be [T, Hq, D] and k_cache [NB, Hkv, BS, D]; got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    if k_cache.shape[2] != plan.block_size:
        raise ValueError(f"tree_attention: the cache's block size {k_cache.shape[2]} differs from "
                         f"the plan's {plan.block_size}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        if env.force_reference():
            backend = "ref"
        elif _ext.available() and (q.device.type == "cpu" or
                                   (q.device.type == "cuda" and _ext.with_cuda())):
            backend = "cuda" if q.device.type == "cuda" else "cpp"
        elif q.device.type == "cuda":
            backend = "triton"
        else:
            backend = "ref"
    if backend == "ref":
        return ref_attention.tree_attention(q, k_cache, v_cache, plan.q_indptr, plan.seg_indptr,
                                            plan.seg_blocks, plan.seg_fills, plan.row_seg_indptr,
                                            plan.row_segs, scale)
    if backend == "triton":
        from npr.kernels import tree_attention_triton

        return tree_attention_triton.tree_attention(q, k_cache, v_cache, plan, scale)
    _ext.require("npr::tree_attention")
    return torch.ops.npr.tree_attention(q, k_cache, v_cache, *plan.tensors(), plan.max_item_parts,
                                        scale)
