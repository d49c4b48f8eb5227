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
    (:func:`coordconv_fused.ops.aten.prepare_forward`). With the C++ extension, on plain CPU tensors
    the same ATen calls are made from C++ (``_C.call_aten``, csrc/prepared_call.cpp), without the
    Python of each call: a tiny layer's forward+backward went from 1.47-1.55x to 1.39-1.41x
    ``nn.Conv2d``'s, its forward from 1.14-1.23x to 1.01x (model-167 Xeon, 2026-12-03). The Python
    path makes the coordinates of each new input signature and hands them over. (Off the CPU the
    Python path runs every call: the device path, :func:`~coordconv_fused.ops.aten.prepare_forward`.)"""
    fn = aten.prepare_forward(spec)
    if native.LOAD_ERROR is not None or not hasattr(native._C, "call_aten") or not aten.CPU_PATH:
        return fn
    pads, mode, args = static_arguments(spec)
    stride, padding, dilation, transposed, output_padding, groups, pre, pre_mode, with_r, separate = args
    term_args = aten.term_conv_args(spec.ndim, stride, padding, dilation, transposed, output_padding, separate)
    handle = native._C.prepare_aten_call(stride, padding, dilation, transposed, output_padding, groups, *term_args[:5])
    call_aten, set_coords = native._C.call_aten, native._C.set_aten_coords

    def call(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> Tensor:
        if not input.is_cpu:  # (the device path: Python, and the input padded once, there)
            return fn(input, weight, coord_weight, bias)
        padded = input if pads is None else pre_pad(input, pads, mode)
        out = call_aten(handle, padded, weight, coord_weight, bias)
        if out is not NotImplemented:
            return out
        # (the Python path pads again: on a signature's first call, or for a tensor subclass)
        out = fn(input, weight, coord_weight, bias)
        if type(padded) is torch.Tensor and padded.is_cpu:  # (a new signature: its coordinates for C++)
            coords = aten.coord_input(
                padded, weight, out.shape[2:], stride, padding, dilation, pre, pre_mode, with_r, separate
            )
            set_coords(handle, padded, weight, aten.in_format_of(coords, out))
        return out

    return call


def coord_conv_decomposed(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the ``torch`` backend on a batched, validated input."""
    return call_coord_conv_op(torch.ops.coordconv_fused.coord_conv, input, weight, coord_weight, bias, spec)


coord_conv_composite = composite  # (older name)

backend = Backend("torch", coord_conv_decomposed, prepare=prepare_eager)
