"""Fused Triton kernels for decoder-only transformers."""
