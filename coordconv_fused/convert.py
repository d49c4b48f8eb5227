"""Model conversion: turn the plain convolutions of an existing model into CoordConv layers."""

from __future__ import annotations

import torch.nn as nn

from .modules import CoordConv1d, CoordConv2d, CoordConv3d

__all__ = ["convert_to_coordconv"]

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
