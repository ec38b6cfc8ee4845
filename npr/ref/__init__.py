"""Pure-torch references of every npr kernel: the test oracle and the fallback."""
from npr.ref.attention import gather_kv, tree_attention
from npr.ref.norm import rms_norm

__all__ = ["gather_kv", "rms_norm", "tree_attention"]
