"""Fused Triton kernels for YAN (issue #4)."""
