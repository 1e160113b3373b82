"""Triton kernels of entropy-fast (installed as `entropy_fast.kernels`)."""
