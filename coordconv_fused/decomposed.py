"""Deprecated import path: use :mod:`coordconv_fused.backends.aten`."""

import warnings

from .backends.aten import *  # noqa: F403
from .backends.aten import __all__  # noqa: F401

warnings.warn(
    "coordconv_fused.decomposed moved to coordconv_fused.backends.aten",
    DeprecationWarning,
    stacklevel=2,
)
