"""The Triton kernels of coordconv-fused (the ``triton`` backend), installed as
``coordconv_fused.kernels``: ``coord_tile`` (coordinates generated in-kernel), ``coord_conv_fwd``
(the implicit-GEMM forward with the coordinate taps), ``coord_weight_grad`` (the gradient of the
coordinate filter), ``launch`` (host-side launchers over the op's arguments) and ``aot`` (the
ahead-of-time compile of every variant). They import nothing of the package above its geometry
helpers (:mod:`coordconv_fused.geometry`).
"""
