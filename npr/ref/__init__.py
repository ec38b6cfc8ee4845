"""Pure-torch references of every npr kernel: the test oracle and the fallback."""
from npr.ref.attention import gather_kv, tree_attention
from npr.ref.kv import copy_blocks, write_kv
from npr.ref.linear import (apply_rope, linear, linear_fused, linear_packed, pack_gemm_panels,
                            pack_weight, unpack_gemm_panels, unpack_weight)
from npr.ref.norm import rms_norm

__all__ = ["apply_rope", "copy_blocks", "gather_kv", "linear", "linear_fused", "linear_packed",
           "pack_gemm_panels", "pack_weight", "rms_norm", "tree_attention", "unpack_gemm_panels",
           "unpack_weight", "write_kv"]
