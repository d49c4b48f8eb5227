"""The coordinate math: the one place where coordinate values are defined.

Every backend (the reference, the decomposed PyTorch path, and the Triton/C++/CUDA kernels) takes
its coordinate values from the formulas here, so that they agree to the last bit where they can.

Convention (see ``docs/semantics.md``): along an axis of size ``n`` the coordinate of index ``i`` is
``(2*i - (n-1)) / (n-1)``, i.e. ``2*i/(n-1) - 1`` evaluated with an exact integer numerator and a
single rounding, so the first index is exactly -1, the last exactly +1 and the middle exactly 0.
An axis of size 1 has coordinate 0. The optional radius channel is the correctly rounded
``sqrt(sum of squares)`` of the axis coordinates. Values are computed in float32 (float64 for
float64 tensors) and rounded to the
tensor's dtype at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "num_coord_channels",
    "axis_coords",
    "coord_channels",
    "padded_coord_channels",
    "centre_coord_channels",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype coordinates are computed in before being rounded to ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_coord_channels(ndim: int, with_r: bool) -> int:
    """Number of coordinate channels for ``ndim`` spatial dims: one per axis, plus the radius."""
    return ndim + int(with_r)


def _axis_values(numerators: Tensor, size: int) -> Tensor:
    """``numerators / (size - 1)``, or zeros for a single-element axis.

    Branch-free for a symbolic size (``sym_max``/``sym_min``), so that an exported graph with a
    dynamic spatial size keeps the size-1 case instead of specialising on it; plain ``max``/``min``
    for an ``int`` (Dynamo before torch 2.12 breaks the graph on a ``torch.sym_*`` of two ints);
    tensor ops for a 0-d tensor (a size traced by ``torch.jit.trace`` for ONNX).
    """
    if isinstance(size, int):
        return numerators / max(size - 1, 1) * min(size - 1, 1)
    if isinstance(size, Tensor):  # a traced size (the TorchScript-based ONNX exporter, dynamo=False)
        return numerators / (size - 1).clamp(min=1) * (size - 1).clamp(max=1)
    den = torch.sym_max(size - 1, 1)
    scale: Any = torch.sym_min(size - 1, 1)
    return numerators / den * scale


def axis_coords(size: int, *, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """Coordinates of the ``size`` positions of one axis, in ``compute_dtype(dtype)``.

    ``(2*i - (size-1)) / (size-1)`` for ``i`` in ``0..size-1``; ``[0.]`` when ``size == 1``.
    """
    ct = compute_dtype(dtype)
    numerators = torch.arange(size, dtype=ct, device=device) * 2 - (size - 1)
    return _axis_values(numerators, size)


def centre_axis_coords(
    out_size: int,
    in_size: int,
    *,
    stride: int,
    pad_before: int,
    dilation: int,
    kernel: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """Coordinates of the receptive-field centres of the ``out_size`` outputs of one axis.

    The centre of output ``o`` lies at input position ``h* = o*stride - pad_before +
    dilation*(kernel-1)/2`` (fractional for even kernels, not clipped to the image); its coordinate
    is ``(2*h* - (in_size-1)) / (in_size-1)``, whose numerator is an integer, so the value is
    exactly rounded, like :func:`axis_coords`.
    """
    ct = compute_dtype(dtype)
    offset = dilation * (kernel - 1) - 2 * pad_before - (in_size - 1)
    numerators = torch.arange(out_size, dtype=ct, device=device) * (2 * stride) + offset
    return _axis_values(numerators, in_size)


def _grid(axes: Sequence[Tensor], with_r: bool, dtype: torch.dtype) -> Tensor:
    """Stack per-axis coordinate vectors into a ``[d, *sizes]`` map (radius last), in ``dtype``."""
    ndim = len(axes)
    sizes = [a.shape[0] for a in axes]
    channels = []
    for k, a in enumerate(axes):
        shape = [1] * ndim
        shape[k] = sizes[k]
        channels.append(a.reshape(shape).expand(sizes))
    if with_r:
        # Squares summed in the compute dtype, then a correctly rounded square root. (ATen's
        # vectorised float32 sqrt is not always correctly rounded on CPU; a float64 sqrt rounded to
        # float32 is, so every backend can reproduce this value exactly.)
        squares = torch.stack([c * c for c in channels]).sum(0)
        channels.append(torch.sqrt(squares.double()).to(squares.dtype))
    return torch.stack(channels, 0).to(dtype)


def coord_channels(
    sizes: Sequence[int],
    with_r: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The coordinate channels of an image of spatial size ``sizes``: a ``[d, *sizes]`` tensor.

    Channel ``k`` varies along spatial axis ``k`` (rows before columns); with ``with_r`` the last
    channel is the radius ``sqrt(c0**2 + c1**2 (+ c2**2))``. This is what the concatenation-based
    CoordConv appends to every sample of the batch.
    """
    axes = [axis_coords(s, dtype=dtype, device=device) for s in sizes]
    return _grid(axes, with_r, dtype)


def padded_coord_channels(
    sizes: Sequence[int],
    with_r: bool,
    side_pads: Sequence[tuple[int, int]],
    mode: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """Coordinate channels of an image of size ``sizes``, padded as a convolution pads its input.

    ``side_pads[k] = (before, after)`` for spatial axis ``k``; ``mode`` is a ``padding_mode`` of
    ``nn.Conv2d`` ('zeros', 'reflect', 'replicate' or 'circular'): the coordinate channels are
    padded by exactly the rule that pads the data channels. Returns ``[d, *padded_sizes]``.
    """
    coords = coord_channels(sizes, with_r, dtype=dtype, device=device)
    if not any(b or a for b, a in side_pads):
        return coords
    pads = [p for pair in reversed(side_pads) for p in pair]  # F.pad wants the last axis first
    if mode == "zeros":
        return F.pad(coords, pads)
    return F.pad(coords.unsqueeze(0), pads, mode=mode).squeeze(0)


def centre_coord_channels(
    out_sizes: Sequence[int],
    in_sizes: Sequence[int],
    with_r: bool,
    *,
    stride: Sequence[int],
    pad_before: Sequence[int],
    dilation: Sequence[int],
    kernel_size: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """The coordinates the separate (1x1) coordinate filter sees: ``[d, *out_sizes]``.

    Output position ``o`` gets the coordinates of the centre of its receptive field in an input
    of size ``in_sizes`` (see :func:`centre_axis_coords`), with the radius computed from them.
    """
    axes = [
        centre_axis_coords(o, n, stride=s, pad_before=p, dilation=d, kernel=k, dtype=dtype, device=device)
        for o, n, s, p, d, k in zip(out_sizes, in_sizes, stride, pad_before, dilation, kernel_size)
    ]
    return _grid(axes, with_r, dtype)
