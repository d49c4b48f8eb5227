"""The per-call path of the op-backed backends: a call prepared once per spec."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..spec import ConvSpec
from .arguments import pre_pad, static_arguments
from .autograd import eager_function

__all__ = ["prepare_call", "call_coord_conv_op"]


def prepare_call(op, spec: ConvSpec) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """``fn(input, weight, coord_weight, bias)`` calling ``op`` for ``spec`` on batched, validated
    tensors, with everything that depends on ``spec`` alone (padding split, argument list, which
    autograd to use) worked out once, here: the per-call path of every op-backed backend."""
    pads, mode, args = static_arguments(spec)
    eager = eager_function(op)
    overload = getattr(op, "default", op)

    def call(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> Tensor:
        input = pre_pad(input, pads, mode)
        if (
            eager is not None
            and torch.is_grad_enabled()
            and (
                input.requires_grad
                or weight.requires_grad
                or coord_weight.requires_grad
                or (bias is not None and bias.requires_grad)
            )
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return eager.apply(input, weight, coord_weight, bias, *args)
        return overload(input, weight, coord_weight, bias, *args)

    return call


def call_coord_conv_op(
    op, input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Call a CoordConv op on a batched, validated input."""
    return prepare_call(op, spec)(input, weight, coord_weight, bias)
