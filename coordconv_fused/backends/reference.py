"""The reference CoordConv: explicit coordinate channels, concatenated, then ``nn.Conv``.

This is the oracle every backend is tested against, so it shares nothing with the code under test
but the argument checks: the coordinates are computed here from their definition, in float64, in a
few lines of their own (not by :mod:`coordconv_fused.coords`), the padding (modes, 'same', the
receptive-field centres) is resolved here, and the explicit concatenation is convolved exactly as
``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` convolve (``F.pad`` for the non-zero padding
modes, then ``F.conv``), as the popular cat-then-conv ports do. It materialises ``[N, d, *sizes]``
coordinates: slow, and meant to be.

Definition (``docs/semantics.md``): along an axis of ``n`` positions, position ``i`` has coordinate
``2*i/(n-1) - 1`` (0 when ``n == 1``); the radius is ``sqrt`` of the sum of the squared axis
coordinates; the separate filter sees the coordinates of the centre of each output's receptive
field, ``o*stride - pad_before + dilation*(kernel-1)/2`` in input positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.arguments import batched, transformed
from ..spec import ConvSpec
from .base import Backend

__all__ = ["coord_conv_ref", "reference_coords", "backend"]

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: dict[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _coordinates(positions: Tensor, n) -> Tensor:
    """Coordinates of (possibly fractional) ``positions`` along an axis of ``n`` positions:
    ``(2*position - (n-1)) / (n-1)``, 0 when ``n == 1`` (float64; exact for integer numerators)."""
    if n == 1:  # one position: coordinate 0, wherever the (padded) position lies
        return torch.zeros_like(positions)
    return (2 * positions - (n - 1)) / (n - 1)


def reference_coords(axes: Sequence[Tensor], with_r: bool, dtype: torch.dtype) -> Tensor:
    """``[d, *sizes]`` coordinate channels from per-axis float64 coordinate vectors, the radius
    last, rounded once to ``dtype``."""
    grids = torch.meshgrid(*axes, indexing="ij")
    channels = list(grids)
    if with_r:
        channels.append(torch.sqrt(torch.stack([c * c for c in grids]).sum(0)))
    return torch.stack(channels).to(dtype)


def _side_pads(spec: ConvSpec) -> list[tuple[int, int]]:
    """(before, after) padding of each axis, resolved as ``nn.Conv`` resolves it."""
    if spec.padding == "valid":
        return [(0, 0)] * spec.ndim
    if spec.padding == "same":  # nn.Conv puts the smaller half first
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(spec.dilation, spec.kernel_size)]
    return [(p, p) for p in spec.padding if isinstance(p, int)]


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec, groups: int) -> Tensor:
    """A convolution as ``nn.ConvNd.forward`` performs it: zero padding inside the convolution,
    other modes by ``F.pad`` first."""
    if spec.padding_mode == "zeros":
        return _CONV[spec.ndim](x, weight, bias, spec.stride, spec.padding, spec.dilation, groups)
    pads = [p for pair in reversed(_side_pads(spec)) for p in pair]
    return _CONV[spec.ndim](F.pad(x, pads, mode=spec.padding_mode), weight, bias, spec.stride, 0, spec.dilation, groups)


def coord_conv_ref(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
    """CoordConv by explicit concatenation (batched input; arguments already validated).

    * full filter, ``groups == 1``: ``conv(cat([x, coords]), cat([weight, coord_weight]), bias)``;
    * full filter, ``groups > 1``: ``conv(x, weight, bias, groups) + conv(coords, coord_weight)``;
    * separate filter: ``conv(x, weight, bias) + conv1x1(centre_coords, coord_weight)``;
    * transposed: ``conv_transpose(cat([x, coords]), cat([weight, coord_weight], 0), bias)``.
    """
    n, sizes = input.shape[0], input.shape[2:]
    f64, device = torch.float64, input.device
    coords = reference_coords(
        [_coordinates(torch.arange(s, dtype=f64, device=device), s) for s in sizes], spec.with_r, input.dtype
    )
    coords = batched(coords, n)

    if spec.transposed:
        conv_t = _CONV_T[spec.ndim]
        args: tuple = (spec.stride, spec.padding, spec.output_padding)
        if spec.groups == 1:
            return conv_t(_cat(input, coords), torch.cat([weight, coord_weight], 0), bias, *args, 1, spec.dilation)
        return conv_t(input, weight, bias, *args, spec.groups, spec.dilation) + conv_t(
            coords, coord_weight, None, *args, 1, spec.dilation
        )

    if spec.separate:
        data = _conv(input, weight, bias, spec, spec.groups)
        axes = [
            _coordinates(torch.arange(out, dtype=f64, device=device) * s - b + dil * (k - 1) / 2, size)
            for out, size, s, (b, _), dil, k in zip(
                data.shape[2:], sizes, spec.stride, _side_pads(spec), spec.dilation, spec.kernel_size
            )
        ]
        centres = reference_coords(axes, spec.with_r, input.dtype)
        return data + _CONV[spec.ndim](batched(centres, n), coord_weight)
    if spec.groups == 1:
        return _conv(_cat(input, coords), torch.cat([weight, coord_weight], 1), bias, spec, 1)
    return _conv(input, weight, bias, spec, spec.groups) + _conv(coords, coord_weight, None, spec, 1)


def _cat(input: Tensor, coords: Tensor) -> Tensor:
    """``cat([input, coords], 1)`` in the input's memory format (as nn.Conv2d's output follows it)."""
    out = torch.cat([input, coords], 1)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    # (vmap cannot say whether a tensor is channels-last, and nothing follows a format under it)
    if fmt is not None and not transformed() and not input.is_contiguous() and input.is_contiguous(memory_format=fmt):
        out = out.contiguous(memory_format=fmt)
    return out


backend = Backend("reference", coord_conv_ref)
