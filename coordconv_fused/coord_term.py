"""Deprecated import path: use :mod:`coordconv_fused.ops.aten`."""

import warnings

from .ops.aten import *  # noqa: F403
from .ops.aten import __all__  # noqa: F401

warnings.warn(
    "coordconv_fused.coord_term moved to coordconv_fused.ops.aten",
    DeprecationWarning,
    stacklevel=2,
)
