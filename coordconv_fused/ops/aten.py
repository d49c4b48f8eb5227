"""CoordConv as ATen ops: ``y = conv(x, weight, bias) + P``, ``P = conv(coords, coord_weight)``
for a batch of one.

The coordinate term does not depend on the sample, so it is computed once per call, and the
gradient of ``coord_weight`` needs only ``grad_output.sum(0)``. These functions take the op's
arguments (:mod:`coordconv_fused.ops.schema`) and use only differentiable ATen ops: they are the
``torch`` backend, what exporters and ``torch.compile`` see (:func:`composite`), and every backend's
backward when a graph of the gradients is recorded (second-order gradients).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coords import centre_coord_channels, padded_coord_channels
from ..geometry import image_sizes, pairs
from ..spec import ConvSpec
from .arguments import batched, exporting, op_arguments, pre_pad, static_arguments

__all__ = [
    "coord_input",
    "coordinate_term",
    "coord_weight_grad",
    "forward",
    "prepare_forward",
    "composite",
    "batch_sum",
    "memory_order",
    "term_conv_args",
    "in_format_of",
]


# Coordinate tensors of recent geometries (they depend on sizes, padding, dtype and device only, never
# on data): eager calls reuse them instead of building them again from a dozen small ops.
_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_CACHE_SIZE = 64


def coord_input(
    input: Tensor,
    weight: Tensor,
    out_sizes: Sequence[int],
    stride,
    padding,
    dilation,
    pre_pad,
    pre_pad_mode,
    with_r: bool,
    separate: bool,
    cache: bool = False,
) -> Tensor:
    """The ``[1, d, ...]`` coordinate tensor the coordinate filter is applied to (batch of one).

    Full filter: the image's coordinates, padded like the input (explicit part here; the symmetric
    zero part is applied by the convolution). Separate filter: the receptive-field centres of the
    ``out_sizes`` outputs. With ``cache`` (eager calls only: the result is shared, never write to it)
    the tensor is kept for the next call with the same geometry.
    """
    if not cache or torch.compiler.is_compiling() or type(input) is not torch.Tensor:  # (fake, traced...)
        return _coord_input(
            input, weight, out_sizes, stride, padding, dilation, pre_pad, pre_pad_mode, with_r, separate
        )
    key = (
        tuple(input.shape[2:]),
        tuple(weight.shape[2:]),
        tuple(out_sizes),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        tuple(pre_pad),
        pre_pad_mode,
        with_r,
        separate,
        input.dtype,
        input.device,
    )
    coords = _CACHE.get(key)
    if coords is None:
        coords = _coord_input(
            input, weight, out_sizes, stride, padding, dilation, pre_pad, pre_pad_mode, with_r, separate
        )
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.popitem(last=False)
        _CACHE[key] = coords
    return coords


def _coord_input(
    input: Tensor,
    weight: Tensor,
    out_sizes: Sequence[int],
    stride,
    padding,
    dilation,
    pre_pad,
    pre_pad_mode,
    with_r: bool,
    separate: bool,
) -> Tensor:
    sizes = image_sizes(input, pre_pad)
    if not separate:
        coords = padded_coord_channels(
            sizes, with_r, pairs(pre_pad), pre_pad_mode, dtype=input.dtype, device=input.device
        )
    else:
        pad_before = [b + p for (b, _), p in zip(pairs(pre_pad), padding)]
        coords = centre_coord_channels(
            out_sizes,
            sizes,
            with_r,
            stride=stride,
            pad_before=pad_before,
            dilation=dilation,
            kernel_size=weight.shape[2:],
            dtype=input.dtype,
            device=input.device,
        )
    return batched(coords, 1)


def coordinate_term(
    input,
    weight,
    coord_weight,
    out_sizes,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    pre_pad,
    pre_pad_mode,
    with_r,
    separate,
    cache: bool = False,
) -> Tensor:
    """The batch-independent coordinate term ``P``: a ``[1, C_out, *out_sizes]`` tensor.

    Under ``torch.compile`` (not export) on a GPU, a 2-D full filter's term is one small GEMM of the
    filter with the im2col matrix of the coordinates (``F.unfold``, which inductor generates in
    place), as the eager device path makes it, rather than a batch-of-one convolution. On the CPU
    (backend ``torch``, or no extension: elsewhere a compiled CPU graph keeps the ``cpp`` op) it
    stays the convolution: compiled ``CoordConv2d + ReLU`` on (8,64,56,56)->64 measured 1.04-1.05x
    compiled ``Conv2d + ReLU`` that way against 1.06-1.075x with the GEMM (docs/tuning.md)."""
    coords = coord_input(
        input, weight, out_sizes, stride, padding, dilation, pre_pad, pre_pad_mode, with_r, separate, cache
    )
    if (
        coords.dim() == 4
        and not (transposed or separate)
        and coords.device.type != "cpu"
        and torch.compiler.is_compiling()
        and not exporting()
    ):
        return term_by_gemm(coords, coord_weight, out_sizes, stride, padding, dilation)
    term_args = term_conv_args(input.dim() - 2, stride, padding, dilation, transposed, output_padding, separate)
    return torch.convolution(coords, coord_weight, None, *term_args)


def term_by_gemm(coords: Tensor, coord_weight: Tensor, out_sizes, stride, padding, dilation) -> Tensor:
    """The 2-D full filter's coordinate term as one GEMM of the filter ``[C_out, d*kh*kw]`` with the
    im2col matrix of the ``[1, d, H, W]`` coordinates (:func:`coordinate_term` under
    ``torch.compile`` on a GPU); the same numbers as the batch-of-one convolution, up to rounding."""
    cols = F.unfold(coords, coord_weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    term = coord_weight.reshape(coord_weight.shape[0], -1) @ cols[0]
    return term.view(1, coord_weight.shape[0], *out_sizes)


def term_conv_args(ndim: int, stride, padding, dilation, transposed, output_padding, separate: bool) -> tuple:
    """``torch.convolution``'s arguments after the bias for the coordinate term: the layer's geometry
    for a full coordinate filter; a plain 1x1 convolution of the receptive-field centres for a
    separate one."""
    if separate:
        return ([1] * ndim, [0] * ndim, [1] * ndim, False, [0] * ndim, 1)
    return (stride, padding, dilation, transposed, output_padding, 1)


def coord_weight_grad(
    grad_sum,
    input,
    weight,
    coord_weight,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    pre_pad,
    pre_pad_mode,
    with_r,
    separate,
) -> Tensor:
    """Gradient of ``coord_weight`` from ``grad_sum = grad_output.sum(0, keepdim=True)``
    (linear in ``grad_sum``, and differentiable)."""
    coords = coord_input(
        input,
        weight,
        grad_sum.shape[2:],
        stride,
        padding,
        dilation,
        pre_pad,
        pre_pad_mode,
        with_r,
        separate,
        cache=True,
    )
    if separate:
        return (grad_sum.flatten(2)[0] @ coords.flatten(2)[0].transpose(0, 1)).reshape(coord_weight.shape)
    return torch.ops.aten.convolution_backward(
        grad_sum,
        coords,
        coord_weight,
        None,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        1,
        [False, True, False],
    )[1]


def forward(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None,
    *args,
    cache: bool = False,
) -> Tensor:
    """The whole layer from the op's arguments: the data convolution plus the coordinate term
    (:func:`coordinate_term`), added in place where ``cache`` (eager calls), out of place otherwise
    (traced graphs)."""
    stride, padding, dilation, transposed, output_padding, groups, pre_pad, mode, with_r, separate = args
    out = torch.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    term = coordinate_term(
        input, weight, coord_weight, out.shape[2:], stride, padding, dilation, transposed, output_padding,
        pre_pad, mode, with_r, separate, cache=cache,
    )  # fmt: skip
    return out.add_(term) if cache else out + term


def composite(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None,
    spec: ConvSpec,
) -> Tensor:
    """The whole layer as plain ATen ops on a batched, validated input (no custom op): what
    exporters (ONNX) get, and ``torch.compile`` but on the CPU with the C++ extension
    (:func:`coordconv_fused.backends.compiles_as_op`). Same numbers as the ``torch`` backend."""
    input, args = op_arguments(input, spec)
    return forward(input, weight, coord_weight, bias, *args)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def memory_order(t: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dims that is contiguous (``(0, 2, 3, 1)`` for channels-last 4-D,
    the identity for contiguous), or None for other layouts: then each sample is one contiguous
    block of memory, ``t.permute(order).reshape(N, -1)`` a view."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt):
        return (0, *range(2, t.dim()), 1)
    return None


def batch_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t.sum(0, keepdim=True, dtype=dtype)``, reduced over the samples' contiguous blocks of
    memory where ``t`` is contiguous or channels-last: ATen's reduction of a channels-last tensor
    over its batch dim is up to 20x slower than the same sum over a ``[N, M]`` view (H200, bf16
    ``(64,32,256,256)``: 1.77 ms against 83 µs). Differentiable."""
    order = memory_order(t)
    if order is None or t.dim() < 3 or t.numel() == 0:
        return t.sum(0, keepdim=True, dtype=dtype)
    sample = [t.shape[d] for d in order[1:]]
    flat = t.permute(order).reshape(t.shape[0], -1).sum(0, dtype=dtype)
    return flat.view(1, *sample).permute(tuple(sorted(range(t.dim()), key=order.__getitem__)))


CPU_PATH = True
"""Whether calls prepared from now on take the CPU path on CPU tensors (bias inside the data
convolution, the term kept by value); tests set it False to run the device path on CPU tensors."""


def in_format_of(coords: Tensor, out: Tensor) -> Tensor:
    """``coords`` in ``out``'s memory format (channels-last outputs: the term the convolution makes
    of them is then channels-last too, and adding it reads both tensors in the same order)."""
    if out.is_contiguous() or memory_order(out) is None:
        return coords
    return coords.contiguous(memory_format=_CHANNELS_LAST[out.dim()])


def _channels_last_filter(coord_weight: Tensor, transposed: bool) -> bool:
    """Whether ``coord_weight`` is a channels-last (not contiguous) filter of a convolution (a module
    converted with ``.to(memory_format=torch.channels_last)``): its memory order is then ``(C_out,
    *taps, d)``, and flattened in that order it is a view (:func:`_filter_matrix`)."""
    if transposed or coord_weight.is_contiguous():  # (the usual case first: one C call)
        return False
    fmt = _CHANNELS_LAST.get(coord_weight.dim())
    return fmt is not None and coord_weight.is_contiguous(memory_format=fmt)


def _filter_matrix(coord_weight: Tensor, transposed: bool, channels_last_filter: bool) -> Tensor:
    """The coordinate filter as a ``[C_out, k]`` matrix: ``k`` in ``(d, *taps)`` order, or, for a
    channels-last filter, in its memory order ``(*taps, d)`` (both views, no copy)."""
    if channels_last_filter:
        return coord_weight.permute(0, *range(2, coord_weight.dim()), 1).reshape(coord_weight.shape[0], -1)
    cw = coord_weight.movedim(1, 0) if transposed else coord_weight
    return cw.reshape(cw.shape[0], -1)


def _coord_columns(
    coords: Tensor, coord_weight: Tensor, term_args: tuple, out: Tensor, channels_last_filter: bool = False
) -> tuple[Tensor, bool]:
    """The coordinate im2col matrix: what each weight of the coordinate filter multiplies at each
    output point, ``[k, points]`` (``k = coord_weight[0].numel()``), or ``[points, k]`` where ``out``
    is channels-last (so that the term comes out in that layout; the flag returned says which).
    Made once per geometry by convolving the coordinates with the identity filter (one output
    channel per filter weight: the layer's own convolution arguments, transposed ones included,
    give the columns); ``k`` in the order of :func:`_filter_matrix`."""
    transposed = term_args[3]
    c_in, taps = coords.shape[1], coord_weight.shape[2:]
    k = c_in * math.prod(taps)
    eye = torch.eye(k, dtype=coords.dtype, device=coords.device)
    identity = eye.view(c_in, *taps, k).movedim(-1, 1) if transposed else eye.view(k, c_in, *taps)
    cols = torch.convolution(coords, identity, None, *term_args)
    if channels_last_filter:  # rows (d, *taps) -> (*taps, d)
        cols = cols.view(c_in, *taps, -1).movedim(0, -2)
    cols = cols.reshape(k, -1)
    return (cols.t().contiguous(), True) if in_format_of(coords, out) is not coords else (cols, False)


def _term_from_columns(
    columns: tuple[Tensor, bool], coord_weight: Tensor, bias: Tensor | None, transposed: bool, cw_last: bool
) -> Tensor:
    """The coordinate term plus the bias, one sample of the output in memory order: ``[C_out,
    points]`` (channels-last: ``[points, C_out]``), by one small GEMM of the coordinate filter
    ``[C_out, k]`` (:func:`_filter_matrix`) with the im2col matrix of :func:`_coord_columns`."""
    cw = _filter_matrix(coord_weight, transposed, cw_last)
    cols, channels_last = columns
    if channels_last:  # [points, k] x [k, C_out]
        return F.linear(cols, cw, bias)
    return torch.mm(cw, cols) if bias is None else torch.addmm(bias.view(-1, 1), cw, cols)


def _add_term(out: Tensor, term: Tensor, channels_last: bool, sample: tuple[int, ...]) -> Tensor:
    """``out + term`` for the term of :func:`_term_from_columns` (``sample``: ``out.shape[1:]`` as a
    tuple of ints; a ``torch.Size`` argument costs a ``view`` 2 µs, a tuple 0.75 µs, 2-core Xeon);
    a channels-last ``out`` seen as ``[N, points, C_out]``, a contiguous view, so that under autograd
    the term's gradient, the batch sum of the output's, reduces contiguous blocks (see
    :func:`batch_sum`). In place where no gradient is recorded."""
    if channels_last:
        n, c = out.shape[0], sample[0]
        flat = out.permute(0, *range(2, out.dim()), 1)  # (a contiguous view)
        if n == 0:
            return out + term.view(*sample[1:], c).movedim(-1, 0)
        if not out.requires_grad:
            flat.view(n, -1, c).add_(term)
            return out
        inverse = (0, out.dim() - 1, *range(1, out.dim() - 1))
        return (flat.reshape(n, -1, c) + term).view(n, *sample[1:], c).permute(inverse)
    # (ATen sums a contiguous output's gradient over the batch as fast as over a [N, M] view)
    return out.add_(term.view(*sample)) if not out.requires_grad else out + term.view(*sample)


def prepare_forward(
    spec: ConvSpec, on_signature: Callable[..., object] | None = None
) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """``fn(input, weight, coord_weight, bias)``: :func:`forward` for ``spec`` as eager ATen calls
    (autograd is ATen's, in C++; second order comes for free), keeping between calls what does not
    depend on the data:

    * the coordinate tensor of the last input signature (shape, dtype, device, memory format), in
      the output's memory format;
    * on the CPU, where no gradient of ``coord_weight`` is wanted (inference, frozen coordinate
      filter), the coordinate term ``P`` of the last ``coord_weight`` *values*: a call compares
      ``coord_weight`` with a copy (a few dozen numbers) instead of convolving again. By value, not
      by version counter: ``param.data.copy_(...)`` changes a parameter without bumping its version.
    * off the CPU (the device path), where that comparison would read device memory from the host
      (a synchronisation), the coordinate im2col matrix of the signature instead
      (:func:`_coord_columns`): each call makes ``P`` plus the bias by one small GEMM and adds it
      in one pass over the output, which cuDNN left without its bias (cuDNN adds a bias in a pass
      of its own), with the output seen as ``[N, M]`` in memory order, so that the backward's batch
      sum reduces contiguous blocks (:func:`batch_sum`; ATen's sum over the batch of a
      channels-last tensor measured up to 21x slower on an H200).

    Each cache holds one entry, replaced as a whole (a tuple), so calls from several threads never
    pair one signature's coordinates with another's. ``on_signature(input, weight, coord_weight,
    coords, columns, columns_last, out)``, if given, is called on each call of plain tensors with its
    entry (``input`` padded; ``columns`` None on the CPU path): the ``torch`` backend hands it to
    C++, whose calls then run without this function until the signature changes
    (:func:`coordconv_fused.backends.aten.prepare_eager`)."""
    pads, mode, args = static_arguments(spec)
    stride, padding, dilation, transposed, output_padding, groups, pre, pre_mode, with_r, separate = args
    cpu_path = CPU_PATH
    term_args = term_conv_args(spec.ndim, stride, padding, dilation, transposed, output_padding, separate)
    # (input signature, coordinates [1, d, ...], im2col matrix, out.shape[1:] as ints)
    coords_entry: tuple = (None, None, None, None)
    term_entry: tuple = (None, None, None)  # (coordinates, coord_weight copy, P)

    def call(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> Tensor:
        nonlocal coords_entry, term_entry
        if pads is not None:
            input = pre_pad(input, pads, mode)
        # Off the CPU the bias goes into the coordinate term (a batch of one): cuDNN adds a bias in a
        # pass of its own over the output, so the term and the bias then cost that one pass together.
        # (oneDNN adds it inside the convolution: there it stays.)
        host = input.is_cpu and cpu_path
        out = torch.convolution(
            input, weight, bias if host else None, stride, padding, dilation, transposed, output_padding, groups
        )
        if type(input) is not torch.Tensor:  # fake or traced tensors: nothing kept
            coords = _coord_input(
                input, weight, out.shape[2:], stride, padding, dilation, pre, pre_mode, with_r, separate
            )
            return out + torch.convolution(coords, coord_weight, None if host else bias, *term_args)
        cw_last = not host and _channels_last_filter(coord_weight, transposed)
        signature = (input.shape, input.dtype, input.device, out.is_contiguous(), cw_last)
        last, coords, cols, sample = coords_entry
        if signature != last:
            coords = _coord_input(
                input, weight, out.shape[2:], stride, padding, dilation, pre, pre_mode, with_r, separate
            )
            cols = None if host else _coord_columns(coords, coord_weight, term_args, out, cw_last)
            sample = tuple(out.shape[1:])
            coords_entry = (signature, in_format_of(coords, out), cols, sample)
        if on_signature is not None:  # (each call: C++'s signature may tell apart what this one does not)
            columns, columns_last = cols if cols is not None else (None, False)
            on_signature(input, weight, coord_weight, coords_entry[1], columns, columns_last, out)
        if not host:
            term = _term_from_columns(cols, coord_weight, bias, transposed, cw_last)
            return _add_term(out, term, cols[1], sample)
        if coord_weight.requires_grad and torch.is_grad_enabled():
            return out.add_(torch.convolution(coords, coord_weight, None, *term_args))
        kept_coords, kept_weight, term = term_entry
        if kept_coords is not coords or not torch.equal(kept_weight, coord_weight):
            term = torch.convolution(coords, coord_weight, None, *term_args)
            term_entry = (coords, coord_weight.detach().clone(), term)
        return out.add_(term)

    return call
