"""Fused decode-step ops: an elementwise prologue / epilogue folded into the streaming linear.

    linear_fused(x, W, b, norm_weight=g, eps=e)   = linear(rms_norm(x, g, e), W, b)
    linear_fused(gu, W, b, silu_mul=True)         = linear(silu(gu[..., :K]) * gu[..., K:], W, b)
    linear_fused(x, W, b, rope_cos=c, rope_sin=s, rope_heads=h)
                                                  = rotary embedding of output heads [0, h)
    linear_fused(x, W, b, residual=r)             = linear(x, W, b) + r
    (rope and residual combine with either prologue.)

Why (measured on the build machine, `npr bench linear` step case): a SmolLM2-135M decode step
streams its weights in 15-20 ms (fp32) / 8.5-12 ms (bf16), while each separate small op costs
2-12 us of dispatch and Python (rms_norm wrapper ~5-8 us, silu*mul ~7-13 us, add ~1.5 us,
HF-style RoPE of q and k ~45 us); per layer this replaces 2 norms, silu*mul, RoPE and 2 residual
adds by nothing extra: the step at 1 row got 8-9% faster (fp32) and 16-19% (bf16).
Past SMALL_ROWS_MAX rows a plain fp32 weight goes to torch's GEMM inside the op, the prologue and
epilogues still fused (a 64-row step of a small model is dispatch-bound: ~5 ops fewer per linear).
Falls back to the separate ops where the kernel does not apply (see npr.ops.linear) and where
autograd needs them.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from npr import _ext, env, ref
from npr.ops.norm import rms_norm

# npr.ops.linear is also the name of the function npr.ops exports; take the module.
_lin = importlib.import_module("npr.ops.linear")

if _ext.available():

    @torch.library.register_fake("npr::linear_fused")
    def _linear_fused_fake(x: torch.Tensor, weight: torch.Tensor, n: int,
                           bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                           eps: float, silu_mul: bool, residual: torch.Tensor | None,
                           rope_cos: torch.Tensor | None = None,
                           rope_sin: torch.Tensor | None = None,
                           rope_heads: int = 0) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n))


def linear_fused(x: torch.Tensor, weight: torch.Tensor | _lin.PackedWeight | _lin.GemmPanels,
                 bias: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, silu_mul: bool = False,
                 residual: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                 rope_sin: torch.Tensor | None = None, rope_heads: int = 0) -> torch.Tensor:
    """x: [..., K] ([..., 2K] = gate | up with silu_mul), weight: [N, K] tensor, PackedWeight or
    GemmPanels, bias: [N] | None, norm_weight: [K] | None, rope_cos / rope_sin: [..., D] | None
    (per row, HF rotate_half layout; rotates output heads [0, rope_heads) of size D),
    residual: [..., N] | None -> [..., N] (fp32 for fp32 x)."""
    if silu_mul and norm_weight is not None:
        raise ValueError("linear_fused: norm_weight and silu_mul are exclusive")
    packed = isinstance(weight, (_lin.PackedWeight, _lin.GemmPanels))
    if packed:
        use = _lin._kernel_ok(x, weight, bias) and (
            not isinstance(weight, _lin.GemmPanels) or _lin.gemm_panels_available())
    else:
        # a plain fp32 weight past SMALL_ROWS_MAX rows: torch's GEMM inside the op
        use = weight.dim() == 2 and _lin._kernel_ok(x, weight, bias)
    if use and torch.is_grad_enabled():
        w = None if packed else weight
        use = not any(t is not None and t.requires_grad
                      for t in (x, w, bias, norm_weight, residual))  # the op has no backward
    if use:
        for t in (norm_weight, residual, rope_cos, rope_sin):
            if t is not None and not (t.is_cpu and t.dtype == torch.float32):
                use = False
    if use:
        wd, n = (weight.data, weight.out_features) if packed else (weight, weight.shape[0])
        return torch.ops.npr.linear_fused(x, wd, n, _lin._f32(bias), norm_weight, eps,
                                          silu_mul, residual, rope_cos, rope_sin, rope_heads)
    if env.force_reference():
        w = weight.unpack() if packed else weight
        return ref.linear_fused(x, w, bias, norm_weight=norm_weight, eps=eps,
                                silu_mul=silu_mul, residual=residual, rope_cos=rope_cos,
                                rope_sin=rope_sin, rope_heads=rope_heads)
    # The separate ops.
    h = x
    if norm_weight is not None:
        h = rms_norm(h, norm_weight, eps)
    if silu_mul:
        g, u = h.chunk(2, dim=-1)
        h = F.silu(g) * u
    y = _lin.linear(h, weight, bias)
    if rope_cos is not None and rope_heads > 0:
        y = ref.apply_rope(y, rope_cos, rope_sin, rope_heads).to(y.dtype)
    return y if residual is None else y + residual
