"""Pure-torch references of every npr kernel: the test oracle and the fallback."""
from npr.ref.norm import rms_norm

__all__ = ["rms_norm"]
