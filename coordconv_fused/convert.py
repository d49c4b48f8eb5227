"""Model conversion: turn the plain convolutions of an existing model into CoordConv layers, and
fold an inference-mode batch norm into a CoordConv layer."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .modules import CoordConv1d, CoordConv2d, CoordConv3d, _CoordConvTransposeNd, _CoordMixin

__all__ = ["convert_to_coordconv", "fuse_conv_bn_eval"]

_CONVERSIONS: dict[type[nn.Module], type[CoordConv1d] | type[CoordConv2d] | type[CoordConv3d]] = {
    nn.Conv1d: CoordConv1d,
    nn.Conv2d: CoordConv2d,
    nn.Conv3d: CoordConv3d,
}


def convert_to_coordconv(
    module: nn.Module, with_r: bool = False, coord_kernel_size: int | None = None, backend: str = "auto"
) -> nn.Module:
    """Replace every ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` in ``module`` by its CoordConv layer.

    Weights and biases are copied and ``coord_weight`` is zero, so the model computes exactly what
    it computed before until it is trained. Children are replaced in place; the (possibly new) root
    is returned, so ``model = convert_to_coordconv(model)`` also works when ``model`` is itself a
    convolution. Layers that already are CoordConv, transposed convolutions, and subclasses of the
    convolutions (which may override ``forward``) are left unchanged.
    """
    target = _CONVERSIONS.get(type(module))
    if target is not None:
        return target.from_conv(module, with_r=with_r, coord_kernel_size=coord_kernel_size, backend=backend)
    for name, child in module.named_children():
        new = convert_to_coordconv(child, with_r, coord_kernel_size, backend)
        if new is not child:
            setattr(module, name, new)
    return module


def fuse_conv_bn_eval(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of the CoordConv layer ``conv`` that computes ``bn(conv(x))`` in inference mode.

    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` accepts a CoordConv layer (it is an ``nn.Conv2d``)
    but scales ``weight`` and ``bias`` only, so the coordinate term of its result is not
    normalised: a wrong output without an error. Here ``coord_weight`` is scaled by the same
    per-channel factor ``bn.weight / sqrt(bn.running_var + bn.eps)`` (the output channels are
    ``coord_weight``'s dim 0, or dim 1 for a transposed layer, as for ``weight``).
    """
    if not isinstance(conv, _CoordMixin):
        raise TypeError(f"fuse_conv_bn_eval expects a CoordConv layer, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fuse_conv_bn_eval expects a batch norm layer, got {type(bn).__name__}")
    if conv.training or bn.training:
        raise ValueError(
            "fuse_conv_bn_eval: both layers must be in eval mode (a training batch norm uses batch statistics)"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fuse_conv_bn_eval: the batch norm keeps no running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fuse_conv_bn_eval: the batch norm has {bn.num_features} features, "
            f"the layer {conv.out_channels} output channels"
        )
    transposed = isinstance(conv, _CoordConvTransposeNd)
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shape = [1] * conv.coord_weight.dim()
        shape[1 if transposed else 0] = -1
        fused.coord_weight = nn.Parameter(conv.coord_weight * scale.to(conv.coord_weight.dtype).reshape(shape))
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, transposed
    )
    return fused
