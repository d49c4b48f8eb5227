"""coordconv-fused: CoordConv layers at the cost of a plain convolution.

The coordinate channels of CoordConv (Liu et al., NeurIPS 2018) are never materialised: every
backend computes ``conv(x, weight) + conv(coords, coord_weight)`` with the coordinate term built
once per call, independently of the batch. See ``docs/semantics.md`` for the exact contract.
"""

from .backends import available_backends
from .convert import convert_to_coordconv, fuse_conv_bn_eval
from .coords import coord_channels
from .functional import (
    coord_conv1d,
    coord_conv2d,
    coord_conv3d,
    coord_conv_transpose1d,
    coord_conv_transpose2d,
    coord_conv_transpose3d,
)
from .modules import (
    AddCoords,
    CoordConv1d,
    CoordConv2d,
    CoordConv3d,
    CoordConvTranspose1d,
    CoordConvTranspose2d,
    CoordConvTranspose3d,
)

__version__ = "0.1.0"

__all__ = [
    "AddCoords",
    "CoordConv1d",
    "CoordConv2d",
    "CoordConv3d",
    "CoordConvTranspose1d",
    "CoordConvTranspose2d",
    "CoordConvTranspose3d",
    "available_backends",
    "convert_to_coordconv",
    "coord_channels",
    "coord_conv1d",
    "coord_conv2d",
    "coord_conv3d",
    "coord_conv_transpose1d",
    "coord_conv_transpose2d",
    "coord_conv_transpose3d",
    "fuse_conv_bn_eval",
]
