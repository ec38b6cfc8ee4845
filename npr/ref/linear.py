"""Reference linear: y = x @ W^T (+ b) in fp32 with the weights widened from their storage dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_N = 8  # outputs per panel of the decode kernels' packed layout (csrc/linear_kernel.h kPackN)
GEMM_PANEL = 32  # outputs per panel of the many-row GEMM's weight layout (gemm_kernel.h kPanel)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K], weight: [N, K] (any float dtype), bias: [N] or None -> [..., N] in x.dtype.

    Computed in fp32 (bf16 / fp16 weights widened exactly), like npr::linear_small.
    """
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def _pack_panels(weight: torch.Tensor, width: int) -> torch.Tensor:
    """weight: [N, K] -> [ceil(N/width), K, width], zero-padded past N: panel p, row k holds the
    weights k of outputs width*p .. width*p + width - 1."""
    n, k = weight.shape
    n_pad = -(-n // width) * width
    w = torch.zeros(n_pad, k, dtype=weight.dtype, device=weight.device)
    w[:n] = weight
    return w.view(n_pad // width, width, k).transpose(1, 2).contiguous()


def _unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """panels: [ceil(N/width), K, width] -> weight [N, K] (inverse of _pack_panels)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n].contiguous()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: [N, K] -> [ceil(N/8), K, 8] (the layout npr::linear_packed reads)."""
    return _pack_panels(weight, PACK_N)


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """packed: [ceil(N/8), K, 8] -> weight [N, K] (inverse of pack_weight)."""
    if packed.shape[1] != k:
        raise ValueError(f"unpack_weight: packed {tuple(packed.shape)} does not hold K = {k} inputs")
    return _unpack_panels(packed, n)


def pack_gemm_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight: [N, K] -> [ceil(N/32), K, 32] (the layout npr::linear_fused's AVX-512 GEMM reads)."""
    return _pack_panels(weight, GEMM_PANEL)


def unpack_gemm_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """panels: [ceil(N/32), K, 32] -> weight [N, K] (inverse of pack_gemm_panels)."""
    return _unpack_panels(panels, n)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, n: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K], packed: pack_weight([N, K]), bias: [N] or None -> [..., N] in x.dtype."""
    return linear(x, unpack_weight(packed, n, x.shape[-1]), bias)


def linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 silu_mul: bool = False, residual: torch.Tensor | None = None,
                 rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None,
                 rope_heads: int = 0) -> torch.Tensor:
    """Reference of npr::linear_fused, in fp32 (returned in x.dtype).

    x: [..., K] ([..., 2K] = gate | up with silu_mul), weight: [N, K], bias: [N] | None,
    norm_weight: [K] | None (rms_norm of x first), rope_cos / rope_sin: [..., D] | None (rotary
    embedding of output heads [0, rope_heads), HF rotate_half layout), residual: [..., N] | None
    -> [..., N]
    """
    if silu_mul and norm_weight is not None:
        raise ValueError("linear_fused: norm_weight and silu_mul are exclusive")
    h = x.float()
    if norm_weight is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    if silu_mul:
        g, u = h.chunk(2, dim=-1)
        h = F.silu(g) * u
    y = linear(h, weight, bias)
    if rope_cos is not None and rope_heads > 0:
        y = apply_rope(y, rope_cos, rope_sin, rope_heads)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def apply_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """y: [..., N], cos / sin: [..., D] -> y with heads [0, heads) of size D (columns
    [0, heads * D)) rotated: y_h * cos + rotate_half(y_h) * sin (HF layout), in fp32."""
    d = cos.shape[-1]
    y = y.float()
    r = y[..., : heads * d].unflatten(-1, (heads, d))
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
    rot = torch.cat((-r[..., d // 2:], r[..., : d // 2]), dim=-1)
    return torch.cat(((r * c + rot * s).flatten(-2), y[..., heads * d:]), dim=-1)
