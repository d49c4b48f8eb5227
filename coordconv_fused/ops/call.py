"""The per-call path of the op-backed backends: a call prepared once per spec."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..spec import ConvSpec
from .arguments import pre_pad, static_arguments

__all__ = ["prepare_call", "call_coord_conv_op"]


def prepare_call(op, spec: ConvSpec) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """``fn(input, weight, coord_weight, bias)`` calling ``op`` for ``spec`` on batched, validated
    tensors, with everything that depends on ``spec`` alone (padding split, argument list) worked out
    once, here: the per-call path of every op-backed backend."""
    pads, mode, args = static_arguments(spec)
    overload = getattr(op, "default", op)
    if pads is None:
        return lambda input, weight, coord_weight, bias: overload(input, weight, coord_weight, bias, *args)
    return lambda input, weight, coord_weight, bias: overload(
        pre_pad(input, pads, mode), weight, coord_weight, bias, *args
    )


def call_coord_conv_op(
    op, input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Call a CoordConv op on a batched, validated input."""
    return prepare_call(op, spec)(input, weight, coord_weight, bias)
