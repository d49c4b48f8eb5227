"""Functional CoordConv: ``coord_conv{1,2,3}d`` and ``coord_conv_transpose{1,2,3}d``.

Same arguments as ``torch.nn.functional.conv2d`` (plus ``padding_mode``, as ``nn.Conv2d`` takes it)
and ``coord_weight``, the filter applied to the implicit coordinate channels. Inputs may be batched
``[N, C, *sizes]`` or unbatched ``[C, *sizes]``, like ``nn.Conv2d``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .backends import AUTO_MEASURED, compiles_as_op, dispatch, resolve_backend
from .backends import generation as backends_generation
from .backends.native import call_signature
from .coords import coord_channels
from .ops.arguments import autocast_device_type, transformed
from .ops.aten import composite as coord_conv_composite
from .spec import ConvSpec, PaddingArg, check_tensors, make_spec

__all__ = [
    "coord_conv1d",
    "coord_conv2d",
    "coord_conv3d",
    "coord_conv_transpose1d",
    "coord_conv_transpose2d",
    "coord_conv_transpose3d",
    "add_coords",
    "is_separate_filter",
]

IntOrTuple = int | Sequence[int]


def is_separate_filter(coord_kernel_size: int | Sequence[int] | None, ndim: int) -> bool:
    """Validate a ``coord_kernel_size`` argument: ``None`` (full coordinate kernel) or ``1`` (the
    paper's separate 1x1 coordinate filter). Returns whether the filter is separate."""
    if coord_kernel_size is None:
        return False
    if coord_kernel_size == 1 or (
        isinstance(coord_kernel_size, (tuple, list))
        and len(coord_kernel_size) == ndim
        and all(k == 1 for k in coord_kernel_size)
    ):
        return True
    raise ValueError(
        "coord_kernel_size must be None (full coordinate kernel, the default) or 1 (the paper's "
        f"separate 1x1 coordinate filter), got {coord_kernel_size!r}"
    )


def _autocast(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None):
    """Under ``torch.autocast``, cast like a convolution (a lower-precision op): everything to the
    autocast dtype, so the output dtype follows ``nn.Conv2d``'s."""
    device_type = autocast_device_type(input.device)
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return input, weight, coord_weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = [
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
        for t in (input, weight, coord_weight, bias)
    ]
    return tuple(cast)


def _composite_wanted(backend: str, input: Tensor, spec: ConvSpec) -> bool:
    """Exporters get plain ATen ops (standard ONNX operators), and so does torch.compile: the data
    convolution plus the batch-of-one coordinate term, whose add inductor fuses into neighbouring
    pointwise ops and whose gradients AOT autograd derives -- except on the CPU with the C++
    extension (backends ``auto`` and ``cpp``), where a compiled graph keeps the ``cpp`` op, one node
    that adds the term inside the convolution's own output pass
    (:func:`~coordconv_fused.backends.compiles_as_op`). Under ``torch.func`` transforms and
    forward-mode AD, compiled or not, ATen ops too: they have batching rules and forward derivatives,
    the ops have neither (:func:`~coordconv_fused.ops.arguments.transformed`). Eager calls keep the
    fused backends."""
    if transformed():
        return backend != "reference"
    if torch.compiler.is_compiling():
        return backend != "reference" and not compiles_as_op(backend, input, spec)
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()  # the TorchScript-based exporter


def _run(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec, backend: str
) -> Tensor:
    """Validate, dispatch and run (the path of a first call, and of every call while compiling)."""
    unbatched = isinstance(input, Tensor) and input.dim() == spec.ndim + 1
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(input, Tensor):
        input, weight, coord_weight, bias = _autocast(input, weight, coord_weight, bias)
    check_tensors(input, weight, coord_weight, bias, spec)
    if _composite_wanted(backend, input, spec):
        out = coord_conv_composite(input, weight, coord_weight, bias, spec)
    else:
        out = dispatch(backend, input, weight, coord_weight, bias, spec)
    return out.squeeze(0) if unbatched else out


# ---- the per-call fast path -----------------------------------------------------------------------
# A call is validated and resolved once per (arguments, input signature): the normalised spec, the
# checks of the tensors against it, the backend's choice and its prepared argument list are kept in
# a plan, and later calls with the same signature (shapes, dtypes and devices of every tensor, the
# arguments, the backend registry's state) run the plan directly. Grad mode, tracing and autocast
# are looked at on every call (autocast before the signature is taken: it changes the dtypes).

_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096


def clear_plan_cache() -> None:
    """Forget every resolved call (e.g. after changing what a backend's availability depends on)."""
    _PLANS.clear()


def _tensors_key(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> tuple:
    """The shapes, dtypes and devices of a call's tensors: the part of its plan key that reads them
    (:data:`~coordconv_fused.backends.native.call_signature` packs the same in C++)."""
    return (
        input.shape,
        input.dtype,
        input.device,
        weight.shape,
        weight.dtype,
        weight.device,
        coord_weight.shape,
        coord_weight.dtype,
        coord_weight.device,
        None if bias is None else (bias.shape, bias.dtype, bias.device),
    )


def _measured_key(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> tuple[bool, bool]:
    """(whether a gradient is recorded, whether the input is contiguous): what a measured ``auto``
    choice depends on beyond the shapes (see :mod:`coordconv_fused.backends.measured`)."""
    wants_grad = input.requires_grad or weight.requires_grad or coord_weight.requires_grad
    wants_grad = wants_grad or (bias is not None and bias.requires_grad)
    return (torch.is_grad_enabled() and wants_grad, input.is_contiguous())


def _cached_call(
    key_args: tuple, make: Callable[[tuple, Tensor, Tensor], ConvSpec], input, weight, coord_weight, bias, backend: str
) -> Tensor:
    """Run a call through its plan (built by the validating path on the first call); ``make(key_args,
    weight, coord_weight)`` gives the call's spec (a module-level function: no closure per call)."""
    # (under torch.jit.trace every call takes the validating path, as the graph of the first call
    # must be the graph of the next: the tracer's check runs the model again)
    if not isinstance(input, Tensor) or torch.compiler.is_compiling() or transformed() or torch._C._is_tracing():
        return _run(input, weight, coord_weight, bias, make(key_args, weight, coord_weight), backend)
    if torch._C._is_any_autocast_enabled():  # (one C call where no autocast is on, the usual case)
        device_type = autocast_device_type(input.device)
        if device_type is not None and torch.is_autocast_enabled(device_type):
            input, weight, coord_weight, bias = _autocast(input, weight, coord_weight, bias)
    try:
        # (what is not a tensor fails here or, with a shape, in the validation of the first call)
        tensors = NotImplemented if call_signature is None else call_signature(input, weight, coord_weight, bias)
        if tensors is NotImplemented:
            tensors = _tensors_key(input, weight, coord_weight, bias)
        # where ``auto`` chooses by measurement, the choice also depends on _measured_key
        measured = backend == "auto" and input.device.type in AUTO_MEASURED
        key = (
            key_args,
            backend,
            backends_generation(),
            tensors,
            _measured_key(input, weight, coord_weight, bias) if measured else None,
        )
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not a tensor, or an unhashable argument (e.g. a list): no plan
        return _run(input, weight, coord_weight, bias, make(key_args, weight, coord_weight), backend)
    if plan is None:
        spec = make(key_args, weight, coord_weight)
        out = _run(input, weight, coord_weight, bias, spec, backend)  # validates, raises on bad input
        unbatched = input.dim() == spec.ndim + 1
        batched = input.unsqueeze(0) if unbatched else input
        fn = resolve_backend(backend, batched, weight, spec, coord_weight, bias).bind(spec)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = (spec, unbatched, fn)
        return out
    spec, unbatched, fn = plan
    if unbatched:
        return fn(input.unsqueeze(0), weight, coord_weight, bias).squeeze(0)
    return fn(input, weight, coord_weight, bias)


def _kernel_of(weight: Tensor, ndim: int, name: str) -> tuple[int, ...]:
    if not isinstance(weight, Tensor) or weight.dim() != ndim + 2:
        shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{name}: expected a {ndim + 2}-D weight tensor, got {shape}")
    return tuple(int(k) for k in weight.shape[2:])  # ints even under torch.jit.trace


def _infer_separate(coord_kernel_size, kernel: tuple[int, ...], coord_weight: Tensor, ndim: int) -> bool:
    if coord_kernel_size is not None:
        return is_separate_filter(coord_kernel_size, ndim)
    # Infer the variant from the shapes: a 1x1 coordinate kernel beside a larger data kernel is the
    # separate filter. (For a 1x1 data kernel both readings coincide unless padded; pass
    # coord_kernel_size=1 to ask for the separate filter there.)
    return (
        isinstance(coord_weight, Tensor) and all(k == 1 for k in coord_weight.shape[2:]) and any(k != 1 for k in kernel)
    )


def _conv_spec(
    ndim, weight, coord_weight, stride, padding, dilation, groups, padding_mode, with_r, coord_kernel_size, separate
) -> ConvSpec:
    """The validated spec of a (non-transposed) CoordConv call: what a plan is built from."""
    kernel = _kernel_of(weight, ndim, f"coord_conv{ndim}d")
    sep = _infer_separate(coord_kernel_size, kernel, coord_weight, ndim) if separate is None else separate
    return make_spec(ndim, kernel, stride, padding, dilation, groups, padding_mode, with_r, sep)


def _coord_conv(
    ndim,
    input,
    weight,
    coord_weight,
    bias,
    stride,
    padding,
    dilation,
    groups,
    padding_mode,
    with_r,
    backend,
    coord_kernel_size=None,
    separate=None,
):
    """A (non-transposed) CoordConv call through its plan; the key is the arguments of
    :func:`_conv_spec` after the tensors (the modules build the same key, see
    ``_CoordConvNd._eager_forward``)."""
    if has_torch_function_variadic(input, weight, coord_weight, bias):  # (torch.fx proxies, tensor subclasses)
        return handle_torch_function(
            CONV_FUNCTIONS[ndim], (input, weight, coord_weight, bias), input, weight, coord_weight, bias, stride,
            padding, dilation, groups, padding_mode, with_r, backend, coord_kernel_size=coord_kernel_size,
        )  # fmt: skip
    key = (ndim, stride, padding, dilation, groups, padding_mode, with_r, coord_kernel_size, separate)
    return _cached_call(key, _spec_of_key, input, weight, coord_weight, bias, backend)


def _spec_of_key(key: tuple, weight: Tensor, coord_weight: Tensor) -> ConvSpec:
    """The spec of a (non-transposed) call from its plan key (:func:`_coord_conv`'s)."""
    return _conv_spec(key[0], weight, coord_weight, *key[1:])


def _transposed_spec_of_key(key: tuple, weight: Tensor, coord_weight: Tensor) -> ConvSpec:
    """The spec of a transposed call from its plan key (:func:`_coord_conv_transpose`'s)."""
    _, ndim, stride, padding, output_padding, groups, dilation, with_r = key
    kernel = _kernel_of(weight, ndim, f"coord_conv_transpose{ndim}d")
    return make_spec(
        ndim, kernel, stride, padding, dilation, groups, "zeros", with_r, False, transposed=True,
        output_padding=output_padding,
    )  # fmt: skip


def _coord_conv_transpose(
    ndim, input, weight, coord_weight, bias, stride, padding, output_padding, groups, dilation, with_r, backend
):
    if has_torch_function_variadic(input, weight, coord_weight, bias):
        return handle_torch_function(
            CONV_TRANSPOSE_FUNCTIONS[ndim], (input, weight, coord_weight, bias), input, weight, coord_weight, bias,
            stride, padding, output_padding, groups, dilation, with_r, backend,
        )  # fmt: skip
    key = ("transposed", ndim, stride, padding, output_padding, groups, dilation, with_r)
    return _cached_call(key, _transposed_spec_of_key, input, weight, coord_weight, bias, backend)


def coord_conv2d(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    with_r: bool = False,
    backend: str = "auto",
    *,
    coord_kernel_size: int | None = None,
) -> Tensor:
    """2-D CoordConv: a convolution over ``input`` and its implicit coordinate channels.

    Equals ``conv2d(cat([input, coords]), cat([weight, coord_weight], 1), bias, ...)`` for
    ``groups == 1`` without materialising ``coords``; see ``docs/semantics.md``.

    Args:
        input: ``[N, C_in, H, W]`` or ``[C_in, H, W]``.
        weight: ``[C_out, C_in / groups, kH, kW]``, as for ``F.conv2d``.
        coord_weight: ``[C_out, d, kH, kW]`` (full coordinate kernel) or ``[C_out, d, 1, 1]`` (the
            separate coordinate filter), with ``d = 2`` or ``3`` with ``with_r``.
        bias: ``[C_out]`` or ``None``.
        stride, padding, dilation, groups, padding_mode: as ``nn.Conv2d`` (padding may be 'same'
            or 'valid'); coordinates are padded by the same rule as the input.
        with_r: add the radius channel ``sqrt(i**2 + j**2)``.
        backend: 'auto' or a name from :func:`coordconv_fused.available_backends`.
        coord_kernel_size: ``None`` infers the variant from ``coord_weight``'s shape; ``1`` forces
            the separate filter.
    """
    return _coord_conv(
        2,
        input,
        weight,
        coord_weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        with_r,
        backend,
        coord_kernel_size,
    )


def coord_conv1d(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    with_r: bool = False,
    backend: str = "auto",
    *,
    coord_kernel_size: int | None = None,
) -> Tensor:
    """1-D CoordConv (one coordinate channel along the length, plus ``|c0|`` with ``with_r``).
    Arguments as :func:`coord_conv2d` with 1-D shapes."""
    return _coord_conv(
        1,
        input,
        weight,
        coord_weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        with_r,
        backend,
        coord_kernel_size,
    )


def coord_conv3d(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    with_r: bool = False,
    backend: str = "auto",
    *,
    coord_kernel_size: int | None = None,
) -> Tensor:
    """3-D CoordConv (coordinates along D, H, W, plus the radius with ``with_r``).
    Arguments as :func:`coord_conv2d` with 3-D shapes."""
    return _coord_conv(
        3,
        input,
        weight,
        coord_weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        with_r,
        backend,
        coord_kernel_size,
    )


def coord_conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    with_r: bool = False,
    backend: str = "auto",
) -> Tensor:
    """2-D transposed CoordConv: the coordinates of the *input* are appended, then
    ``conv_transpose2d`` is applied. Arguments in ``F.conv_transpose2d``'s order;
    ``weight`` is ``[C_in, C_out / groups, kH, kW]`` and ``coord_weight`` ``[d, C_out, kH, kW]``."""
    return _coord_conv_transpose(
        2, input, weight, coord_weight, bias, stride, padding, output_padding, groups, dilation, with_r, backend
    )


def coord_conv_transpose1d(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    with_r: bool = False,
    backend: str = "auto",
) -> Tensor:
    """1-D transposed CoordConv; see :func:`coord_conv_transpose2d`."""
    return _coord_conv_transpose(
        1, input, weight, coord_weight, bias, stride, padding, output_padding, groups, dilation, with_r, backend
    )


def coord_conv_transpose3d(
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    with_r: bool = False,
    backend: str = "auto",
) -> Tensor:
    """3-D transposed CoordConv; see :func:`coord_conv_transpose2d`."""
    return _coord_conv_transpose(
        3, input, weight, coord_weight, bias, stride, padding, output_padding, groups, dilation, with_r, backend
    )


def add_coords(input: Tensor, rank: int, with_r: bool = False) -> Tensor:
    """The explicit concatenation ``[input, c0, ..., (r)]`` of a ``[N, C, *sizes]`` (or unbatched
    ``[C, *sizes]``) input with its ``rank`` coordinate channels (plus the radius with ``with_r``):
    what :class:`~coordconv_fused.AddCoords` computes. Takes part in ``__torch_function__`` (one
    call in a ``torch.fx`` graph)."""
    if has_torch_function_variadic(input):
        return handle_torch_function(add_coords, (input,), input, rank, with_r)
    if input.dim() not in (rank + 1, rank + 2):
        raise ValueError(
            f"AddCoords(rank={rank}): expected a {rank + 2}-D (batched) or {rank + 1}-D (unbatched) input, "
            f"got shape {list(input.shape)}"
        )
    if not input.is_floating_point():
        raise ValueError(f"AddCoords: input must be a floating-point tensor, got {input.dtype}")
    sizes = input.shape[-rank:]
    coords = coord_channels(sizes, with_r, dtype=input.dtype, device=input.device)
    coords = coords.expand(*input.shape[: -rank - 1], *coords.shape)
    return torch.cat([input, coords], dim=-rank - 1)


CONV_FUNCTIONS = {1: coord_conv1d, 2: coord_conv2d, 3: coord_conv3d}
CONV_TRANSPOSE_FUNCTIONS = {1: coord_conv_transpose1d, 2: coord_conv_transpose2d, 3: coord_conv_transpose3d}
"""The public functions by spatial rank: what a tensor subclass's or a ``torch.fx.Proxy``'s
``__torch_function__`` is given (a traced graph records one call of the function, as for
``F.conv2d``)."""
