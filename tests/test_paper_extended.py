"""The paper's detection (S6) and generative (S7) experiments: data exactly as documented, the models
built on our layer, the box and entropy arithmetic checked on inputs whose answer is known, and a
smoke run of the CLI (`--quick`: the plumbing, not the result)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from coordconv_fused import CoordConv2d
from coordconv_fused.paper import detection, generative, scattered_mnist, shapes


@pytest.fixture(scope="module")
def canvases():
    return scattered_mnist.make_dataset(24, 8, seed=0)


def test_digit_pools_are_disjoint_and_balanced():
    digits, labels = scattered_mnist.load_digits()
    assert digits.shape == (5000, 28, 28) and 0.0 <= float(digits.min()) and float(digits.max()) <= 1.0
    train, test = scattered_mnist.split_digits(labels)
    assert not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == 5000
    assert torch.equal(torch.bincount(labels[test]), torch.full((10,), 100))


def test_scattered_mnist_canvases(canvases):
    train, test = canvases
    assert train.images.shape == (24, 1, 64, 64) and test.boxes.shape == (8, 5, 4)
    for data in canvases:
        b = data.boxes
        assert float(b.min()) >= 0 and float(b.max()) <= 64
        assert bool((b[..., 2] > b[..., 0]).all() and (b[..., 3] > b[..., 1]).all())
        for m in range(len(data)):  # every box holds ink, and all ink lies in some box
            ink = data.images[m, 0] > 0.5 * float(data.images[m, 0].max())
            covered = torch.zeros_like(ink)
            for x1, y1, x2, y2 in b[m].long().tolist():
                assert bool(data.images[m, 0, y1:y2, x1:x2].max() > 0)
                covered[y1:y2, x1:x2] = True
            assert bool((covered | ~ink).all())
    again = scattered_mnist.make_dataset(24, 8, seed=0)[0]
    assert torch.equal(again.images, train.images)  # deterministic


def test_anchors_are_the_papers_nine_per_position():
    a = detection.anchors()
    assert a.shape == (16 * 16 * 9, 4)
    wh = (a[:9, 2:] - a[:9, :2]).tolist()
    assert [tuple(int(v) for v in x) for x in wh] == list(detection.ANCHOR_SIZES)
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert torch.equal(centres[9 * 17], torch.tensor([6.0, 6.0]))  # position (row 1, column 1), stride 4


def test_proposal_networks_differ_only_in_the_head():
    conv, coord = detection.ProposalNetwork(False), detection.ProposalNetwork(True)
    assert isinstance(coord.head, CoordConv2d) and not isinstance(conv.head, CoordConv2d)
    assert sum(p.numel() for p in coord.parameters()) - sum(p.numel() for p in conv.parameters()) == 64 * 2 * 9
    scores, deltas = coord(torch.zeros(2, 1, 64, 64))
    assert scores.shape == (2, 16 * 16 * 9) and deltas.shape == (2, 16 * 16 * 9, 4)


def test_proposals_and_metrics_on_a_perfect_prediction(canvases):
    """Scores and deltas that encode the digits at their best anchors: the proposals are the digit
    boxes, so IoU-select is 1, every digit is found, and the pairwise mean is the share of pairs that
    are the same digit (1/5 when no two digits overlap)."""
    from torchvision.ops import box_iou

    _, test = canvases
    rpn = detection._Rpn()
    n, p = len(test), len(rpn.anchors)
    scores = torch.full((n, p), -10.0)
    deltas = torch.zeros(n, p, 4)
    for m in range(n):
        best = box_iou(test.boxes[m], rpn.anchors).argmax(1)
        deltas[m, best] = rpn.coder.encode_single(test.boxes[m], rpn.anchors[best])
        scores[m, best] = torch.linspace(10, 5, len(best))
    boxes, _ = rpn.proposals(scores, deltas)
    for m in range(n):
        ious = box_iou(boxes[m][:5], test.boxes[m])
        assert float(ious.amax(0).min()) > 0.999, "a digit box was not proposed"

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return scores[: len(images)], deltas[: len(images)]

    metrics = detection.evaluate(Fixed(), rpn, test, batch=len(test))
    assert metrics["iou_select"] > 0.999 and metrics["recall50"] == 1.0
    assert metrics["best_iou"] < 1.0  # the proposals past the five digits are anchors with score -10
    assert 0.1 < metrics["iou_average"] < 0.2


def test_coloured_shapes_and_centres():
    images, centres = shapes.make_shapes(500, seed=0)
    assert images.shape == (500, 3, 32, 32) and float(images.min()) == 0.0 and float(images.max()) == 1.0
    found, present = shapes.object_centres(images)
    assert bool(present.all())
    assert float((found - centres).abs().max()) <= 0.5  # the pixel grid's rounding
    gap = (centres[:, 0] - centres[:, 1]).abs().amax(1)
    assert float(gap.min()) >= shapes.OBJECT + 1  # never overlapping
    white = torch.ones(4, 3, 32, 32)
    _, present = shapes.object_centres(white)
    assert not bool(present.any())


def test_entropies_of_known_histograms():
    assert shapes._entropy(torch.ones(8, 8)) == pytest.approx(6.0)
    assert shapes._entropy(torch.tensor([5.0, 0.0, 0.0])) == 0.0
    # one image, both objects in fixed places: both entropies 0 (one coverage bin each for two objects -> 1 bit)
    img, _ = shapes.make_shapes(1, seed=3)
    e = shapes.entropies(img.expand(10, -1, -1, -1))
    assert e["relative_entropy"] == 0.0 and e["coverage_entropy"] in (0.0, pytest.approx(1.0))
    data = shapes.entropies(shapes.make_shapes(2000, seed=1)[0])
    assert 5.0 < data["coverage_entropy"] <= 6.0 and 5.0 < data["relative_entropy"] <= 8.0


def test_generative_models_use_our_layer():
    g, d = generative.make_gan(True)
    assert isinstance(g.net[0], CoordConv2d) and isinstance(d.net[0], CoordConv2d)
    assert g(torch.zeros(2, generative.Z_GAN)).shape == (2, 3, 32, 32) and d(torch.zeros(2, 3, 32, 32)).shape == (2, 1)
    g, d = generative.make_gan(False)
    assert not any(isinstance(m, CoordConv2d) for m in [*g.modules(), *d.modules()])
    assert g(torch.zeros(2, generative.Z_GAN)).shape == (2, 3, 32, 32)
    for coord in (False, True):
        vae = generative.Vae(coord)
        logits, mean, logvar = vae(torch.rand(3, 3, 32, 32))
        assert logits.shape == (3, 3, 32, 32) and mean.shape == logvar.shape == (3, generative.Z_VAE)
        assert isinstance(vae.decoder.net[0], CoordConv2d) == coord


def test_paper_extended_cli_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "coordconv_fused.cli", "paper", "extended", "--quick", "--seeds", "0"]
        + ["--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    assert "| test IoU-select | 0.4965 | 0.6359 |" in proc.stdout
    assert "| GAN, CoordConv | 1 |" in proc.stdout and "| VAE, conv | 1 |" in proc.stdout
    for task, n_figures in (("detection", 1), ("shapes-gan", 3), ("shapes-vae", 3)):
        out = json.loads((tmp_path / task / "results.json").read_text())
        assert {r["config"]["model"] for r in out["runs"]} == {"conv", "coordconv"}
        assert len(out["figures"]) == n_figures
        for fig in out["figures"]:
            assert os.path.getsize(fig) > 5_000
        for r in out["runs"]:
            if task == "detection":
                assert 0.0 <= r["test"]["iou_select"] <= 1.0 and math.isfinite(r["test"]["total_loss"])
            else:
                assert 0.0 <= r["samples"]["both_objects"] <= 1.0
