"""The ``torch`` backend: CoordConv decomposed into the data convolution plus a coordinate term.

``y = conv(x, weight, bias) + P``, where ``P = conv(coords, coord_weight)`` is computed once for a
batch of one and broadcast: the coordinate term does not depend on the sample, so nothing of size
``N*d*H*W`` is ever allocated, and backward needs only ``grad_output.sum(0)`` for ``coord_weight``.
The custom op ``coordconv_fused::coord_conv`` (what TorchScript calls, and ``torch.library.opcheck``
tests); eager calls run the same ATen calls directly (:func:`prepare_eager`), and ``torch.compile``
sees them as ATen ops (:func:`coordconv_fused.ops.aten.composite`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import aten, call_coord_conv_op, define_coord_conv_op
from ..ops.arguments import pre_pad, static_arguments
from ..ops.aten import composite, coord_weight_grad
from ..spec import ConvSpec
from . import native
from .base import Backend

__all__ = ["coord_conv_decomposed", "prepare_eager", "backend"]


def _forward(input, weight, coord_weight, bias, *args):
    return aten.forward(input, weight, coord_weight, bias, *args, cache=True)


coord_conv_op = define_coord_conv_op("coord_conv", _forward, coord_weight_grad)


def prepare_eager(spec: ConvSpec):
    """The ``torch`` backend's eager per-call path for a spec: the op's computation as ATen calls
    (:func:`coordconv_fused.ops.aten.prepare_forward`), made from C++ with the extension
    (``_C.call_aten``, csrc/prepared_call.cpp) without the Python of each call, on the CPU and off it.
    The first call of each input signature runs the Python path, which makes the coordinates (off
    the CPU their im2col matrix) and hands them over. On the CPU a tiny layer's forward+backward
    went from 1.47-1.55x to 1.39-1.41x ``nn.Conv2d``'s, its forward from 1.14-1.23x to 1.01x
    (model-167 Xeon, 2026-12-03)."""
    if native.LOAD_ERROR is not None or not hasattr(native._C, "set_aten_entry"):
        return aten.prepare_forward(spec)
    pads, mode, args = static_arguments(spec)
    stride, padding, dilation, transposed, output_padding, groups, *_, separate = args
    term_args = aten.term_conv_args(spec.ndim, stride, padding, dilation, transposed, output_padding, separate)
    handle = native._C.prepare_aten_call(
        stride, padding, dilation, transposed, output_padding, groups, *term_args[:5], aten.CPU_PATH
    )
    call_aten, set_entry = native._C.call_aten, native._C.set_aten_entry
    fn = aten.prepare_forward(spec, on_signature=lambda *entry: set_entry(handle, *entry))

    def call(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> Tensor:
        padded = input if pads is None else pre_pad(input, pads, mode)
        out = call_aten(handle, padded, weight, coord_weight, bias)
        # (the Python path, which pads again: a signature's first call, or a tensor subclass)
        return out if out is not NotImplemented else fn(input, weight, coord_weight, bias)

    return call


def coord_conv_decomposed(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the ``torch`` backend on a batched, validated input."""
    return call_coord_conv_op(torch.ops.coordconv_fused.coord_conv, input, weight, coord_weight, bias, spec)


coord_conv_composite = composite  # (older name)

backend = Backend("torch", coord_conv_decomposed, prepare=prepare_eager)
