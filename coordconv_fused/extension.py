"""Deprecated import path: use :mod:`coordconv_fused.backends.native`."""

import warnings

from .backends.native import *  # noqa: F403
from .backends.native import __all__  # noqa: F401

warnings.warn(
    "coordconv_fused.extension moved to coordconv_fused.backends.native",
    DeprecationWarning,
    stacklevel=2,
)
