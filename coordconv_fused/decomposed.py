"""The ``torch`` backend: CoordConv decomposed into the data convolution plus a coordinate term.

``y = conv(x, weight, bias) + P``, where ``P = conv(coords, coord_weight)`` is computed once for a
batch of one and broadcast: the coordinate term does not depend on the sample, so nothing of size
``N*d*H*W`` is ever allocated, and backward needs only ``grad_output.sum(0)`` for ``coord_weight``.
Registered as the custom op ``coordconv_fused::coord_conv`` (see :mod:`coordconv_fused.ops`), so
``torch.compile(fullgraph=True)`` keeps it as one node and ``torch.library.opcheck`` tests it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .coord_term import coord_weight_grad, coordinate_term
from .ops import call_coord_conv_op, define_coord_conv_op, op_arguments, pre_pad, static_arguments
from .spec import ConvSpec

__all__ = ["coord_conv_decomposed", "coord_conv_composite", "coordinate_term", "prepare_eager"]


def _forward(input, weight, coord_weight, bias, stride, padding, dilation, transposed, output_padding,
             groups, coord_pad, coord_pad_mode, with_r, separate):
    out = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
                                     output_padding, groups)
    out.add_(coordinate_term(input, weight, coord_weight, out.shape[2:], stride, padding, dilation,
                             transposed, output_padding, coord_pad, coord_pad_mode, with_r, separate, cache=True))
    return out


coord_conv_op = define_coord_conv_op("coord_conv", _forward, coord_weight_grad)


def prepare_eager(spec: ConvSpec):
    """The ``torch`` backend's eager per-call path for ``spec``: the same computation as the op,
    written as ATen calls (so autograd is ATen's, in C++, and second order comes for free), with
    the batch-of-one coordinate tensor reused from the last call of the same geometry."""
    pads, mode, args = static_arguments(spec)
    stride, padding, dilation, transposed, output_padding, groups, coord_pad, coord_pad_mode, with_r, separate = args
    convolution = torch.ops.aten.convolution.default

    def call(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> Tensor:
        input = pre_pad(input, pads, mode)
        out = convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        return out.add_(coordinate_term(input, weight, coord_weight, out.shape[2:], stride, padding, dilation,
                                        transposed, output_padding, coord_pad, coord_pad_mode, with_r, separate,
                                        cache=True))

    return call


def coord_conv_decomposed(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the ``torch`` backend on a batched, validated input."""
    return call_coord_conv_op(torch.ops.coordconv_fused.coord_conv, input, weight, coord_weight, bias,
                              spec)


def coord_conv_composite(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """The ``torch`` backend's computation as plain ATen ops, without the custom op: what exporters
    (ONNX) see. Same numbers as :func:`coord_conv_decomposed`."""
    input, args = op_arguments(input, spec)
    stride, padding, dilation, transposed, output_padding, groups, coord_pad, mode, with_r, separate = args
    out = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                                     groups)
    return out + coordinate_term(input, weight, coord_weight, out.shape[2:], stride, padding, dilation,
                                 transposed, output_padding, coord_pad, mode, with_r, separate)
