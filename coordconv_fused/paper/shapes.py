"""Coloured shapes for the generative experiments (supplement S7.1), generated in memory, and the
measures of Figure 7 / Figure S10: where the objects' centres fall, and where the red object lies
relative to the blue one, each reduced to an entropy.

A canvas is white with one red and one blue object, each a circle or a square (chosen at random),
placed at random without overlapping (Sort-of-Clevr's mechanism, two objects). Images are
[N, 3, S, S] in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CANVAS = 32
OBJECT = 6  # side of a square, diameter of a circle, in pixels
COVERAGE_BIN = 4  # pixels per bin of the centre-coverage histogram (8 x 8 bins on 32 x 32)
RELATIVE_BIN = 4  # pixels per bin of the red-minus-blue offset histogram (16 x 16 bins)
RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def make_shapes(count: int, seed: int = 0, canvas: int = CANVAS, size: int = OBJECT) -> tuple[Tensor, Tensor]:
    """``count`` canvases and their object centres [count, 2 (red, blue), 2 (row, column)] in pixels.

    Objects lie fully inside the canvas; the second is redrawn until its square footprint (with a
    one-pixel gap) does not meet the first's."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = size / 2, canvas - size / 2  # centres keep the object inside
    centres = lo + torch.rand(count, 2, 2, generator=g) * (hi - lo)
    while True:  # rejection sampling of the blue object's position
        clash = (centres[:, 0] - centres[:, 1]).abs().amax(1) < size + 1
        if not clash.any():
            break
        centres[clash, 1] = lo + torch.rand(int(clash.sum()), 2, generator=g) * (hi - lo)
    circle = torch.rand(count, 2, generator=g) < 0.5
    ys = torch.arange(canvas).view(1, canvas, 1) + 0.5
    xs = torch.arange(canvas).view(1, 1, canvas) + 0.5
    images = torch.ones(count, 3, canvas, canvas)
    for k, colour in enumerate((RED, BLUE)):
        dy = ys - centres[:, k, 0].view(-1, 1, 1)
        dx = xs - centres[:, k, 1].view(-1, 1, 1)
        in_square = (dy.abs() < size / 2) & (dx.abs() < size / 2)
        in_circle = dy**2 + dx**2 < (size / 2) ** 2
        mask = torch.where(circle[:, k].view(-1, 1, 1), in_circle, in_square)  # [count, S, S]
        for c in range(3):
            images[:, c][mask] = colour[c]
    return images, centres


def object_centres(images: Tensor) -> tuple[Tensor, Tensor]:
    """Centres [N, 2 (red, blue), 2 (row, column)] of the red and the blue pixels of images in
    [0, 1], and a mask [N] of the images where both colours are present (a red pixel: red channel
    above 0.5, green and blue below; a blue pixel likewise)."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    masks = [(r > 0.5) & (g < 0.5) & (b < 0.5), (b > 0.5) & (g < 0.5) & (r < 0.5)]
    n, s = images.shape[0], images.shape[-1]
    grid = torch.arange(s, dtype=images.dtype) + 0.5
    centres = torch.zeros(n, 2, 2)
    present = torch.ones(n, dtype=torch.bool)
    for k, m in enumerate(masks):
        w = m.to(images.dtype)
        total = w.sum((1, 2))
        present &= total > 0
        centres[:, k, 0] = (w.sum(2) * grid).sum(1) / total.clamp(min=1)
        centres[:, k, 1] = (w.sum(1) * grid).sum(1) / total.clamp(min=1)
    return centres, present


def _entropy(counts: Tensor) -> float:
    p = counts.flatten() / counts.sum().clamp(min=1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def coverage_histogram(centres: Tensor, canvas: int = CANVAS) -> Tensor:
    """Counts of the objects' centres (both objects) in ``COVERAGE_BIN``-pixel bins of the canvas."""
    bins = canvas // COVERAGE_BIN
    cell = (centres.reshape(-1, 2) / COVERAGE_BIN).floor().long().clamp(0, bins - 1)
    return torch.bincount(cell[:, 0] * bins + cell[:, 1], minlength=bins * bins).view(bins, bins).float()


def relative_histogram(centres: Tensor, canvas: int = CANVAS) -> Tensor:
    """Counts of the red centre minus the blue centre in ``RELATIVE_BIN``-pixel bins of [-S, S)."""
    bins = 2 * canvas // RELATIVE_BIN
    offset = centres[:, 0] - centres[:, 1] + canvas
    cell = (offset / RELATIVE_BIN).floor().long().clamp(0, bins - 1)
    return torch.bincount(cell[:, 0] * bins + cell[:, 1], minlength=bins * bins).view(bins, bins).float()


def entropies(images: Tensor) -> dict[str, float]:
    """Figure S10's measures of a set of images: the entropy (bits) of the centre coverage and of
    the relative position, over the images where both objects are found, and that share
    (``both_objects``). The maxima are log2(64) = 6 bits and log2(256) = 8 bits."""
    centres, present = object_centres(images)
    found = centres[present]
    return {
        "coverage_entropy": _entropy(coverage_histogram(found)) if len(found) else math.nan,
        "relative_entropy": _entropy(relative_histogram(found)) if len(found) else math.nan,
        "both_objects": float(present.float().mean()),
    }
