"""Fake kernels and autograd of the CoordConv ops.

A Python-implemented op supplies two functions over the op's arguments — ``forward`` (the whole
output) and ``coord_weight_grad`` (the gradient of ``coord_weight`` from ``grad_output.sum(0)``) —
and :func:`define_coord_conv_op` creates it as a ``torch.library`` custom op with them. The
gradients of ``input``, ``weight`` and ``bias`` are those of the data convolution, computed by
ATen's ``convolution_backward`` (the bias's from the same batch sum). Whatever the op, a backward
run while autograd records a graph of the gradients (``create_graph=True``) is
:func:`differentiable_backward`: ATen ops only, so second-order gradients are exact.

Ops implemented in C++ bring their autograd in C++ (csrc/autograd/coord_conv_autograd.h, the same
backward: fused where the device has it, ATen ops plus ``coord_weight_grad_aten`` under
``create_graph``); :func:`register_native_coord_conv_op` adds their fake kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import aten
from .flops import register_flop_formulas
from .schema import GRAD_SCHEMA, NAMESPACE, SCHEMA

__all__ = [
    "define_coord_conv_op",
    "register_native_coord_conv_op",
    "differentiable_backward",
]

# forward(input, weight, coord_weight, bias, *args) -> output
ForwardFn = Callable[..., Tensor]
# coord_weight_grad(grad_sum [1, C_out, *out], input, weight, coord_weight, *args) -> grad
CoordGradFn = Callable[..., Tensor]


def _fake(input, weight, coord_weight, bias, *args):
    # Same shape, dtype, device and memory format as the data convolution (args: the op's
    # non-tensor arguments, the convolution's six first).
    return torch.ops.aten.convolution(input, weight, bias, *args[:6])


def _setup_context(ctx, inputs, output):
    input, weight, coord_weight, bias, *args = inputs
    ctx.save_for_backward(input, weight, coord_weight)
    ctx.has_bias = bias is not None
    ctx.args = args


def _grad_fake(grad_sum, input, weight, coord_weight, *args):
    return torch.empty_like(coord_weight, memory_format=torch.contiguous_format)


def _generic_backward(ctx, grad, coord_weight_grad: CoordGradFn):
    """The gradients of (input, weight, coord_weight, bias): ATen's ``convolution_backward`` for
    the data convolution, ``coord_weight_grad`` on the batch sum of ``grad`` for the coordinates."""
    input, weight, coord_weight = ctx.saved_tensors
    stride, padding, dilation, transposed, output_padding, groups = ctx.args[:6]
    need_in, need_w, need_cw, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    grad_in = grad_w = grad_cw = grad_b = None
    grad_sum = None
    if need_cw:
        # The coordinate term is the same for every sample: only the batch sum of grad matters
        # (accumulated in float32 for half types). The bias gradient is its sum over the
        # points, so convolution_backward need not read grad once more for it.
        acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        grad_sum = grad if grad.shape[0] == 1 and grad.dtype == acc else aten.batch_sum(grad, dtype=acc)
    bias_in_conv = need_b and grad_sum is None
    if need_in or need_w or bias_in_conv:
        c_out = weight.shape[1] * groups if transposed else weight.shape[0]
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad,
            input,
            weight,
            [c_out] if bias_in_conv else None,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            [need_in, need_w, bias_in_conv],
        )
    if grad_sum is not None:
        if need_b:
            grad_b = grad_sum.sum([0] + list(range(2, grad_sum.dim()))).to(grad.dtype)
        grad_cw = coord_weight_grad(grad_sum.to(grad.dtype), input, weight, coord_weight, *ctx.args)
    return (grad_in, grad_w, grad_cw, grad_b) + (None,) * 10


def differentiable_backward(ctx, grad):
    """The backward as differentiable ATen ops (``convolution_backward``, sums, and the coordinate
    gradient of :mod:`coordconv_fused.ops.aten`): what every backend runs when autograd records a
    graph of the gradients (``create_graph=True``: gradient penalties, double backward), so that
    second-order gradients are exact. The fused kernels and opaque ops are first-order only."""
    return _generic_backward(ctx, grad, aten.coord_weight_grad)


def _make_backward(coord_weight_grad: CoordGradFn):
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # a graph of the gradients is being recorded
            return differentiable_backward(ctx, grad)
        return _generic_backward(ctx, grad, coord_weight_grad)

    return backward


def _refusing_forward_ad(qualname: str, forward: ForwardFn) -> ForwardFn:
    """``forward``, raising while a forward-mode AD level is open (``torch.autograd.forward_ad``,
    ``torch.func.jvp``/``jacfwd``). A ``torch.library`` custom op has no forward-derivative
    registration, and its kernel, below autograd, got no tangent: the output's tangent was zero or
    missing without an error. The kernel cannot tell a ``jvp`` input from a constant (``jvp``'s
    tangents are not visible there), so it refuses every call under a level; the layers and the
    functional API never call it there (they run ATen ops, :func:`~.arguments.transformed`)."""

    def kernel(input, weight, coord_weight, bias, *args):
        if forward_ad._current_level >= 0:
            raise RuntimeError(
                f"{qualname} has no forward derivative (forward-mode AD, torch.func.jvp, jacfwd): call the "
                "CoordConv layer or coordconv_fused.coord_conv*d, which run as ATen ops under forward AD"
            )
        return forward(input, weight, coord_weight, bias, *args)

    return kernel


def define_coord_conv_op(
    name: str,
    forward: ForwardFn,
    coord_weight_grad: CoordGradFn,
    device_types: str | Sequence[str] | None = None,
    opaque_grad: bool = False,
):
    """Register ``coordconv_fused::<name>`` with ``forward``, a fake kernel and autograd (the op
    refuses forward-mode AD, which it has no rule for: :func:`_refusing_forward_ad`).

    With ``opaque_grad`` the gradient of ``coord_weight`` is registered as its own custom op
    ``coordconv_fused::<name>_coord_weight_grad`` (for kernels that cannot be traced, e.g. Triton
    launches, so that AOT autograd and ``torch.compile`` see one node in the backward graph).
    """
    qualname = f"{NAMESPACE}::{name}"
    op = torch.library.custom_op(
        qualname, _refusing_forward_ad(qualname, forward), mutates_args=(), schema=SCHEMA, device_types=device_types
    )
    op.register_fake(_fake)
    if opaque_grad:
        grad_op = torch.library.custom_op(
            f"{qualname}_coord_weight_grad",
            coord_weight_grad,
            mutates_args=(),
            schema=GRAD_SCHEMA,
            device_types=device_types,
        )
        grad_op.register_fake(_grad_fake)
        coord_weight_grad = grad_op
    op.register_autograd(_make_backward(coord_weight_grad), setup_context=_setup_context)
    register_flop_formulas(name, ("", "_coord_weight_grad") if opaque_grad else ("",))
    return op


def _input_grad_fake(grad, input, weight, stride, padding, dilation, transposed, output_padding, groups):
    return torch.ops.aten.convolution_backward(
        grad, input, weight, None, stride, padding, dilation, transposed, output_padding, groups, [True, False, False]
    )[0]


def _backward_fake(grad, input, weight, coord_weight, *args):
    conv_args, output_mask = args[:6], args[-1]
    need_in, need_w, need_cw, need_b = output_mask
    grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, input, weight, None, *conv_args, [need_in, need_w, False]
    )
    grad_cw = torch.empty_like(coord_weight, memory_format=torch.contiguous_format) if need_cw else None
    grad_b = grad.new_empty(grad.shape[1]) if need_b else None
    return grad_in, grad_w, grad_cw, grad_b


_COMPOSITE: list[torch.library.Library] = []


def _register_differentiable_coord_weight_grad() -> None:
    """``coordconv_fused::coord_weight_grad_aten``: :func:`coordconv_fused.ops.aten.coord_weight_grad`
    as a CompositeImplicitAutograd kernel (autograd differentiates its ATen ops). The C++ backward
    calls it under ``create_graph=True``."""
    if not _COMPOSITE:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        lib.impl("coord_weight_grad_aten", aten.coord_weight_grad, "CompositeImplicitAutograd")
        _COMPOSITE.append(lib)


def register_native_coord_conv_op(name: str, fused_backward: bool = False) -> None:
    """Add the fake kernels to ``coordconv_fused::<name>`` and its ``<name>_coord_weight_grad`` op
    (and, with ``fused_backward``, to ``<name>_input_grad`` and ``<name>_backward``), implemented in
    C++ with their autograd (csrc/autograd/coord_conv_autograd.h; schemas:
    :mod:`coordconv_fused.ops.schema`)."""
    qual = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qual, _fake)
    torch.library.register_fake(f"{qual}_coord_weight_grad", _grad_fake)
    if fused_backward:
        torch.library.register_fake(f"{qual}_input_grad", _input_grad_fake)
        torch.library.register_fake(f"{qual}_backward", _backward_fake)
    fused = ("_input_grad", "_backward") if fused_backward else ()
    register_flop_formulas(name, ("", "_coord_weight_grad", *fused))
    _register_differentiable_coord_weight_grad()
