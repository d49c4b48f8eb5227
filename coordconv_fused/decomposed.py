"""The ``torch`` backend: CoordConv decomposed into the data convolution plus a coordinate term.

``y = conv(x, weight, bias) + P``, where ``P = conv(coords, coord_weight)`` is computed once for a
batch of one and broadcast: the coordinate term does not depend on the sample, so nothing of size
``N*d*H*W`` is ever allocated, and backward needs only ``grad_output.sum(0)`` for ``coord_weight``.

It is registered as the custom op ``coordconv_fused::coord_conv`` (schema below) with a fake
(meta) implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` keeps it as one
node and ``torch.library.opcheck`` can test it. The op mirrors ``aten::convolution``: it takes the
symmetric zero padding the convolution applies, and ``coord_pad``/``coord_pad_mode`` say how much of
``input`` is already explicit padding (for 'reflect'/'replicate'/'circular' and asymmetric 'same'),
so that the coordinates are padded by the same rule as the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .coords import centre_coord_channels, padded_coord_channels
from .spec import ConvSpec

__all__ = ["coord_conv_decomposed", "coordinate_term"]

_SCHEMA = (
    "(Tensor input, Tensor weight, Tensor coord_weight, Tensor? bias, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, "
    "SymInt[] coord_pad, str coord_pad_mode, bool with_r, bool separate) -> Tensor"
)


def _pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _image_sizes(input: Tensor, coord_pad: Sequence[int]) -> list[int]:
    """Spatial size of the image before the explicit padding that ``input`` already carries."""
    return [n - b - a for n, (b, a) in zip(input.shape[2:], _pairs(coord_pad))]


def _coord_input(input: Tensor, weight: Tensor, out_sizes: Sequence[int], stride, padding, dilation,
                 coord_pad, coord_pad_mode, with_r: bool, separate: bool) -> Tensor:
    """The ``[1, d, ...]`` coordinate tensor the coordinate filter is applied to (batch of one).

    Full filter: the image's coordinates, padded like the input (explicit part here; the symmetric
    zero part is applied by the convolution). Separate filter: the receptive-field centres of the
    ``out_sizes`` outputs.
    """
    sizes = _image_sizes(input, coord_pad)
    if not separate:
        coords = padded_coord_channels(sizes, with_r, _pairs(coord_pad), coord_pad_mode,
                                       dtype=input.dtype, device=input.device)
    else:
        pad_before = [b + p for (b, _), p in zip(_pairs(coord_pad), padding)]
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


@torch.library.custom_op("coordconv_fused::coord_conv", mutates_args=(), schema=_SCHEMA)
def _coord_conv_op(input, weight, coord_weight, bias, stride, padding, dilation, transposed,
                   output_padding, groups, coord_pad, coord_pad_mode, with_r, separate):
    out = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
                                     output_padding, groups)
    out.add_(coordinate_term(input, weight, coord_weight, out.shape[2:], stride, padding, dilation,
                             transposed, output_padding, coord_pad, coord_pad_mode, with_r, separate))
    return out


@_coord_conv_op.register_fake
def _(input, weight, coord_weight, bias, stride, padding, dilation, transposed, output_padding, groups,
      coord_pad, coord_pad_mode, with_r, separate):
    # Same shape, dtype, device and memory format as the data convolution the real kernel returns.
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
                                      output_padding, groups)


def _setup_context(ctx, inputs, output):
    input, weight, coord_weight, bias, *args = inputs
    ctx.save_for_backward(input, weight, coord_weight)
    ctx.has_bias = bias is not None
    ctx.args = args


def _backward(ctx, grad):
    input, weight, coord_weight = ctx.saved_tensors
    (stride, padding, dilation, transposed, output_padding, groups, coord_pad, coord_pad_mode, with_r,
     separate) = ctx.args
    need_in, need_w, need_cw, need_b = ctx.needs_input_grad[:4]
    grad_in = grad_w = grad_cw = grad_b = None
    if need_in or need_w or need_b:
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, input, weight, [weight.shape[1] * groups if transposed else weight.shape[0]]
            if ctx.has_bias else None, stride, padding, dilation, transposed, output_padding, groups,
            [need_in, need_w, need_b and ctx.has_bias])
    if need_cw:
        # The coordinate term is the same for every sample: only the batch sum of grad matters.
        grad_sum = grad.sum(0, keepdim=True)
        coords = _coord_input(input, weight, grad.shape[2:], stride, padding, dilation, coord_pad,
                              coord_pad_mode, with_r, separate)
        if separate:
            grad_cw = (grad_sum.flatten(2)[0] @ coords.flatten(2)[0].transpose(0, 1)).reshape(
                coord_weight.shape)
        else:
            grad_cw = torch.ops.aten.convolution_backward(
                grad_sum, coords, coord_weight, None, stride, padding, dilation, transposed,
                output_padding, 1, [False, True, False])[1]
    return (grad_in, grad_w, grad_cw, grad_b) + (None,) * 10


_coord_conv_op.register_autograd(_backward, setup_context=_setup_context)


def coord_conv_decomposed(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the ``torch`` backend on a batched, validated input."""
    if spec.transposed:
        pre = ((0, 0),) * spec.ndim
        conv_padding = spec.padding
    else:
        pre, conv_padding = spec.split_padding()
    if any(b or a for b, a in pre):
        pads = [p for pair in reversed(pre) for p in pair]
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        input = F.pad(input, pads, mode=mode)
    return torch.ops.coordconv_fused.coord_conv(
        input, weight, coord_weight, bias, list(spec.stride), list(conv_padding), list(spec.dilation),
        spec.transposed, list(spec.output_padding), spec.groups, [p for pair in pre for p in pair],
        spec.padding_mode, spec.with_r, spec.separate,
    )
