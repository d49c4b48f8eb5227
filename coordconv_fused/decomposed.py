"""The ``torch`` backend: CoordConv decomposed into the data convolution plus a coordinate term.

``y = conv(x, weight, bias) + P``, where ``P = conv(coords, coord_weight)`` is computed once for a
batch of one and broadcast: the coordinate term does not depend on the sample, so nothing of size
``N*d*H*W`` is ever allocated, and backward needs only ``grad_output.sum(0)`` for ``coord_weight``.
Registered as the custom op ``coordconv_fused::coord_conv`` (see :mod:`coordconv_fused.ops`), so
``torch.compile(fullgraph=True)`` keeps it as one node and ``torch.library.opcheck`` tests it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .coords import centre_coord_channels, padded_coord_channels
from .ops import call_coord_conv_op, define_coord_conv_op, image_sizes, op_arguments, pairs
from .spec import ConvSpec

__all__ = ["coord_conv_decomposed", "coord_conv_composite", "coordinate_term"]


def _coord_input(input: Tensor, weight: Tensor, out_sizes: Sequence[int], stride, padding, dilation,
                 coord_pad, coord_pad_mode, with_r: bool, separate: bool) -> Tensor:
    """The ``[1, d, ...]`` coordinate tensor the coordinate filter is applied to (batch of one).

    Full filter: the image's coordinates, padded like the input (explicit part here; the symmetric
    zero part is applied by the convolution). Separate filter: the receptive-field centres of the
    ``out_sizes`` outputs.
    """
    sizes = image_sizes(input, coord_pad)
    if not separate:
        coords = padded_coord_channels(sizes, with_r, pairs(coord_pad), coord_pad_mode,
                                       dtype=input.dtype, device=input.device)
    else:
        pad_before = [b + p for (b, _), p in zip(pairs(coord_pad), padding)]
        coords = centre_coord_channels(out_sizes, sizes, with_r, stride=stride, pad_before=pad_before,
                                       dilation=dilation, kernel_size=weight.shape[2:],
                                       dtype=input.dtype, device=input.device)
    return coords.unsqueeze(0)


def coordinate_term(input, weight, coord_weight, out_sizes, stride, padding, dilation, transposed,
                    output_padding, coord_pad, coord_pad_mode, with_r, separate) -> Tensor:
    """The batch-independent coordinate term ``P``: a ``[1, C_out, *out_sizes]`` tensor."""
    coords = _coord_input(input, weight, out_sizes, stride, padding, dilation, coord_pad,
                          coord_pad_mode, with_r, separate)
    ndim = input.dim() - 2
    if separate:
        return torch.ops.aten.convolution(coords, coord_weight, None, [1] * ndim, [0] * ndim,
                                          [1] * ndim, False, [0] * ndim, 1)
    return torch.ops.aten.convolution(coords, coord_weight, None, stride, padding, dilation, transposed,
                                      output_padding, 1)


def _forward(input, weight, coord_weight, bias, stride, padding, dilation, transposed, output_padding,
             groups, coord_pad, coord_pad_mode, with_r, separate):
    out = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
                                     output_padding, groups)
    out.add_(coordinate_term(input, weight, coord_weight, out.shape[2:], stride, padding, dilation,
                             transposed, output_padding, coord_pad, coord_pad_mode, with_r, separate))
    return out


def _coord_weight_grad(grad_sum, input, weight, coord_weight, stride, padding, dilation, transposed,
                       output_padding, groups, coord_pad, coord_pad_mode, with_r, separate):
    coords = _coord_input(input, weight, grad_sum.shape[2:], stride, padding, dilation, coord_pad,
                          coord_pad_mode, with_r, separate)
    if separate:
        return (grad_sum.flatten(2)[0] @ coords.flatten(2)[0].transpose(0, 1)).reshape(coord_weight.shape)
    return torch.ops.aten.convolution_backward(
        grad_sum, coords, coord_weight, None, stride, padding, dilation, transposed, output_padding, 1,
        [False, True, False])[1]


coord_conv_op = define_coord_conv_op("coord_conv", _forward, _coord_weight_grad)


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
