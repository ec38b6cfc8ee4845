"""Device kernels, imported as npr.kernels: Triton (.py) and CUDA (.cu, compiled into npr._C)."""
