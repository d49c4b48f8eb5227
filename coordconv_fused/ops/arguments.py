"""A :class:`~coordconv_fused.spec.ConvSpec` in the ops' terms: the explicit pre-pad of the input
and the op's non-tensor arguments (see :mod:`coordconv_fused.ops.schema`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import ConvSpec

__all__ = ["static_arguments", "pre_pad", "op_arguments"]


def static_arguments(spec: ConvSpec) -> tuple[list[int] | None, str, tuple]:
    """What depends on ``spec`` alone: the explicit pre-pad (``F.pad``'s list, or None), its mode,
    and the op's non-tensor arguments."""
    if spec.transposed:
        pre = ((0, 0),) * spec.ndim
        conv_padding = spec.padding
    else:
        pre, conv_padding = spec.split_padding()
    pads = [p for pair in reversed(pre) for p in pair] if any(b or a for b, a in pre) else None
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    args = (
        list(spec.stride),
        list(conv_padding),
        list(spec.dilation),
        spec.transposed,
        list(spec.output_padding),
        spec.groups,
        [p for pair in pre for p in pair],
        spec.padding_mode,
        spec.with_r,
        spec.separate,
    )
    return pads, mode, args


def pre_pad(input: Tensor, pads: list[int] | None, mode: str) -> Tensor:
    """``input`` with the explicit part of the padding applied (the op pads the coordinates by the
    same rule)."""
    if pads is None:
        return input
    # Autocast runs reflection/replication padding in float32; keep the input's dtype.
    with torch.autocast(input.device.type, enabled=False):
        return F.pad(input, pads, mode=mode)


def op_arguments(input: Tensor, spec: ConvSpec) -> tuple[Tensor, list]:
    """The op's view of a call: the pre-padded ``input`` and the op's non-tensor arguments."""
    pads, mode, args = static_arguments(spec)
    return pre_pad(input, pads, mode), list(args)
