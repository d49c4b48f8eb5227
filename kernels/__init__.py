"""Triton kernels of coordconv-fused, installed as ``coordconv_fused.kernels``.

The fused forward and backward kernels arrive with the Triton issue; until then this package is
empty and the ``triton`` backend is not registered.
"""
