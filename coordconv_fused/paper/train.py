"""Training and evaluation of the paper's tasks, with early stopping, results and figures.

Protocol (no peeking at the test set): Adam, batch 32, cosine learning-rate decay over the epoch
budget; training stops early once the model classifies every *training* example correctly and its
training loss is below ``stop_loss`` (a margin, so that the solution is sharp rather than barely
right), or when the time budget runs out. The test set is only evaluated for the learning curve
and the final report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import CANVAS, NotSoClevr, make_dataset, split
from .models import CoordConvClassifier, DeconvClassifier, num_parameters

# Reference figures (paper supplement S1-S2; an independent reproduction for the baseline).
PAPER = {
    ("classification", "coordconv"): {"uniform": "100%", "quadrant": "100%", "params": "7,553"},
    ("classification", "baseline"): {"uniform": "~80–86%", "quadrant": "~0%", "params": "50k–1.6M"},
}


@dataclasses.dataclass
class RunConfig:
    task: str = "classification"
    split: str = "quadrant"
    model: str = "coordconv"
    seed: int = 0
    lr: float | None = None  # default per model
    batch_size: int = 32
    max_epochs: int = 12
    time_limit: float = 170.0  # seconds
    stop_loss: float = 0.02
    quick: bool = False  # a smoke run: few steps, tiny budget

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-3 if self.model == "coordconv" else 1e-3)


def _make_model(cfg: RunConfig) -> nn.Module:
    if cfg.task != "classification":
        raise ValueError(f"task {cfg.task!r} is not implemented yet (only 'classification')")
    return CoordConvClassifier() if cfg.model == "coordconv" else DeconvClassifier()


@torch.no_grad()
def _evaluate(model: nn.Module, data: NotSoClevr, idx: torch.Tensor, batch: int = 256) -> dict:
    model.eval()
    correct, loss, dist = 0, 0.0, []
    for k in range(0, len(idx), batch):
        b = idx[k:k + batch]
        logits = model(data.coords[b])
        target = data.index[b]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == target).sum().item()
        pi, pj = pred // CANVAS, pred % CANVAS
        dist.append(((pi - data.centres[b, 0]).float().hypot((pj - data.centres[b, 1]).float())))
    model.train()
    d = torch.cat(dist) if dist else torch.zeros(0)
    n = max(len(idx), 1)
    return {"accuracy": correct / n, "loss": loss / n, "mean_px_error": d.mean().item() if len(d) else 0.0,
            "max_px_error": d.max().item() if len(d) else 0.0}


def run(cfg: RunConfig, progress=None) -> dict:
    """Train one model on one split; returns results (metrics, curves, timings)."""
    torch.manual_seed(cfg.seed)
    data = make_dataset()
    train_idx, test_idx = split(data, cfg.split)
    if cfg.quick:
        train_idx, test_idx = train_idx[:256], test_idx[:128]
    model = _make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.resolved_lr())
    epochs = 1 if cfg.quick else cfg.max_epochs
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    curves, start, stopped = [], time.perf_counter(), "epoch budget"
    for epoch in range(1, epochs + 1):
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for k in range(0, len(perm), cfg.batch_size):
            b = perm[k:k + cfg.batch_size]
            loss = F.cross_entropy(model(data.coords[b]), data.index[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if cfg.quick and k >= 4 * cfg.batch_size:
                break
        tr, te = _evaluate(model, data, train_idx), _evaluate(model, data, test_idx)
        elapsed = time.perf_counter() - start
        curves.append({"epoch": epoch, "seconds": elapsed, "train": tr, "test": te})
        if progress:
            progress(f"epoch {epoch}: train {100 * tr['accuracy']:.1f}% test {100 * te['accuracy']:.1f}%")
        if tr["accuracy"] == 1.0 and tr["loss"] < cfg.stop_loss:
            stopped = "training set perfect"
            break
        if elapsed > cfg.time_limit:
            stopped = "time budget"
            break
    final = curves[-1]
    return {
        "config": dataclasses.asdict(cfg), "params": num_parameters(model),
        "epochs": final["epoch"], "seconds": final["seconds"], "stopped": stopped,
        "train": final["train"], "test": final["test"], "curves": curves,
        "_model": model, "_data": data, "_split": (train_idx, test_idx),
    }


def figures(result: dict, path_prefix: str) -> list[str]:
    """Learning curves and predicted heat maps (one training and one test example)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = result["curves"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ep = [c["epoch"] for c in curves]
    ax.plot(ep, [100 * c["train"]["accuracy"] for c in curves], "o-", label="train")
    ax.plot(ep, [100 * c["test"]["accuracy"] for c in curves], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    cfg = result["config"]
    ax.set_title(f"{cfg['task']} · {cfg['split']} · {cfg['model']} (seed {cfg['seed']})", fontsize=9)
    ax.set_ylim(-2, 102)
    ax.legend()
    fig.tight_layout()
    paths.append(f"{path_prefix}-curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    model, data = result["_model"], result["_data"]
    train_idx, test_idx = result["_split"]
    picks = [("train", train_idx[len(train_idx) // 2]), ("test", test_idx[len(test_idx) // 2])]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    with torch.no_grad():
        model.eval()
        for col, (name, i) in enumerate(picks):
            logits = model(data.coords[i:i + 1]).view(CANVAS, CANVAS)
            prob = torch.softmax(logits.flatten(), 0).view(CANVAS, CANVAS)
            ci, cj = data.centres[i].tolist()
            for k, (img, title) in enumerate([(logits, "logits"), (prob, "probability")]):
                ax = axes[2 * col + k]
                ax.imshow(img.numpy(), cmap="viridis")
                ax.scatter([cj], [ci], s=40, facecolors="none", edgecolors="r")
                ax.set_title(f"{name} example ({ci},{cj}): {title}", fontsize=8)
                ax.axis("off")
    fig.tight_layout()
    paths.append(f"{path_prefix}-predictions.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def public(result: dict) -> dict:
    """The JSON-serialisable part of a result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def markdown_table(results: list[dict]) -> str:
    lines = ["| task | split | model | params | seed | test accuracy | train accuracy | mean / max px error (test) "
             "| epochs | time | stopped | paper |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        c = r["config"]
        paper = PAPER.get((c["task"], c["model"]), {})
        lines.append(
            f"| {c['task']} | {c['split']} | {c['model']} | {r['params']:,} | {c['seed']} | "
            f"{100 * r['test']['accuracy']:.1f}% | {100 * r['train']['accuracy']:.1f}% | "
            f"{r['test']['mean_px_error']:.2f} / {r['test']['max_px_error']:.1f} | {r['epochs']} | "
            f"{r['seconds']:.0f} s | {r['stopped']} | {paper.get(c['split'], '')} ({paper.get('params', '')} params) |")
    return "\n".join(lines)


def save(results: list[dict], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump([public(r) for r in results], f, indent=1)
    return path
