"""The ``triton`` backend: fused implicit-GEMM kernels with in-kernel coordinates (``kernels/``).

Registered as the custom op ``coordconv_fused::coord_conv_triton``. Triton is imported only when
the op first runs, so importing this library never pays for it. The kernels run on CUDA tensors,
and on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before the first
import (that is how the test suite proves them on a machine without a GPU).

``auto`` does not pick it: on an NVIDIA H200 (2026-11-29, torch 2.11, Triton 3.6) the kernel was
slower than cuDNN on every layer measured, also on large ones (2.3x at (64,3,256,256)->32 3x3), so
``auto`` runs cuDNN (the ``torch`` backend) on CUDA and this backend is an explicit choice.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ..ops import call_coord_conv_op, define_coord_conv_op, prepare_call
from ..spec import ConvSpec
from .base import Backend

__all__ = ["coord_conv_triton", "backend"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _forward(*args):
    from coordconv_fused.kernels.launch import coord_conv_forward

    return coord_conv_forward(*args)


def _coord_weight_grad(*args):
    from coordconv_fused.kernels.launch import coord_weight_grad

    return coord_weight_grad(*args)


define_coord_conv_op("coord_conv_triton", _forward, _coord_weight_grad, opaque_grad=True)


def _unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    if _interpret() or torch.cuda.is_available():
        return None
    return (
        "the Triton kernels need a CUDA GPU (set TRITON_INTERPRET=1 before importing to run them "
        "on CPU tensors in Triton's slow interpreter, for testing)"
    )


def _supports(spec: ConvSpec) -> str | None:
    if spec.transposed:
        return "transposed CoordConv is not implemented in the Triton kernels; use backend='torch'"
    return None


def coord_conv_triton(
    input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the ``triton`` backend on a batched, validated input."""
    return call_coord_conv_op(torch.ops.coordconv_fused.coord_conv_triton, input, weight, coord_weight, bias, spec)


backend = Backend(
    "triton",
    coord_conv_triton,
    devices=frozenset({"cuda", "cpu"}) if _interpret() else frozenset({"cuda"}),
    unavailable_reason=_unavailable_reason,
    supports=_supports,
    prepare=lambda spec: prepare_call(torch.ops.coordconv_fused.coord_conv_triton, spec),
)
