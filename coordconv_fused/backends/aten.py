"""The ``torch`` backend: CoordConv decomposed into the data convolution plus a coordinate term.

``y = conv(x, weight, bias) + P``, where ``P = conv(coords, coord_weight)`` is computed once for a
batch of one and broadcast: the coordinate term does not depend on the sample, so nothing of size
``N*d*H*W`` is ever allocated, and backward needs only ``grad_output.sum(0)`` for ``coord_weight``.
The custom op ``coordconv_fused::coord_conv`` (what TorchScript calls, and ``torch.library.opcheck``
tests); eager calls run the same ATen calls directly (:func:`prepare_eager`), and ``torch.compile``
sees them as ATen ops (:func:`coordconv_fused.ops.aten.composite`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import aten, call_coord_conv_op, define_coord_conv_op
from ..ops.aten import composite, coord_weight_grad
from ..spec import ConvSpec
from .base import Backend

__all__ = ["coord_conv_decomposed", "prepare_eager", "backend"]


def _forward(input, weight, coord_weight, bias, *args):
    return aten.forward(input, weight, coord_weight, bias, *args, cache=True)


coord_conv_op = define_coord_conv_op("coord_conv", _forward, coord_weight_grad)


prepare_eager = aten.prepare_forward
"""The ``torch`` backend's eager per-call path for a spec: the op's computation as ATen calls."""


def coord_conv_decomposed(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the ``torch`` backend on a batched, validated input."""
    return call_coord_conv_op(torch.ops.coordconv_fused.coord_conv, input, weight, coord_weight, bias, spec)


coord_conv_composite = composite  # (older name)

backend = Backend("torch", coord_conv_decomposed, prepare=prepare_eager)
