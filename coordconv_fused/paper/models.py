"""The paper's models (supplement S1–S3), built on this library's layers.

Coordinate classification, CoordConv (7,553 parameters): the coordinates (i, j) tiled to a
64x64x2 map -> CoordConv 3x3, 32 -> six 1x1 convolutions of 32 with ReLU -> 1x1 to one logit per
pixel. Baseline: a deconvolution stack from the 1x1 coordinate vector up to 64x64 (filter size 2,
channel multiplier c = 1: 45,953 parameters, the small end of the paper's 50k–1.6M sweep).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..modules import CoordConv2d
from .data import CANVAS


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class CoordConvClassifier(nn.Module):
    """Coordinates -> 64x64 logits with one CoordConv layer first (7,553 parameters)."""

    def __init__(self, width: int = 32, depth: int = 6, backend: str = "auto") -> None:
        super().__init__()
        layers: list[nn.Module] = [CoordConv2d(2, width, 3, padding=1, backend=backend), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 1), nn.ReLU()]
        layers.append(nn.Conv2d(width, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        tiled = coords[:, :, None, None].expand(-1, -1, CANVAS, CANVAS)
        return self.net(tiled.contiguous(memory_format=torch.channels_last)).flatten(1)


class DeconvClassifier(nn.Module):
    """Coordinates -> 64x64 logits by transposed convolutions (the paper's baseline)."""

    def __init__(self, c: int = 1, fs: int = 2) -> None:
        super().__init__()
        widths = [2, 64 * c, 64 * c, 64 * c, 32 * c, 32 * c, 1]  # 1 -> 2 -> 4 -> ... -> 64
        layers: list[nn.Module] = []
        for k, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose2d(cin, cout, fs, stride=2, padding=(fs - 2) // 2,
                                             output_padding=fs % 2))
            if k < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        return self.net(coords[:, :, None, None]).flatten(1)


class CoordConvRegressor(nn.Module):
    """One-hot image -> (i, j): CoordConv 1x1, 8 - 1x1, 8 - 1x1, 8 - 3x3, 8 - 3x3, 2 - global max
    pooling, no activations (Table S1; 906 parameters)."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.net = nn.Sequential(
            CoordConv2d(1, 8, 1, backend=backend), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1),
            nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image).amax(dim=(2, 3))


class ConvRegressor(nn.Module):
    """The paper's convolutional regression baselines (Table S1): for the uniform split conv 3x3 and
    2x2 max-pooling stages, then FC 64 - FC 2; for the quadrant split strided convolutions with
    batch norm into global pooling."""

    def __init__(self, split: str) -> None:
        super().__init__()
        r = nn.ReLU
        if split == "uniform":
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), r(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), r(),
                nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), r(), nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1), r(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64), r(),
                nn.Linear(64, 2))
        else:
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 5, stride=2, padding=2), r(), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), r(),
                nn.Conv2d(16, 16, 3, padding=1), r(), nn.Conv2d(16, 16, 3, stride=2, padding=1), r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1), r(), nn.Conv2d(16, 16, 1), r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1), r(), nn.Conv2d(16, 2, 3, padding=1),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)
