"""The paper's experiment: Not-so-Clevr exactly as specified, the models' sizes, and a smoke run of
the CLI (`--quick`: a few steps on a subset, checking the plumbing, not the result)."""

import json
import os
import subprocess
import sys

import torch

from coordconv_fused import CoordConv2d
from coordconv_fused.paper import train
from coordconv_fused.paper.data import make_dataset, split
from coordconv_fused.paper.models import (
    ConvRegressor,
    CoordConvClassifier,
    CoordConvRegressor,
    CoordConvRenderer,
    DeconvClassifier,
    num_parameters,
)
from coordconv_fused.paper.train import _forward, _loss, centre_margin


def test_not_so_clevr():
    d = make_dataset()
    assert len(d.centres) == 3136
    assert d.centres.min() == 4 and d.centres.max() == 59  # 56x56 grid, 4 px from each border
    assert d.onehot.sum() == 3136 and torch.equal(d.onehot.flatten(1).argmax(1), d.index)
    assert torch.all(d.squares.flatten(1).sum(1) == 81)
    k = 1234
    i, j = d.centres[k].tolist()
    assert d.squares[k, 0, i - 4 : i + 5, j - 4 : j + 5].sum() == 81
    assert d.coords[:, 0].min() == 2 * 4 / 63 - 1 and d.coords[:, 0].max() == 2 * 59 / 63 - 1


def test_splits():
    d = make_dataset()
    tr, te = split(d, "uniform")
    assert (len(tr), len(te)) == (2509, 627) and len(set(tr.tolist()) | set(te.tolist())) == 3136
    assert torch.equal(split(d, "uniform")[0], tr)  # deterministic
    tr, te = split(d, "quadrant")
    assert (len(tr), len(te)) == (2407, 729)
    assert bool(((d.centres[te] > 32).all(1)).all()) and not bool(((d.centres[tr] > 32).all(1)).any())


def test_models_use_our_layer_and_paper_sizes():
    m = CoordConvClassifier()
    assert num_parameters(m) == 7553 and isinstance(m.net[0], CoordConv2d)
    assert m(torch.zeros(2, 2)).shape == (2, 4096)
    assert DeconvClassifier()(torch.zeros(2, 2)).shape == (2, 4096)
    r = CoordConvRegressor()
    assert num_parameters(r) == 906 and isinstance(r.net[0], CoordConv2d)
    assert r(torch.zeros(2, 1, 64, 64)).shape == (2, 2)
    for s in ("uniform", "quadrant"):
        assert ConvRegressor(s)(torch.zeros(2, 1, 64, 64)).shape == (2, 2)
    g = CoordConvRenderer()
    assert num_parameters(g) == 7553 + 82 and isinstance(g.centre.net[0], CoordConv2d)
    square, centre = g.render(torch.zeros(2, 2))
    assert square.shape == centre.shape == (2, 4096)
    assert num_parameters(DeconvClassifier(c=2)) == 182_017  # the paper's rendering deconvs: 183k-1.6M


def test_classifier_starts_translation_equivariant():
    """CoordConvClassifier.init_as_offsets: the CoordConv layer's response to centre (i, j) at pixel
    (x, y) equals its response to centre (i + di, j + dj) at pixel (x + di, y + dj) -- each unit a
    function of the offset -- away from the border (whose replicated padding bends the ramps)."""
    torch.manual_seed(0)
    layer = CoordConvClassifier().net[0]
    d = make_dataset()
    a, b = d.centres.tolist().index([10, 12]), d.centres.tolist().index([45, 50])  # shift (35, 38)
    tiled = d.coords[[a, b], :, None, None].expand(-1, -1, 64, 64)
    with torch.no_grad():
        out = layer(tiled.contiguous())
    torch.testing.assert_close(out[1, :, 36:63, 39:63], out[0, :, 1:28, 1:25], rtol=0, atol=1e-5)
    assert not torch.allclose(out[0, :, 36:63, 39:63], out[0, :, 1:28, 1:25], atol=1e-3)  # not constant


def test_renderer_square_depends_only_on_the_centre_arg_max():
    """The stamp reads the centre's arg-max: sharpening or flattening the centre's softmax (scaling
    its logits) leaves the square unchanged, and the square is the stamp's 9x9 filter placed at the
    arg-max (so a right centre gives the same square anywhere on the canvas)."""
    torch.manual_seed(0)
    g = CoordConvRenderer()
    coords = make_dataset().coords[torch.tensor([0, 700, 3135])]
    with torch.no_grad():
        square, centre = g.render(coords)
        last = g.centre.net[-1]
        last.weight.mul_(0.01)
        last.bias.mul_(0.01)
        flatter, flat_centre = g.render(coords)
    assert torch.equal(flat_centre.argmax(1), centre.argmax(1))
    assert not torch.allclose(flat_centre, centre)
    assert torch.equal(flatter, square)
    weight, bias = g.stamp.weight.detach()[0, 0], g.stamp.bias.detach()
    for n, pixel in enumerate(centre.argmax(1).tolist()):
        i, j = divmod(pixel, 64)
        expected = torch.full((64 + 8, 64 + 8), float(bias))
        # conv2d is a cross-correlation: a delta comes out as the flipped filter
        expected[i : i + 9, j : j + 9] += g.PEAK * weight.flip(0, 1)
        torch.testing.assert_close(square[n].view(64, 64), expected[4:-4, 4:-4])


def test_renderer_centre_trains_exactly_as_the_classifier():
    """The renderer's centre network is the classifier, initialised from the same seed and trained by
    the same cross-entropy (the stamp's input carries no gradient): a few AdamW steps on the same
    batches leave the two networks bitwise equal. So a rendering run's centre is the classification
    run of its seed, and its arg-max accuracy that run's accuracy."""
    data = make_dataset()
    batches = torch.randperm(len(data.centres), generator=torch.Generator().manual_seed(0))[:96].view(3, 32)
    trained = {}
    for task, make in (("classification", CoordConvClassifier), ("rendering", CoordConvRenderer)):
        torch.manual_seed(7)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.5)
        for b in batches:
            loss = _loss(task, *_forward(task, model, data, b), data, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        trained[task] = model if task == "classification" else model.centre
    classifier, centre = trained["classification"].state_dict(), trained["rendering"].state_dict()
    assert classifier.keys() == centre.keys()
    for name, value in classifier.items():
        assert torch.equal(value, centre[name]), name
    assert not torch.equal(classifier["net.0.weight"], _initial_first_weight(7))  # it did train


def _initial_first_weight(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return CoordConvClassifier().net[0].weight.detach()


def test_regressor_initialisation_puts_the_max_pool_on_the_hot_pixel():
    """The property training depends on (see CoordConvRegressor.init_for_max_pool): from the first
    step, each output channel's global maximum lies next to the hot pixel, so the gradient reaches
    the image path; and the first predictions start near 0 (not at a random offset)."""
    d = make_dataset()
    idx = torch.randperm(len(d.centres), generator=torch.Generator().manual_seed(0))[:64]
    for seed in range(5):
        torch.manual_seed(seed)
        m = CoordConvRegressor()
        with torch.no_grad():
            maps = m.net(d.onehot[idx])
            where = maps.flatten(2).argmax(2)  # [N, 2]
            pred = m(d.onehot[idx])
        di = (where // 64 - d.centres[idx, :1]).abs()
        dj = (where % 64 - d.centres[idx, 1:]).abs()
        assert int(di.max()) <= 2 and int(dj.max()) <= 2, f"seed {seed}: max pool away from the hot pixel"
        assert float(pred.abs().max()) < 1e-4
        assert float(m.net[0].coord_weight.detach().abs().max()) == 0.0


def test_validation_block_is_held_out_of_training():
    from coordconv_fused.paper.train import validation_block

    d = make_dataset()
    for kind in ("uniform", "quadrant"):
        tr, te = split(d, kind)
        block = validation_block(d, tr)
        assert 100 < int(block.sum()) <= 196
        assert not set(tr[block].tolist()) & set(te.tolist())


def test_centre_margin():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 5.0, 4.5]])
    torch.testing.assert_close(centre_margin(logits, torch.tensor([1, 2])), torch.tensor([2.0, -0.5]))


def test_restarts_while_the_block_is_right_by_less_than_the_margin(monkeypatch):
    """A CoordConv classifier or renderer whose held-out block is right, but by a centre-logit
    margin under ``min_val_margin``, is restarted from a new initialisation; a regressor (no
    centre logits) only on accuracy."""
    block_margins = iter([0.5, 1.5, 0.2])
    seeds = []

    def attempt(cfg, data, fit_idx, val_idx, test_idx, seed, start, curves, n, progress=None):
        metrics = {"accuracy": 1.0, "loss": 0.0, "mean_px_error": 0.0, "max_px_error": 0.0}
        if cfg.task != "regression":
            metrics["min_centre_margin"] = next(block_margins)
        curves.append({"attempt": n, "epoch": 1, "seconds": 0.0, "train": metrics, "val": metrics, "test": metrics})
        seeds.append(seed)
        return torch.nn.Linear(1, 1), "epoch budget"

    monkeypatch.setattr(train, "_train_attempt", attempt)
    r = train.run(train.RunConfig(task="classification", seed=4))
    assert r["attempts"] == 2 and r["val"]["min_centre_margin"] == 1.5 and seeds == [4000, 4001]
    assert train.run(train.RunConfig(task="rendering", min_val_margin=0.1))["attempts"] == 1
    assert train.run(train.RunConfig(task="regression"))["attempts"] == 1


def test_paper_cli_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordconv_fused.cli",
            "paper",
            "demo",
            "--quick",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    assert "| classification | quadrant | coordconv | 7,553 |" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"]["model"] for r in results] == ["coordconv", "baseline"]
    for r in results:
        for fig in r["figures"]:
            assert os.path.getsize(fig) > 5_000


def test_paper_cli_all_tasks_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordconv_fused.cli",
            "paper",
            "all",
            "--quick",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["config"]["task"], r["config"]["split"], r["config"]["model"]) for r in results}
    assert runs == {
        (t, s, m)
        for t in ("classification", "regression", "rendering")
        for s in ("uniform", "quadrant")
        for m in ("coordconv", "baseline")
    }
    assert "| rendering | quadrant | coordconv | 7,635 |" in proc.stdout
    assert "| regression | uniform | coordconv | 906 |" in proc.stdout
    for r in results:
        assert 0.0 <= r["test"]["accuracy"] <= 1.0 and len(r["figures"]) == 2
        if r["config"]["task"] == "rendering":
            assert 0.0 <= r["test"]["iou"] <= 1.0
