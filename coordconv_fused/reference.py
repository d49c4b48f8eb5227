"""The reference CoordConv: explicit coordinate channels, concatenated, then a plain convolution.

This is the oracle every backend is tested against. It is deliberately naive: it materialises the
``[N, d, *sizes]`` coordinate tensor exactly as the popular cat-then-conv ports do (with this
library's coordinate convention), and it pads and convolves exactly as ``nn.Conv{1,2,3}d`` and
``nn.ConvTranspose{1,2,3}d`` do. Only the coordinate values come from :mod:`coordconv_fused.coords`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .coords import centre_coord_channels, coord_channels
from .spec import ConvSpec

__all__ = ["coord_conv_ref"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _nn_conv(x: Tensor, w: Tensor, b: Tensor | None, spec: ConvSpec, groups: int) -> Tensor:
    """A convolution exactly as ``nn.ConvNd._conv_forward`` performs it."""
    conv = _CONV[spec.ndim]
    if spec.padding_mode != "zeros":
        pads = [p for pair in reversed(spec.side_pads) for p in pair]
        x = F.pad(x, pads, mode=spec.padding_mode)
        return conv(x, w, b, spec.stride, 0, spec.dilation, groups)
    return conv(x, w, b, spec.stride, spec.padding, spec.dilation, groups)


def _cat(input: Tensor, coords: Tensor) -> Tensor:
    """``cat([input, coords], 1)`` in the input's memory format (as nn.Conv2d's output follows it)."""
    out = torch.cat([input, coords], 1)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if fmt is not None and input.is_contiguous(memory_format=fmt) and not input.is_contiguous():
        out = out.contiguous(memory_format=fmt)
    return out


def coord_conv_ref(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """CoordConv by explicit concatenation (batched input; arguments already validated).

    * full filter, ``groups == 1``: ``conv(cat([x, coords]), cat([weight, coord_weight]), bias)``;
    * full filter, ``groups > 1``: ``conv(x, weight, bias, groups) + conv(coords, coord_weight)``;
    * separate filter: ``conv(x, weight, bias) + conv1x1(centre_coords, coord_weight)``;
    * transposed: ``conv_transpose(cat([x, coords]), cat([weight, coord_weight], 0), bias)``.
    """
    n = input.shape[0]
    sizes = input.shape[2:]
    coords = coord_channels(sizes, spec.with_r, dtype=input.dtype, device=input.device)
    coords = coords.unsqueeze(0).expand(n, *coords.shape)

    if spec.transposed:
        conv_t = _CONV_T[spec.ndim]
        args = (spec.stride, spec.padding, spec.output_padding)
        if spec.groups == 1:
            return conv_t(_cat(input, coords), torch.cat([weight, coord_weight], 0), bias,
                          *args, 1, spec.dilation)
        return (conv_t(input, weight, bias, *args, spec.groups, spec.dilation)
                + conv_t(coords, coord_weight, None, *args, 1, spec.dilation))

    if spec.separate:
        data = _nn_conv(input, weight, bias, spec, spec.groups)
        centres = centre_coord_channels(
            data.shape[2:], sizes, spec.with_r, stride=spec.stride, pad_before=spec.pad_before,
            dilation=spec.dilation, kernel_size=spec.kernel_size, dtype=input.dtype,
            device=input.device,
        )
        centres = centres.unsqueeze(0).expand(n, *centres.shape)
        return data + _CONV[spec.ndim](centres, coord_weight)

    if spec.groups == 1:
        return _nn_conv(_cat(input, coords), torch.cat([weight, coord_weight], 1), bias,
                        spec, 1)
    return _nn_conv(input, weight, bias, spec, spec.groups) + _nn_conv(coords, coord_weight, None, spec, 1)
