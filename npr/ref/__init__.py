"""Pure-torch references of every npr kernel: the test oracle and the fallback."""
from npr.ref.attention import gather_kv, tree_attention
from npr.ref.kv import copy_blocks, write_kv
from npr.ref.norm import rms_norm

__all__ = ["copy_blocks", "gather_kv", "rms_norm", "tree_attention", "write_kv"]
