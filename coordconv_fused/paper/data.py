"""Not-so-Clevr, generated in memory: 3,136 centres on a 56x56 grid placed 4 pixels from each border
of a 64x64 canvas; one-hot pixel images, 9x9 squares, and the two splits of the paper."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

CANVAS = 64
BORDER = 4
GRID = CANVAS - 2 * BORDER  # 56
SQUARE = 9


@dataclasses.dataclass
class NotSoClevr:
    """All 3,136 examples: ``centres`` [M, 2] (row i, column j, pixel indices), ``coords`` the centres
    scaled to [-1, 1] exactly as the coordinate channels scale pixel indices (2*c/63 - 1), ``onehot``
    [M, 1, 64, 64] images with the centre pixel set, ``squares`` [M, 1, 64, 64] 9x9 squares."""

    centres: Tensor
    coords: Tensor
    onehot: Tensor
    squares: Tensor

    @property
    def index(self) -> Tensor:
        """Flat pixel index of each centre (the classification target)."""
        return self.centres[:, 0] * CANVAS + self.centres[:, 1]


def make_dataset() -> NotSoClevr:
    ij = torch.arange(BORDER, BORDER + GRID)
    centres = torch.cartesian_prod(ij, ij)  # [3136, 2], row-major over (i, j)
    coords = 2 * centres.float() / (CANVAS - 1) - 1
    onehot = torch.zeros(len(centres), 1, CANVAS, CANVAS)
    onehot[torch.arange(len(centres)), 0, centres[:, 0], centres[:, 1]] = 1.0
    squares = (F.conv2d(onehot, torch.ones(1, 1, SQUARE, SQUARE), padding=SQUARE // 2) > 0).float()
    return NotSoClevr(centres, coords, onehot, squares)


def split(data: NotSoClevr, kind: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Train and test indices. 'uniform': a random 80/20 split (fixed seed). 'quadrant': the
    centres with i > 32 and j > 32 (one quadrant, 27x27 = 729 examples) are the test set."""
    m = len(data.centres)
    if kind == "uniform":
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
        n_train = round(0.8 * m)
        return perm[:n_train].sort().values, perm[n_train:].sort().values
    if kind == "quadrant":
        test = (data.centres[:, 0] > 32) & (data.centres[:, 1] > 32)
        return (~test).nonzero().squeeze(1), test.nonzero().squeeze(1)
    raise ValueError(f"split must be 'uniform' or 'quadrant', got {kind!r}")
