"""Pure-torch references of every npr kernel: the test oracle and the fallback."""
from npr.ref.linear import apply_rope, linear, linear_fused, linear_packed, pack_weight, unpack_weight
from npr.ref.norm import rms_norm

__all__ = ["apply_rope", "linear", "linear_fused", "linear_packed", "pack_weight", "rms_norm", "unpack_weight"]
