"""Triton branch-tree (cascade) attention over a paged KV cache: the same plan as the C++/CUDA op.

Kernel 1, grid (work item, kv head, query-head tile): the item's queries x G heads (a
[BLOCK_M, D] tile) attend the item's cache entries one entry (block) per step with an online
softmax; writes a partial output + log-sum-exp per (query, head). Kernel 2, grid (query, head):
merges the query's partials by log-sum-exp.

Dots run in fp32 (input_precision="ieee": no tf32) for every storage dtype: correct first, and
decode is memory-bound. Tested on CPU with TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, seg_blocks, seg_fills, item_ents, item_part_indptr, part_q, part_nvis,
    o_part, lse_part,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    Hq, G, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2)
    p0 = tl.load(item_part_indptr + w)
    M = (tl.load(item_part_indptr + w + 1) - p0) * G
    if mt * BLOCK_M < M:
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < M
        d_mask = offs_d < D
        qi = offs_m // G
        head = kvh * G + offs_m % G
        tq = tl.load(part_q + p0 + qi, mask=m_mask, other=0)
        nv = tl.load(part_nvis + p0 + qi, mask=m_mask, other=0)
        q = tl.load(q_ptr + tq[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        q = q.to(tl.float32) * scale
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        e0 = tl.load(item_ents + 2 * w)
        e1 = tl.load(item_ents + 2 * w + 1)
        tok = 0
        for e in range(e0, e1):
            blk = tl.load(seg_blocks + e).to(tl.int64)
            fill = tl.load(seg_fills + e)
            n_mask = offs_n < fill
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + blk * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + blk * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
            valid = n_mask[None, :] & ((tok + offs_n)[None, :] < nv[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
            tok += fill
        out_row = (p0 + qi) * Hq + head
        l_safe = tl.where(m_mask, l_i, 1.0)  # padding rows (never stored) saw no key
        tl.store(o_part + out_row[:, None] * D + offs_d[None, :], acc / l_safe[:, None],
                 mask=m_mask[:, None] & d_mask[None, :])
        tl.store(lse_part + out_row, m_i + tl.log(l_safe), mask=m_mask)


@triton.jit
def _merge_kernel(o_part, lse_part, q_part_indptr, q_parts, out_ptr, stride_ot, stride_oh, Hq, D,
                  BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    a = tl.load(q_part_indptr + t)
    b = tl.load(q_part_indptr + t + 1)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i in range(a, b):
        p = tl.load(q_parts + i).to(tl.int64)
        lse = tl.load(lse_part + p * Hq + h)
        o = tl.load(o_part + (p * Hq + h) * D + offs_d, mask=d_mask, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp(m - m_new)
        wgt = tl.exp(lse - m_new)
        acc = acc * alpha + wgt * o
        l = l * alpha + wgt
        m = m_new
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d,
             (acc / l).to(out_ptr.dtype.element_ty), mask=d_mask)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan,
                   scale: float) -> torch.Tensor:
    """q: [T, Hq, D], k_cache/v_cache: [NB, Hkv, BS, D], plan: npr.ops.attention.TreeAttentionPlan
    (on q's device) -> o: [T, Hq, D] in q.dtype."""
    T, Hq, D = q.shape
    NB, Hkv, BS, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv:
        raise ValueError(f"tree_attention (triton): bad shapes q {tuple(q.shape)}, k_cache "
                         f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError("tree_attention (triton): q, k_cache, v_cache dtypes differ")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("tree_attention (triton): the caches' last dim must be contiguous")
    if plan.item_ents.device != q.device:
        raise ValueError(f"tree_attention (triton): plan is on {plan.item_ents.device}, q on "
                         f"{q.device}; use plan.to(device)")
    G = Hq // Hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    P, W = plan.num_parts, plan.num_items
    if T == 0:
        return out
    o_part = torch.empty(P, Hq, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(P, Hq, dtype=torch.float32, device=q.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = max(16, triton.next_power_of_2(BS))
    BLOCK_M = max(16, min(64, triton.next_power_of_2(plan.max_item_parts * G)))
    grid = (W, Hkv, triton.cdiv(plan.max_item_parts * G, BLOCK_M))
    if W:
        _partial_kernel[grid](
            q, k_cache, v_cache, plan.seg_blocks, plan.seg_fills, plan.item_ents,
            plan.item_part_indptr, plan.part_q, plan.part_nvis, o_part, lse_part,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), Hq, G, D, float(scale),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    _merge_kernel[(T, Hq)](o_part, lse_part, plan.q_part_indptr, plan.q_parts, out, out.stride(0),
                           out.stride(1), Hq, D, BLOCK_D=BLOCK_D)
    return out
