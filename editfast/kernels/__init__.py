"""Triton kernels of editfast, installed as ``editfast.kernels``.

One operation per file, each with a plain-torch reference beside it. CUDA tensors run the
Triton kernel; CPU tensors run the reference.
"""
