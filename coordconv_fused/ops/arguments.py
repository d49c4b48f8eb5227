"""A :class:`~coordconv_fused.spec.ConvSpec` in the ops' terms: the explicit pre-pad of the input
and the op's non-tensor arguments (see :mod:`coordconv_fused.ops.schema`)."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from ..spec import ConvSpec

__all__ = ["static_arguments", "pre_pad", "op_arguments", "autocast_device_type", "exporting", "transformed", "batched"]

_AUTOCAST_DEVICE_TYPE: dict[torch.device, str | None] = {}


def autocast_device_type(device: torch.device) -> str | None:
    """``device``'s type if autocast exists for it (not, e.g., for ``meta``), else None; cached,
    as it is asked on every call. While compiling, the type itself (Dynamo cannot trace the query
    before torch 2.12, and a traced graph only runs on devices that support autocast)."""
    if torch.compiler.is_compiling():
        return device.type
    try:
        return _AUTOCAST_DEVICE_TYPE[device]
    except KeyError:
        available = torch.amp.is_autocast_available(device.type)
        return _AUTOCAST_DEVICE_TYPE.setdefault(device, device.type if available else None)


def exporting() -> bool:
    """Whether ``torch.export`` is tracing: the flag it sets, read directly. Dynamo before torch 2.12
    (e.g. 2.11) answers ``torch.compiler.is_exporting()`` with True under any ``torch.compile``."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) or a
    forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is active: the layer then runs
    as ATen ops, which have batching rules and forward derivatives. The custom ops have neither:
    ``grad``/``vmap`` of ``grad`` refuse a C++ ``autograd::Function``, and under ``jvp`` (eager or
    compiled) and forward AD the ops gave a zero or no tangent without an error (torch 2.14.1; called
    directly, they now refuse forward AD: csrc/autograd/coord_conv_autograd.h and
    :func:`~.autograd.define_coord_conv_op`). Read while compiling too: Dynamo traces both."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def batched(coords: Tensor, n: int) -> Tensor:
    """``coords`` (``[d, *sizes]``) as a batch ``[n, d, *sizes]`` of the same values: a view, but a
    tensor of its own under ``torch.compile``. A compiled training graph saves the batch for the
    backward of the convolution it feeds, and inductor (torch 2.14.1, 2.11) cannot lay out a saved
    *view* whose strides are symbolic: with dynamic shapes, backward failed to compile (``cannot
    determine truth value of Relational``, in ``get_stride_order``). Exported programs keep the view
    (ONNX's lowering of the copy gave Conv nodes inputs of the wrong rank)."""
    if torch.compiler.is_compiling() and not exporting():
        return coords.new_empty((n, *coords.shape)).copy_(coords)
    return coords.unsqueeze(0).expand(n, *coords.shape)


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
    if mode in ("reflect", "replicate"):  # autocast runs these in float32; keep the input's dtype
        device_type = autocast_device_type(input.device)
        if device_type is not None and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return F.pad(input, pads, mode=mode)
    return F.pad(input, pads, mode=mode)


def op_arguments(input: Tensor, spec: ConvSpec) -> tuple[Tensor, list]:
    """The op's view of a call: the pre-padded ``input`` and the op's non-tensor arguments."""
    pads, mode, args = static_arguments(spec)
    return pre_pad(input, pads, mode), list(args)
