"""Paged KV cache writes: write_kv (new tokens -> their slots) and copy_blocks (copy-on-write).

Cache layout per layer: k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
(HND per block, head_dim contiguous); dtypes float32 / bfloat16 / float16 (caches and k/v alike).

backend: "auto" (C++/CUDA op where built for the device, else Triton on CUDA, else the reference),
"cpp" (torch.ops.npr.*, CPU or CUDA), "triton" (npr/kernels/kv_triton.py; CPU tensors only with
TRITON_INTERPRET=1), "ref" (npr.ref.kv). NPR_FORCE_REF=1 makes "auto" pick the reference.

Bad arguments raise ValueError naming the problem. Slot / block-id range and dst-uniqueness are
checked for CPU tensors only: on a GPU that check would cost a device sync per call, so there the
kernels skip out-of-range ids instead of writing out of bounds.
"""
from __future__ import annotations

from typing import Literal

import torch

from npr import _ext, env
from npr.ref import kv as _ref

Backend = Literal["auto", "cpp", "triton", "ref"]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _ext.available():

    @torch.library.register_fake("npr::write_kv")
    def _write_kv_fake(k, v, k_cache, v_cache, slots) -> None:
        return None

    @torch.library.register_fake("npr::copy_blocks")
    def _copy_blocks_fake(k_cache, v_cache, src, dst) -> None:
        return None


def _check_caches(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"{op}: k_cache must be [num_blocks, num_kv_heads, block_size, head_dim],"
                         f" got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: cache dtype must be float32, bfloat16 or float16 (both alike), "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"{op}: k_cache on {k_cache.device} but v_cache on {v_cache.device}")
    if k_cache.shape[3] and (k_cache.stride(3) != 1 or v_cache.stride(3) != 1):
        raise ValueError(f"{op}: the caches' head_dim must be contiguous (stride 1)")


def _check_index(op: str, name: str, idx: torch.Tensor, cache: torch.Tensor) -> None:
    if idx.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be int64, got {idx.dtype}")
    if idx.device != cache.device:
        raise ValueError(f"{op}: {name} on {idx.device} but the caches on {cache.device}")


def _check_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    op = "npr::write_kv"
    _check_caches(op, k_cache, v_cache)
    if k.dim() != 3:
        raise ValueError(f"{op}: k must be [T, num_kv_heads, head_dim], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if k.shape[1] != k_cache.shape[1] or k.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{op}: k is [T, Hkv, D] = {tuple(k.shape)} but the cache holds "
                         f"Hkv={k_cache.shape[1]} heads of D={k_cache.shape[3]}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"{op}: k/v dtypes ({k.dtype}, {v.dtype}) must equal the cache dtype "
                         f"{k_cache.dtype}")
    if k.device != k_cache.device or v.device != k_cache.device:
        raise ValueError(f"{op}: k on {k.device}, v on {v.device} but the caches on "
                         f"{k_cache.device}")
    _check_index(op, "slots", slots, k_cache)
    if slots.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: slots has {slots.shape[0]} entries but k has T={k.shape[0]} "
                         "tokens")
    total = k_cache.shape[0] * k_cache.shape[2]
    if slots.device.type == "cpu" and slots.numel() and int(slots.max()) >= total:
        raise ValueError(f"{op}: slot {int(slots.max())} is out of range for a cache of "
                         f"{k_cache.shape[0]} blocks x {k_cache.shape[2]} = {total} slots")


def _check_copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor,
                       dst: torch.Tensor) -> None:
    op = "npr::copy_blocks"
    _check_caches(op, k_cache, v_cache)
    _check_index(op, "src", src, k_cache)
    _check_index(op, "dst", dst, k_cache)
    if src.shape[0] != dst.shape[0]:
        raise ValueError(f"{op}: src has {src.shape[0]} block ids but dst has {dst.shape[0]}")
    if src.device.type == "cpu" and src.numel():
        nb = k_cache.shape[0]
        for name, idx in (("src", src), ("dst", dst)):
            if int(idx.min()) < 0 or int(idx.max()) >= nb:
                raise ValueError(f"{op}: {name} holds a block id out of range [0, {nb})")
        d = dst.tolist()
        if len(set(d)) != len(d):
            raise ValueError(f"{op}: a dst block appears twice")
        if any(s in set(d) and s != t for s, t in zip(src.tolist(), d)):
            raise ValueError(f"{op}: a block is both a src and a dst (the result would depend on "
                             "the order of the copies)")


def _resolve(backend: Backend, device: torch.device) -> str:
    if backend not in ("auto", "cpp", "triton", "ref"):
        raise ValueError(f"backend must be 'auto', 'cpp', 'triton' or 'ref', got {backend!r}")
    if backend == "cpp":
        _ext.require("npr.ops.kv backend='cpp'")
        if device.type == "cuda" and not _ext.with_cuda():
            raise ValueError("backend='cpp' on a CUDA tensor needs npr._C built with CUDA")
        return "cpp"
    if backend == "triton" and device.type == "cpu" and not env.triton_interpret():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before "
                         "triton is imported)")
    if backend != "auto":
        return backend
    if env.force_reference():
        return "ref"
    if _ext.available() and (device.type == "cpu" or (device.type == "cuda" and _ext.with_cuda())):
        return "cpp"
    if device.type == "cuda":
        return "triton"
    return "ref"


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, *, backend: Backend = "auto") -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, Hkv, block_size, D] (written in place);
    slots: [T] int64 physical slot (block * block_size + offset; never a position), < 0 = skip.
    Non-negative slots must be distinct (the block pool hands out distinct slots)."""
    which = _resolve(backend, k_cache.device)
    if which == "cpp":
        torch.ops.npr.write_kv(k, v, k_cache, v_cache, slots)
        return
    _check_write_kv(k, v, k_cache, v_cache, slots)
    if which == "triton":
        from npr.kernels import kv_triton

        kv_triton.write_kv(k if k.stride(2) == 1 else k.contiguous(),
                           v if v.stride(2) == 1 else v.contiguous(), k_cache, v_cache, slots)
    else:
        _ref.write_kv(k, v, k_cache, v_cache, slots)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                *, backend: Backend = "auto") -> None:
    """k_cache, v_cache: [num_blocks, Hkv, block_size, D] (in place); src, dst: [N] int64 block ids.
    Copies whole blocks k_cache[dst[i]] = k_cache[src[i]] (and v): the pool's copy-on-write list.
    dst ids must be distinct and not appear among the src ids."""
    which = _resolve(backend, k_cache.device)
    if which == "cpp":
        torch.ops.npr.copy_blocks(k_cache, v_cache, src, dst)
        return
    _check_copy_blocks(k_cache, v_cache, src, dst)
    if which == "triton":
        from npr.kernels import kv_triton

        kv_triton.copy_blocks(k_cache, v_cache, src, dst)
    else:
        _ref.copy_blocks(k_cache, v_cache, src, dst)


def copy_blocks_from_pairs(k_cache: torch.Tensor, v_cache: torch.Tensor,
                           copies: list[tuple[int, int]], *, backend: Backend = "auto") -> None:
    """Applies BlockPool.append's copies list [(src_block, dst_block), ...] to one layer."""
    if not copies:
        return
    pairs = torch.tensor(copies, dtype=torch.int64).reshape(-1, 2).to(k_cache.device)
    copy_blocks(k_cache, v_cache, pairs[:, 0].contiguous(), pairs[:, 1].contiguous(),
                backend=backend)
