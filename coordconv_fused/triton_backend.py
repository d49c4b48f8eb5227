"""Deprecated import path: use :mod:`coordconv_fused.backends.triton`."""

import warnings

from .backends.triton import *  # noqa: F403
from .backends.triton import __all__  # noqa: F401

warnings.warn(
    "coordconv_fused.triton_backend moved to coordconv_fused.backends.triton",
    DeprecationWarning,
    stacklevel=2,
)
