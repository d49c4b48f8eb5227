"""The reference CoordConv: explicit coordinate channels, concatenated, then ``nn.Conv``.

This is the oracle every backend is tested against, so it shares nothing with the code under test
but the argument checks: the coordinates are computed here from their definition, in float64, in a
few lines of their own (not by :mod:`coordconv_fused.coords`), the padding (modes, 'same', the
receptive-field centres) is resolved here, and the convolution is PyTorch's own ``nn.Conv{1,2,3}d``
/ ``nn.ConvTranspose{1,2,3}d`` module applied to the explicit concatenation, as the popular
cat-then-conv ports do. It materialises ``[N, d, *sizes]`` coordinates: slow, and meant to be.

Definition (``docs/semantics.md``): along an axis of ``n`` positions, position ``i`` has coordinate
``2*i/(n-1) - 1`` (0 when ``n == 1``); the radius is ``sqrt`` of the sum of the squared axis
coordinates; the separate filter sees the coordinates of the centre of each output's receptive
field, ``o*stride - pad_before + dilation*(kernel-1)/2`` in input positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from .spec import ConvSpec

__all__ = ["coord_conv_ref", "reference_coords"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _coordinate(position: float, n: int) -> float:
    """Coordinate of a (possibly fractional) position along an axis of ``n`` positions."""
    return 0.0 if n == 1 else (2 * position - (n - 1)) / (n - 1)


def reference_coords(axes: Sequence[Sequence[float]], with_r: bool, dtype: torch.dtype,
                     device: torch.device | str | None = None) -> Tensor:
    """``[d, *sizes]`` coordinate channels from per-axis coordinate values (float64), the radius
    last, rounded once to ``dtype``."""
    grids = torch.meshgrid(*[torch.tensor(list(a), dtype=torch.float64) for a in axes], indexing="ij")
    channels = list(grids)
    if with_r:
        channels.append(torch.sqrt(sum(c * c for c in grids)))
    return torch.stack(channels).to(dtype=dtype, device=device)


def _pad_before(spec: ConvSpec) -> list[int]:
    """Padding before the first element of each axis, as ``nn.Conv`` resolves it."""
    if spec.padding == "valid":
        return [0] * spec.ndim
    if spec.padding == "same":  # nn.Conv puts the smaller half first
        return [d * (k - 1) // 2 for d, k in zip(spec.dilation, spec.kernel_size)]
    return list(spec.padding)


def _conv(cls, in_channels: int, out_channels: int, spec: ConvSpec, groups: int, x: Tensor, weight: Tensor,
          bias: Tensor | None, **kwargs) -> Tensor:
    """``x`` through a freshly built ``cls`` module (on the meta device) with ``weight`` and
    ``bias`` as its parameters: the module's own padding and convolution."""
    module = cls(in_channels, out_channels, spec.kernel_size, spec.stride, padding=spec.padding,
                 dilation=spec.dilation, groups=groups, bias=bias is not None, device="meta", **kwargs)
    params = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    return functional_call(module, params, (x,))


def coord_conv_ref(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """CoordConv by explicit concatenation (batched input; arguments already validated).

    * full filter, ``groups == 1``: ``conv(cat([x, coords]), cat([weight, coord_weight]), bias)``;
    * full filter, ``groups > 1``: ``conv(x, weight, bias, groups) + conv(coords, coord_weight)``;
    * separate filter: ``conv(x, weight, bias) + conv1x1(centre_coords, coord_weight)``;
    * transposed: ``conv_transpose(cat([x, coords]), cat([weight, coord_weight], 0), bias)``.
    """
    n, c_in, sizes = input.shape[0], input.shape[1], list(input.shape[2:])
    d = coord_weight.shape[0] if spec.transposed else coord_weight.shape[1]
    coords = reference_coords([[_coordinate(i, s) for i in range(s)] for s in sizes], spec.with_r,
                              input.dtype, input.device)
    coords = coords.unsqueeze(0).expand(n, *coords.shape)

    if spec.transposed:
        c_out = weight.shape[1] * spec.groups
        kw = {"output_padding": spec.output_padding}
        if spec.groups == 1:
            return _conv(_CONV_T[spec.ndim], c_in + d, c_out, spec, 1, _cat(input, coords),
                         torch.cat([weight, coord_weight], 0), bias, **kw)
        return (_conv(_CONV_T[spec.ndim], c_in, c_out, spec, spec.groups, input, weight, bias, **kw)
                + _conv(_CONV_T[spec.ndim], d, c_out, spec, 1, coords, coord_weight, None, **kw))

    c_out = weight.shape[0]
    kw = {"padding_mode": spec.padding_mode}
    if spec.separate:
        data = _conv(_CONV[spec.ndim], c_in, c_out, spec, spec.groups, input, weight, bias, **kw)
        axes = [[_coordinate(o * s - p + dil * (k - 1) / 2, size) for o in range(out)]
                for out, size, s, p, dil, k in zip(data.shape[2:], sizes, spec.stride, _pad_before(spec),
                                                    spec.dilation, spec.kernel_size)]
        centres = reference_coords(axes, spec.with_r, input.dtype, input.device)
        coord_part = torch.einsum("od,d...->o...", coord_weight.flatten(1), centres)
        return data + coord_part.unsqueeze(0)
    if spec.groups == 1:
        return _conv(_CONV[spec.ndim], c_in + d, c_out, spec, 1, _cat(input, coords),
                     torch.cat([weight, coord_weight], 1), bias, **kw)
    return (_conv(_CONV[spec.ndim], c_in, c_out, spec, spec.groups, input, weight, bias, **kw)
            + _conv(_CONV[spec.ndim], d, c_out, spec, 1, coords, coord_weight, None, **kw))


def _cat(input: Tensor, coords: Tensor) -> Tensor:
    """``cat([input, coords], 1)`` in the input's memory format (as nn.Conv2d's output follows it)."""
    out = torch.cat([input, coords], 1)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if fmt is not None and input.is_contiguous(memory_format=fmt) and not input.is_contiguous():
        out = out.contiguous(memory_format=fmt)
    return out

