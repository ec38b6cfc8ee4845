"""Triton kernels of the paged KV writes: write_kv and copy_blocks (pure copies, any dtype).

Cache layout per layer: k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim] with
head_dim contiguous. Arguments are checked by the caller (npr.ops.kv); the kernels additionally
mask out-of-range slots / block ids so a bad id can never write outside the cache.
Runs on CPU tensors with TRITON_INTERPRET=1 (tests) and on CUDA tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     k_s0, k_s1, v_s0, v_s1,
                     kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2,
                     H, D, block_size, num_slots,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    slot = tl.load(slot_ptr + t)
    ok = (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0)
    blk = slot // block_size
    off = slot % block_size
    mask = (h < H) & (d < D) & ok
    kx = tl.load(k_ptr + t * k_s0 + h * k_s1 + d, mask=mask)
    tl.store(kc_ptr + blk * kc_s0 + h * kc_s1 + off * kc_s2 + d, kx, mask=mask)
    vx = tl.load(v_ptr + t * v_s0 + h * v_s1 + d, mask=mask)
    tl.store(vc_ptr + blk * vc_s0 + h * vc_s1 + off * vc_s2 + d, vx, mask=mask)


@triton.jit
def _copy_blocks_kernel(kc_ptr, vc_ptr, src_ptr, dst_ptr,
                        kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2,
                        num_blocks, block_size, D,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    s = tl.load(src_ptr + i)
    dd = tl.load(dst_ptr + i)
    ok = (s >= 0) & (s < num_blocks) & (dd >= 0) & (dd < num_blocks)
    s = tl.where(ok, s, 0)
    dd = tl.where(ok, dd, 0)
    o = tl.arange(0, BLOCK_S).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (o < block_size) & (d < D) & ok
    kx = tl.load(kc_ptr + s * kc_s0 + h * kc_s1 + o * kc_s2 + d, mask=mask)
    tl.store(kc_ptr + dd * kc_s0 + h * kc_s1 + o * kc_s2 + d, kx, mask=mask)
    vx = tl.load(vc_ptr + s * vc_s0 + h * vc_s1 + o * vc_s2 + d, mask=mask)
    tl.store(vc_ptr + dd * vc_s0 + h * vc_s1 + o * vc_s2 + d, vx, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (head_dim contiguous); slots: [T] int64, < 0 = skip. In place."""
    T, H, D = k.shape
    if T == 0 or H == 0 or D == 0:
        return
    nb, _, bs, _ = k_cache.shape
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // block_d))
    grid = (T, triton.cdiv(H, block_h))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, D, bs, nb * bs,
        BLOCK_H=block_h, BLOCK_D=block_d,
    )


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> None:
    """src, dst: [N] int64 block ids; k_cache[dst[i]] = k_cache[src[i]] (and v). In place."""
    N = src.shape[0]
    nb, H, bs, D = k_cache.shape
    if N == 0 or H == 0 or bs == 0 or D == 0:
        return
    _copy_blocks_kernel[(N, H)](
        k_cache, v_cache, src, dst,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        nb, bs, D,
        BLOCK_S=triton.next_power_of_2(bs), BLOCK_D=triton.next_power_of_2(D),
    )
