"""Triton kernels of format v1 (installed as thunderkv.triton_kernels)."""
