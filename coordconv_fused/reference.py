"""Deprecated import path: use :mod:`coordconv_fused.backends.reference`."""

import warnings

from .backends.reference import *  # noqa: F403
from .backends.reference import __all__  # noqa: F401

warnings.warn(
    "coordconv_fused.reference moved to coordconv_fused.backends.reference",
    DeprecationWarning,
    stacklevel=2,
)
