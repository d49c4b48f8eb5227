"""Object detection on scattered MNIST (supplement S6, Table S3), at the scale of a 2-core CPU.

A Faster R-CNN region proposal network without the classification stage: a small convolutional
backbone (stride 4), and a proposal head -- a 3x3 convolution, then per position A = 9 objectness
logits and 9 box deltas -- whose 3x3 convolution is a :class:`~coordconv_fused.CoordConv2d` in the
CoordConv model (coordinates added in the proposal network, as in the paper's Figure S6) and an
``nn.Conv2d`` in the baseline; nothing else differs. Anchors are the paper's nine, (15, 15) ...
(25, 15); training samples p_size = n_size = 6 anchors per image (positive: IoU >= 0.7 with a digit
or a digit's best anchor; negative: IoU < 0.3); the loss is the box loss (smooth L1 on the deltas of
the positive anchors) plus the score loss (binary cross-entropy of the sampled anchors); at test
time the proposals are non-maximum suppressed at IoU 0.8 and the best 10 kept. torchvision provides
the box coder, the matcher, the sampler and the NMS.

Metrics (Table S3), all on the test canvases: the box and score losses (training-mode sampling with a
fixed random stream); *train IoU*, the mean IoU between the boxes predicted at the sampled positive
anchors and their digits; *test IoU-average*, the mean IoU over all (proposal, digit) pairs of the
10 proposals and 5 digits of a canvas (our reading of "average IOU between 10 selected boxes and
ground truth": a proposal overlaps one digit at most, so this is about a fifth of its best IoU,
which matches the paper's 0.15-0.19 beside its 0.50-0.64 IoU-select); *test IoU-select*, the IoU
of the best-scored proposal with its closest digit. Also reported: each proposal's best IoU,
averaged, and the recall of digits at IoU 0.5 by the 10 proposals.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..modules import CoordConv2d
from .scattered_mnist import CANVAS, ScatteredMnist, make_dataset

# The paper's anchors, (w, h) in pixels.
ANCHOR_SIZES = ((15, 15), (20, 20), (25, 25), (15, 20), (20, 25), (20, 15), (25, 20), (15, 25), (25, 15))
STRIDE = 4
SAMPLES_PER_IMAGE = 12  # p_size = n_size = 6
FG_IOU, BG_IOU = 0.7, 0.3
NMS_IOU, KEEP = 0.8, 10
PRE_NMS = 200

# Table S3 of the paper (test set; 9,000 training canvases, a Faster R-CNN backbone).
PAPER = {
    "box_loss": (0.1003, 0.0854),
    "score_loss": (0.5270, 0.2526),
    "total_loss": (0.6271, 0.3383),
    "train_iou": (0.6388, 0.6612),
    "iou_average": (0.1508, 0.1868),
    "iou_select": (0.4965, 0.6359),
}
METRIC_NAMES = {
    "box_loss": "box loss",
    "score_loss": "score loss",
    "total_loss": "total loss",
    "train_iou": "train IoU",
    "iou_average": "test IoU-average",
    "iou_select": "test IoU-select",
    "best_iou": "mean best IoU of the 10 proposals",
    "recall50": "digits found (IoU >= 0.5)",
}


@dataclasses.dataclass
class DetectionConfig:
    model: str = "coordconv"  # or "conv"
    seed: int = 0
    data_seed: int = 0
    n_train: int = 1500
    n_test: int = 500
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3
    width: int = 64
    quick: bool = False  # a smoke run: a few steps on a few canvases

    def sizes(self) -> tuple[int, int, int]:
        """(training canvases, test canvases, epochs)."""
        return (64, 32, 1) if self.quick else (self.n_train, self.n_test, self.epochs)


class ProposalNetwork(nn.Module):
    """Backbone (1 -> 32 -> 64 (s2) -> 64 -> 64 (s2), 3x3 convolutions with ReLU; a 16x16 feature map
    for a 64x64 canvas) and the proposal head (3x3 convolution, CoordConv in the CoordConv model,
    then 1x1 convolutions to 9 objectness logits and 9x4 box deltas per position)."""

    def __init__(self, coordconv: bool, width: int = 64) -> None:
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            nn.Conv2d(1, w // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = CoordConv2d(w, w, 3, padding=1) if coordconv else nn.Conv2d(w, w, 3, padding=1)
        a = len(ANCHOR_SIZES)
        self.score = nn.Conv2d(w, a, 1)
        self.delta = nn.Conv2d(w, 4 * a, 1)
        for layer in (self.score, self.delta):  # Faster R-CNN's head initialisation
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(cast(Tensor, layer.bias))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(objectness logits [N, P], box deltas [N, P, 4]) for the P = H * W * A anchors of
        :func:`anchors`, in the same order."""
        f = F.relu(self.head(self.backbone(images)))
        n = len(images)
        scores = self.score(f).permute(0, 2, 3, 1).reshape(n, -1)
        deltas = self.delta(f).permute(0, 2, 3, 1).reshape(n, -1, 4)
        return scores, deltas


def anchors(height: int = CANVAS // STRIDE, width: int = CANVAS // STRIDE) -> Tensor:
    """[H * W * A, 4] anchor boxes (x1, y1, x2, y2), centred on the feature map's cells, position-major."""
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) * STRIDE, (torch.arange(width) + 0.5) * STRIDE, indexing="ij")
    centre = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
    half = torch.tensor([[-w / 2, -h / 2, w / 2, h / 2] for w, h in ANCHOR_SIZES])
    return (centre + half).reshape(-1, 4)


class _Rpn:
    """Target assignment, sampling and decoding (torchvision's detection utilities)."""

    def __init__(self) -> None:
        from torchvision.models.detection import _utils as det_utils

        self.anchors = anchors()
        self.coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = det_utils.Matcher(FG_IOU, BG_IOU, allow_low_quality_matches=True)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(SAMPLES_PER_IMAGE, 0.5)

    def targets(self, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor of each image: label (1 positive, 0 negative, -1 ignored) and matched digit index."""
        from torchvision.ops import box_iou

        labels, matched = [], []
        for b in boxes:
            idx = self.matcher(box_iou(b, self.anchors))
            lab = (idx >= 0).float()
            lab[idx == self.matcher.BELOW_LOW_THRESHOLD] = 0.0
            lab[idx == self.matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
            matched.append(idx.clamp(min=0))
        return torch.stack(labels), torch.stack(matched)

    def losses(self, scores: Tensor, deltas: Tensor, boxes: Tensor) -> dict[str, Tensor]:
        """Box loss, score loss (torchvision's RPN definitions) and the mean IoU of the boxes
        predicted at the sampled positive anchors with their digits."""
        from torchvision.ops import box_iou

        labels, matched = self.targets(boxes)
        pos, neg = self.sampler(list(labels))
        pos_mask, neg_mask = torch.stack(pos).bool(), torch.stack(neg).bool()
        sampled = pos_mask | neg_mask
        gt = boxes.gather(1, matched[..., None].expand(-1, -1, 4))  # [N, P, 4]
        anchors_ = self.anchors.expand(len(boxes), -1, -1)
        target_deltas = self.coder.encode_single(gt[pos_mask], anchors_[pos_mask])
        box_loss = F.smooth_l1_loss(deltas[pos_mask], target_deltas, beta=1 / 9, reduction="sum") / sampled.sum()
        score_loss = F.binary_cross_entropy_with_logits(scores[sampled], labels[sampled])
        with torch.no_grad():
            pred = self.coder.decode_single(deltas[pos_mask].detach(), anchors_[pos_mask])
            iou = box_iou(pred, gt[pos_mask]).diagonal()
        return {"box_loss": box_loss, "score_loss": score_loss, "train_iou": iou.mean()}

    @torch.no_grad()
    def proposals(self, scores: Tensor, deltas: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the ``KEEP`` best boxes after NMS at ``NMS_IOU`` (clipped to the canvas), and their scores."""
        from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

        boxes_out, scores_out = [], []
        for s, d in zip(scores, deltas):
            top = s.topk(min(PRE_NMS, len(s))).indices
            boxes = clip_boxes_to_image(self.coder.decode_single(d[top], self.anchors[top]), (CANVAS, CANVAS))
            s_top = s[top]
            keep = remove_small_boxes(boxes, 1.0)
            boxes, s_top = boxes[keep], s_top[keep]
            keep = nms(boxes, s_top, NMS_IOU)[:KEEP]
            boxes_out.append(boxes[keep])
            scores_out.append(s_top[keep])
        return boxes_out, scores_out


@torch.no_grad()
def evaluate(model: nn.Module, rpn: _Rpn, data: ScatteredMnist, batch: int = 100) -> dict[str, float]:
    """Table S3's metrics (and two more, see the module docstring) on ``data``."""
    from torchvision.ops import box_iou

    model.eval()
    sums: dict[str, float] = {}
    n_batches = 0
    pair_ious, best_ious, select_ious, found = [], [], [], []
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the anchor sampling of the loss metrics, the same for every model
        for k in range(0, len(data), batch):
            images, boxes = data.images[k : k + batch], data.boxes[k : k + batch]
            scores, deltas = model(images)
            for name, v in rpn.losses(scores, deltas, boxes).items():
                sums[name] = sums.get(name, 0.0) + float(v)
            n_batches += 1
            props, _ = rpn.proposals(scores, deltas)
            for p, gt in zip(props, boxes):
                iou = box_iou(p, gt)  # [proposals, digits], best-scored proposal first
                pair_ious.append(iou.mean())
                best_ious.append(iou.amax(1).mean())
                select_ious.append(iou[0].max())
                found.append((iou.amax(0) >= 0.5).float().mean())
    out = {name: v / n_batches for name, v in sums.items()}
    out["total_loss"] = out["box_loss"] + out["score_loss"]
    out["iou_average"] = float(torch.stack(pair_ious).mean())
    out["iou_select"] = float(torch.stack(select_ious).mean())
    out["best_iou"] = float(torch.stack(best_ious).mean())
    out["recall50"] = float(torch.stack(found).mean())
    return out


def run(cfg: DetectionConfig, progress: Callable | None = None, data=None) -> dict:
    """Train one proposal network; returns the test metrics, the learning curve and the timings.

    ``progress(message, total=None)``: called once with the number of steps (``total``), after every
    step (``message=None``) and after every epoch. ``data``: (train, test) canvases, else generated.
    """
    n_train, n_test, epochs = cfg.sizes()
    train, test = data if data is not None else make_dataset(n_train, n_test, cfg.data_seed)
    torch.manual_seed(cfg.seed)
    model = ProposalNetwork(cfg.model == "coordconv", cfg.width)
    rpn = _Rpn()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    if progress:
        progress(None, total=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    curves = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        running = 0.0
        for k in range(0, len(perm), cfg.batch_size):
            b = perm[k : k + cfg.batch_size]
            scores, deltas = model(train.images[b])
            losses = rpn.losses(scores, deltas, train.boxes[b])
            loss = losses["box_loss"] + losses["score_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(b)
            if progress:
                progress(None)
        metrics = evaluate(model, rpn, test)
        curves.append(
            {
                "epoch": epoch,
                "seconds": time.perf_counter() - start,
                "train_loss": running / len(train),
                "test": metrics,
            }
        )
        if progress:
            progress(
                f"epoch {epoch}: train loss {running / len(train):.3f}, test loss {metrics['total_loss']:.3f}, "
                f"IoU-select {metrics['iou_select']:.3f}"
            )
    return {
        "config": dataclasses.asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "train_canvases": len(train),
        "test_canvases": len(test),
        "seconds": curves[-1]["seconds"],
        "test": curves[-1]["test"],
        "curves": curves,
        "_model": model,
        "_test": test,
    }


def summary(results: list[dict]) -> dict:
    """Per model: mean and spread (min, max) of every metric over the seeds, and the seconds per run."""
    out: dict = {}
    for model in ("conv", "coordconv"):
        rs = [r for r in results if r["config"]["model"] == model]
        if not rs:
            continue
        out[model] = {
            name: {
                "mean": sum(r["test"][name] for r in rs) / len(rs),
                "min": min(r["test"][name] for r in rs),
                "max": max(r["test"][name] for r in rs),
            }
            for name in METRIC_NAMES
        }
        out[model]["seeds"] = [r["config"]["seed"] for r in rs]
        out[model]["seconds"] = [r["seconds"] for r in rs]
        out[model]["params"] = rs[0]["params"]
    return out


def markdown_table(results: list[dict]) -> str:
    """Table S3 beside ours: mean (min–max) over the seeds, and the relative change."""
    s = summary(results)
    conv, coord = s.get("conv"), s.get("coordconv")
    seeds = len((coord or conv or {"seeds": []})["seeds"])
    lines = [
        f"| metric (test canvases) | paper: conv | paper: CoordConv | conv ({seeds} seeds) | CoordConv ({seeds} seeds) "
        "| change, paper | change, here |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lower_is_better = {"box_loss", "score_loss", "total_loss"}

    def cell(m, name):
        if m is None:
            return ""
        v = m[name]
        return f"{v['mean']:.4f} ({v['min']:.4f}–{v['max']:.4f})"

    def change(a, b, name):
        if not a or not b:
            return ""
        return f"{100 * (b - a) / abs(a):+.1f}%" + (" (lower is better)" if name in lower_is_better else "")

    for name, label in METRIC_NAMES.items():
        paper = PAPER.get(name)
        here = change(conv[name]["mean"], coord[name]["mean"], name) if conv and coord else ""
        lines.append(
            f"| {label} | {paper[0] if paper else '–'} | {paper[1] if paper else '–'} | {cell(conv, name)} | "
            f"{cell(coord, name)} | {change(*paper, name) if paper else '–'} | {here} |"
        )
    if conv and coord:
        lines.append(
            f"| parameters | | | {conv['params']:,} | {coord['params']:,} | | |\n"
            f"| seconds per run | | | {min(conv['seconds']):.0f}–{max(conv['seconds']):.0f} | "
            f"{min(coord['seconds']):.0f}–{max(coord['seconds']):.0f} | | |"
        )
    return "\n".join(lines)


def figure(results: list[dict], path: str, canvases: int = 4) -> str:
    """The first test canvases with each model's 10 proposals (the best-scored one thick) and the
    digits' boxes, for the first seed of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts: dict[str, dict] = {}
    for r in results:
        firsts.setdefault(r["config"]["model"], r)
    models = [m for m in ("conv", "coordconv") if m in firsts]
    fig, axes = plt.subplots(len(models), canvases, figsize=(3 * canvases, 3.5 * len(models)), squeeze=False)
    rpn = _Rpn()
    for row, name in enumerate(models):
        r = firsts[name]
        model, test = r["_model"], r["_test"]
        model.eval()
        with torch.no_grad():
            scores, deltas = model(test.images[:canvases])
            props, _ = rpn.proposals(scores, deltas)
        for col in range(canvases):
            ax = axes[row][col]
            ax.imshow(test.images[col, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            for x1, y1, x2, y2 in test.boxes[col].tolist():
                ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="tab:green", lw=1.5))
            for k, (x1, y1, x2, y2) in enumerate(props[col].tolist()):
                ax.add_patch(
                    plt.Rectangle(
                        (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="tab:red", lw=2.2 if k == 0 else 0.7
                    )
                )
            ax.set_xticks([])
            ax.set_yticks([])
            label = "CoordConv" if name == "coordconv" else "conv"
            ax.set_title(f"{label} (seed {r['config']['seed']}), test canvas {col}", fontsize=8)
    fig.suptitle(
        "Proposals on test canvases: green = digit boxes, red = the 10 proposals after NMS (thick: best score)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
