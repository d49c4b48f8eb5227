"""Index arithmetic shared by every layer: output sizes and the op's padding vocabulary.

The op's padding arguments (see :mod:`coordconv_fused.ops`): ``padding`` is the convolution's own
symmetric zero padding; ``pre_pad`` (``[before0, after0, before1, after1, ...]``) is the part of
the padding already applied explicitly to ``input`` (for 'reflect', 'replicate', 'circular' and the
asymmetric part of 'same'), by the rule ``pre_pad_mode``. This module imports nothing of the
package: the Triton launchers and the backends use it alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["conv_output_size", "pairs", "image_sizes"]


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of a convolution along one axis (as ``nn.Conv``; may be <= 0 if too small)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
    """``[b0, a0, b1, a1, ...]`` -> ``[(b0, a0), (b1, a1), ...]``."""
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def image_sizes(input: Tensor, pre_pad: Sequence[int]) -> list[int]:
    """Spatial size of the image before the explicit padding that ``input`` already carries."""
    return [n - b - a for n, (b, a) in zip(input.shape[2:], pairs(pre_pad))]
