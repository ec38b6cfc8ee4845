"""Pure-torch references of every npr kernel: the test oracle and the fallback."""
from npr.ref.kv import copy_blocks, write_kv
from npr.ref.norm import rms_norm

__all__ = ["copy_blocks", "rms_norm", "write_kv"]
