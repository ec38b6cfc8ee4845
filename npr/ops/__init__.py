"""Typed wrappers over torch.ops.npr.*: one file per op, each choosing its backend
(C++ / CUDA through torch.ops dispatch, Triton, or the pure-torch reference in npr.ref)."""
from npr.ops import attention
from npr.ops.attention import TreeAttentionPlan, tree_attention
from npr.ops.fused import linear_fused
from npr.ops.kv import copy_blocks, write_kv
from npr.ops.linear import GemmPanels, PackedWeight, linear, pack_gemm_weight, pack_linear_weight
from npr.ops.norm import rms_norm

__all__ = ["GemmPanels", "PackedWeight", "TreeAttentionPlan", "attention", "copy_blocks", "linear",
           "linear_fused", "pack_gemm_weight", "pack_linear_weight", "rms_norm", "tree_attention",
           "write_kv"]
