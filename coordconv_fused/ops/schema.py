"""The schema of every op of the library, declared once, here.

Python-implemented ops (``coord_conv``, the ATen decomposition; ``coord_conv_triton``) are created
from these strings by :mod:`coordconv_fused.ops.autograd`; the ops implemented in C++ (the ``cpp`` and
``cuda`` backends' ``coord_conv_ext`` family) are defined here by :func:`define_native_ops`, and the
extension ``coordconv_fused._C`` only registers their CPU and CUDA kernels
(``TORCH_LIBRARY_IMPL``).

The arguments mirror ``aten::convolution``. ``padding`` is the convolution's own symmetric zero
padding; ``pre_pad`` (``[before0, after0, before1, ...]``) is the part of the padding already
applied explicitly to ``input`` (the non-zero padding modes, and the asymmetric part of 'same'), by
the rule ``pre_pad_mode``, so that kernels pad the coordinates exactly like the data;
``separate`` selects the separate 1x1 coordinate filter.
"""

from __future__ import annotations

import torch

__all__ = [
    "NAMESPACE",
    "SCHEMA",
    "GRAD_SCHEMA",
    "INPUT_GRAD_SCHEMA",
    "BACKWARD_SCHEMA",
    "NATIVE_OPS",
    "COMPOSITE_OPS",
    "TESTING_OPS",
    "define_native_ops",
    "define_testing_ops",
]

NAMESPACE = "coordconv_fused"

_CONV_ARGS = (
    "Tensor input, Tensor weight, Tensor coord_weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, SymInt[] pre_pad, "
    "str pre_pad_mode, bool with_r, bool separate"
)
_GEOMETRY_ARGS = (
    "SymInt[] stride, SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups"
)

# The forward: the whole CoordConv output.
SCHEMA = f"({_CONV_ARGS}) -> Tensor"
# The gradient of coord_weight from grad_sum = grad_output.sum(0, keepdim=True).
GRAD_SCHEMA = SCHEMA.replace("Tensor input, ", "Tensor grad_sum, Tensor input, ").replace(
    "Tensor coord_weight, Tensor? bias, ", "Tensor coord_weight, "
)
# The data convolution's input gradient (CPU: a direct kernel for layers on few channels).
INPUT_GRAD_SCHEMA = f"(Tensor grad, Tensor input, Tensor weight, {_GEOMETRY_ARGS}) -> Tensor"
# The whole backward in one call: the gradients of (input, weight, coord_weight, bias) where
# output_mask asks, undefined (None) elsewhere, like aten::convolution_backward.
BACKWARD_SCHEMA = GRAD_SCHEMA.replace("Tensor grad_sum, ", "Tensor grad, ").replace(
    ") -> Tensor", ", bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)

# The ops implemented in C++ (csrc/): backends `cpp` (CPU) and `cuda` (CUDA); the forward's autograd is
# in C++ too (csrc/autograd/).
NATIVE_OPS = {
    "coord_conv_ext": SCHEMA,
    "coord_conv_ext_coord_weight_grad": GRAD_SCHEMA,
    "coord_conv_ext_input_grad": INPUT_GRAD_SCHEMA,
    "coord_conv_ext_backward": BACKWARD_SCHEMA,
}
# The coordinate gradient as ATen ops, implemented in Python (CompositeImplicitAutograd,
# coordconv_fused/ops/autograd.py): the C++ backward calls it while autograd records a graph of the
# gradients, so that second-order gradients are exact.
COMPOSITE_OPS = {"coord_weight_grad_aten": GRAD_SCHEMA}
# Test-only (coordconv_fused._C_testing): the CUDA backend's host code and kernel bodies, run on the
# CPU by an emulation of the grid; the cpp backend's pass over oneDNN's blocked output on a given
# buffer (csrc/cpu/blocked_pass.h).
TESTING_OPS = {
    "coord_conv_cuda_emulated": SCHEMA,
    "coord_conv_cuda_emulated_coord_weight_grad": GRAD_SCHEMA,
    "blocked_output_pass": "(Tensor blocked, Tensor P, Tensor? uv, int lo, int hi) -> Tensor",
}

# Tags by op. The forward's kernels take any strides and give the output nn.Conv2d's memory format
# for the input's (its fake kernel too: opcheck over channels-last inputs), so inductor may hand it a
# tensor in whatever layout its graph has: `flexible_layout`. Without the tag a custom op's inputs are
# copied to the strides seen when the graph was traced (`needs_exact_strides`): in a compiled CPU
# graph whose ATen convolutions inductor makes channels-last, a CoordConv layer's input was copied
# back to NCHW, and its convolution then ran NCHW (`Conv2d, ReLU, CoordConv2d, ReLU` on (8,64,56,56):
# 1.065x the same with two `Conv2d`s; docs/tuning.md).
_FLEXIBLE_LAYOUT = getattr(torch.Tag, "flexible_layout", None)
OP_TAGS: dict[str, tuple] = {"coord_conv_ext": (_FLEXIBLE_LAYOUT,) if _FLEXIBLE_LAYOUT is not None else ()}

_LIBRARIES: dict[str, torch.library.Library] = {}


def _define(group: str, ops: dict[str, str]) -> None:
    if group not in _LIBRARIES:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        for name, schema in ops.items():
            lib.define(name + schema, tags=OP_TAGS.get(name, ()))
        _LIBRARIES[group] = lib


def define_native_ops() -> None:
    """Define the C++ ops' schemas and the composite op their backward uses (once; the kernels come
    with ``coordconv_fused._C``, the composite's with :mod:`coordconv_fused.ops.autograd`)."""
    _define("native", {**NATIVE_OPS, **COMPOSITE_OPS})


def define_testing_ops() -> None:
    """Define the test-only ops' schemas (once; their kernels come with ``coordconv_fused._C_testing``)."""
    _define("testing", TESTING_OPS)
