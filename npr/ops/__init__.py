"""Typed wrappers over torch.ops.npr.*: one file per op, each choosing its backend
(C++ / CUDA through torch.ops dispatch, Triton, or the pure-torch reference in npr.ref)."""
from npr.ops.fused import linear_fused
from npr.ops.linear import PackedWeight, linear, pack_linear_weight
from npr.ops.norm import rms_norm

__all__ = ["PackedWeight", "linear", "linear_fused", "pack_linear_weight", "rms_norm"]
