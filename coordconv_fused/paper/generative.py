"""GANs and VAEs on coloured shapes (supplement S7.1, S7.2; Figure 7, Figure S10), at the scale of a
2-core CPU: 32x32 canvases instead of 64x64, the generators' widths an eighth of Tables S4/S5 and
the discriminator's / encoder's a quarter.

Generators / decoders (Tables S4, S5):

* convolutional: a fully connected layer to 4x4x64, then three 5x5 stride-2 transposed
  convolutions (32, 16, 3) to 32x32 (the paper: 4x4x512 and four to 64x64);
* CoordConv: z tiled over the 32x32 canvas, coordinates added by a 1x1 :class:`CoordConv2d`, then
  mostly 1x1 convolutions -- GAN: 64 - 32 - 32 - 16 - 8 - 3x3 8 - 3x3 8 - 1x1 3 (the paper's
  512 - 256 - 256 - 128 - 64 - 3x3 64 - 3x3 64 - 3); VAE: 64 - 32 - 32 - 16 - 8 - 3, all 1x1.

Hidden layers of both generators have batch normalisation and ReLU (DCGAN's choice; the tables do
not say). Discriminator / encoder: 5x5 stride-2 convolutions 16 - 32 - 64 with leaky ReLU, then a
fully connected layer to 1 logit (GAN) or to the mean and log-variance of an 8-dimensional latent
(VAE); in the CoordConv models the first convolution is a CoordConv (S7.1's second variant, "both
generator and discriminator"; S7.2's "CoordConv in the encoder and decoder").

Training as in S7: GAN, Adam (beta1 0.5) at 1e-4 for the discriminator and 5e-4 for the generator,
one discriminator step then two generator steps per iteration, z uniform in [-1, 1] (dimension 64,
the paper's 256), 1,000 iterations of batch 32. VAE: Adam at 1e-3 for 10 epochs of batch 32 and the
plain ELBO (reconstruction summed over the pixel values, plus the KL term); S7.2's learning rate of
5e-3 made the loss rise after two epochs here, and its 50-fold weight on the reconstruction left the
prior's samples blank (0% with both objects, measured on this CPU) -- the paper does not say how its
two losses are reduced, and summed over 3,072 values the reconstruction already dominates the
8-dimensional KL term. Budgets are counted in iterations / epochs, so a run does not depend on the
machine's speed (a seed reproduces with the same thread count and software).
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
from .shapes import CANVAS, entropies, make_shapes

Z_GAN = 64
Z_VAE = 8


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    """5x5 stride-2 transposed convolution that doubles the size."""
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


class ConvGenerator(nn.Module):
    """z -> FC 4x4x64 -> 5x5 s2 transposed convolutions 32, 16, 3 -> 32x32."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(z_dim, 4 * 4 * 64), nn.BatchNorm1d(4 * 4 * 64), nn.ReLU())
        self.net = nn.Sequential(
            _up(64, 32), nn.BatchNorm2d(32), nn.ReLU(), _up(32, 16), nn.BatchNorm2d(16), nn.ReLU(), _up(16, 3)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(-1, 64, 4, 4))


class CoordConvGenerator(nn.Module):
    """z tiled over the canvas -> 1x1 CoordConv (coordinates added) -> 1x1 (and for the GAN two 3x3)
    convolutions -> 3 channels at every pixel."""

    def __init__(self, z_dim: int, widths: tuple[int, ...], kernels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = z_dim
        for k, (w, ks) in enumerate(zip(widths, kernels)):
            conv = CoordConv2d if k == 0 else nn.Conv2d
            layers += [conv(cin, w, ks, padding=ks // 2), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        layers.append(nn.Conv2d(cin, 3, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None].expand(-1, -1, CANVAS, CANVAS))


GAN_COORD_WIDTHS, GAN_COORD_KERNELS = (64, 32, 32, 16, 8, 8, 8), (1, 1, 1, 1, 1, 3, 3)
VAE_COORD_WIDTHS, VAE_COORD_KERNELS = (64, 32, 32, 16, 8), (1, 1, 1, 1, 1)


class Encoder(nn.Module):
    """5x5 s2 convolutions 16 - 32 - 64 with leaky ReLU, then a fully connected layer to ``out``
    values (the first convolution a CoordConv in the CoordConv models)."""

    def __init__(self, coordconv: bool, out: int) -> None:
        super().__init__()
        first = CoordConv2d if coordconv else nn.Conv2d
        a = nn.LeakyReLU(0.2)
        self.net = nn.Sequential(
            first(3, 16, 5, stride=2, padding=2),
            a,
            nn.Conv2d(16, 32, 5, stride=2, padding=2),
            a,
            nn.Conv2d(32, 64, 5, stride=2, padding=2),
            a,
            nn.Flatten(),
            nn.Linear(64 * (CANVAS // 8) ** 2, out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_gan(coordconv: bool) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator); the generator's output is tanh-ed to [-1, 1] by :func:`generate`."""
    g = CoordConvGenerator(Z_GAN, GAN_COORD_WIDTHS, GAN_COORD_KERNELS) if coordconv else ConvGenerator(Z_GAN)
    return g, Encoder(coordconv, 1)


class Vae(nn.Module):
    def __init__(self, coordconv: bool) -> None:
        super().__init__()
        self.encoder = Encoder(coordconv, 2 * Z_VAE)
        self.decoder = (
            CoordConvGenerator(Z_VAE, VAE_COORD_WIDTHS, VAE_COORD_KERNELS) if coordconv else ConvGenerator(Z_VAE)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction logits, mean, log-variance)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-10.0, 10.0)  # exp() of a wild early estimate would overflow
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return self.decoder(z), mean, logvar


@dataclasses.dataclass
class GenerativeConfig:
    kind: str = "gan"  # or "vae"
    model: str = "coordconv"  # or "conv"
    seed: int = 0
    data_seed: int = 0
    n_train: int = 5000
    iterations: int = 1000  # GAN: discriminator steps (each followed by two generator steps)
    epochs: int = 10  # VAE
    batch_size: int = 32
    samples: int = 2000  # generated images measured
    d_lr: float = 1e-4  # S7.1
    g_lr: float = 5e-4  # S7.1
    g_steps: int = 2  # S7.1: generator steps per discriminator step
    vae_lr: float = 1e-3  # S7.2: 5e-3 (here the loss rose after 2 epochs)
    recon_weight: float = 1.0  # S7.2: 50 (here prior samples were blank, see the module docstring)
    quick: bool = False

    def budget(self) -> tuple[int, int, int]:
        """(training images, GAN iterations, VAE epochs)."""
        return (256, 3, 1) if self.quick else (self.n_train, self.iterations, self.epochs)


@torch.no_grad()
def generate(result_or_model, n: int, seed: int, kind: str) -> Tensor:
    """``n`` images in [0, 1] from the prior (GAN: z uniform in [-1, 1]; VAE: standard normal)."""
    model = result_or_model["_model"] if isinstance(result_or_model, dict) else result_or_model
    g = torch.Generator().manual_seed(seed)
    model.eval()
    if kind == "gan":
        z = torch.rand(n, Z_GAN, generator=g) * 2 - 1
        return (torch.tanh(model(z)) + 1) / 2
    z = torch.randn(n, Z_VAE, generator=g)
    return torch.sigmoid(model.decoder(z))


def run(cfg: GenerativeConfig, progress: Callable | None = None, data: Tensor | None = None) -> dict:
    """Train one GAN or VAE; returns the entropies of its samples, the curve and the timings.

    ``progress(message, total=None)`` as in :func:`coordconv_fused.paper.train.run`."""
    n_train, iterations, epochs = cfg.budget()
    images = data if data is not None else make_shapes(n_train, cfg.data_seed)[0]
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    curves: list[dict] = []
    report_every = max(1, iterations // 10)
    if cfg.kind == "gan":
        gen, disc = make_gan(cfg.model == "coordconv")
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.g_lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
        real_label, fake_label = torch.ones(cfg.batch_size, 1), torch.zeros(cfg.batch_size, 1)
        if progress:
            progress(None, total=iterations)
        for it in range(1, iterations + 1):
            gen.train()
            real = images[torch.randint(len(images), (cfg.batch_size,), generator=g)] * 2 - 1
            z = torch.rand(cfg.batch_size, Z_GAN, generator=g) * 2 - 1
            fake = torch.tanh(gen(z))
            d_loss = F.binary_cross_entropy_with_logits(disc(real), real_label) + F.binary_cross_entropy_with_logits(
                disc(fake.detach()), fake_label
            )
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            for _ in range(cfg.g_steps):
                z = torch.rand(cfg.batch_size, Z_GAN, generator=g) * 2 - 1
                g_loss = F.binary_cross_entropy_with_logits(disc(torch.tanh(gen(z))), real_label)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
            if progress:
                progress(None)
            if it % report_every == 0 or it == iterations:
                curves.append(
                    {
                        "iteration": it,
                        "seconds": time.perf_counter() - start,
                        "d_loss": float(d_loss.detach()),
                        "g_loss": float(g_loss.detach()),
                    }
                )
                if progress:
                    progress(
                        f"iteration {it}: D loss {float(d_loss.detach()):.3f}, G loss {float(g_loss.detach()):.3f}"
                    )
        model: nn.Module = gen
    else:
        model = Vae(cfg.model == "coordconv")
        opt = torch.optim.Adam(model.parameters(), lr=cfg.vae_lr)
        steps = math.ceil(len(images) / cfg.batch_size)
        if progress:
            progress(None, total=epochs * steps)
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(len(images), generator=g)
            total = 0.0
            for k in range(0, len(perm), cfg.batch_size):
                x = images[perm[k : k + cfg.batch_size]]
                logits, mean, logvar = model(x)
                recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
                kl = -0.5 * (1 + logvar - mean**2 - logvar.exp()).sum() / len(x)
                loss = cfg.recon_weight * recon + kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(x)
                if progress:
                    progress(None)
            curves.append({"epoch": epoch, "seconds": time.perf_counter() - start, "loss": total / len(images)})
            if progress:
                progress(f"epoch {epoch}: loss {total / len(images):.1f} per image")
    seconds = time.perf_counter() - start
    result = {
        "config": dataclasses.asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "curves": curves,
        "_model": model,
    }
    samples = generate(result, 64 if cfg.quick else cfg.samples, seed=10_000 + cfg.seed, kind=cfg.kind)
    result["samples"] = entropies(samples)
    return result


def data_entropies(n: int, seed: int = 1) -> dict[str, float]:
    """The measures on fresh data (as many images as are generated from each model)."""
    return entropies(make_shapes(n, seed)[0])


def summary(results: list[dict], data: dict[str, float]) -> str:
    """Markdown: per kind and model, mean and range over the seeds of the entropies and of the
    share of samples with both objects, beside the data's."""
    lines = [
        "| model | seeds | parameters | centre coverage entropy (bits) | relative position entropy (bits) "
        "| samples with both objects | seconds per run |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| data | | | {data['coverage_entropy']:.2f} | {data['relative_entropy']:.2f} | "
        f"{100 * data['both_objects']:.0f}% | |",
    ]

    def stat(rs, key, scale=1.0, fmt=".2f"):
        v = [scale * r["samples"][key] for r in rs if not math.isnan(r["samples"][key])]
        if not v:
            return "– (no sample with both objects)"
        seeds = "" if len(v) == len(rs) else f", {len(v)} of {len(rs)} seeds"
        return f"{sum(v) / len(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}}{seeds})"

    for kind in ("gan", "vae"):
        for model in ("conv", "coordconv"):
            rs = [r for r in results if r["config"]["kind"] == kind and r["config"]["model"] == model]
            if not rs:
                continue
            secs = [r["seconds"] for r in rs]
            name = f"{kind.upper()}, {'CoordConv' if model == 'coordconv' else 'conv'}"
            lines.append(
                f"| {name} | {len(rs)} | {rs[0]['params']:,} | {stat(rs, 'coverage_entropy')} | "
                f"{stat(rs, 'relative_entropy')} | {stat(rs, 'both_objects', 100, '.0f')}% | "
                f"{min(secs):.0f}–{max(secs):.0f} |"
            )
    return "\n".join(lines)


@torch.no_grad()
def interpolations(model: nn.Module, kind: str, pairs: int, steps: int, seed: int) -> Tensor:
    """[pairs, steps, 3, S, S]: images along straight lines between pairs of latents drawn from the prior."""
    g = torch.Generator().manual_seed(seed)
    dim = Z_GAN if kind == "gan" else Z_VAE
    a, b = (
        (torch.rand(2, pairs, dim, generator=g) * 2 - 1) if kind == "gan" else torch.randn(2, pairs, dim, generator=g)
    )
    alpha = torch.linspace(0, 1, steps).view(1, steps, 1)
    z = ((1 - alpha) * a[:, None] + alpha * b[:, None]).reshape(-1, dim)
    model.eval()
    decode = model if kind == "gan" else cast(Vae, model).decoder
    out = (torch.tanh(decode(z)) + 1) / 2 if kind == "gan" else torch.sigmoid(decode(z))
    return out.view(pairs, steps, 3, CANVAS, CANVAS)


def figures(results: list[dict], data: Tensor, kind: str, prefix: str) -> list[str]:
    """For the first seed of each model: a sample grid beside the data, latent interpolations, and the
    centre-coverage and relative-position maps with their entropies beside the data's (Figure 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .shapes import coverage_histogram, object_centres, relative_histogram

    firsts: dict[str, dict] = {}
    for r in results:
        if r["config"]["kind"] == kind:
            firsts.setdefault(r["config"]["model"], r)
    models = [m for m in ("conv", "coordconv") if m in firsts]
    label = {"conv": "conv", "coordconv": "CoordConv"}
    title = kind.upper()
    sets = {"data": data[: len(data)]}
    for m in models:
        r = firsts[m]
        sets[m] = generate(
            r, r["config"]["samples"] if not r["config"]["quick"] else 64, 10_000 + r["config"]["seed"], kind
        )
    paths = []

    cols = 10
    fig, axes = plt.subplots(len(sets), cols, figsize=(cols * 1.2, len(sets) * 1.35), squeeze=False)
    for row, (name, imgs) in enumerate(sets.items()):
        for c in range(cols):
            ax = axes[row][c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel("data" if name == "data" else f"{title}, {label[name]}", fontsize=7)
    fig.suptitle(f"{title}: random samples (first row: training data)", fontsize=9)
    fig.tight_layout()
    paths.append(f"{prefix}-samples.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    pairs, steps = 4, 8
    fig, axes = plt.subplots(
        pairs * len(models), steps, figsize=(steps * 1.1, pairs * len(models) * 1.15), squeeze=False
    )
    for k, m in enumerate(models):
        r = firsts[m]
        line = interpolations(r["_model"], kind, pairs, steps, seed=20_000 + r["config"]["seed"])
        for p in range(pairs):
            for s in range(steps):
                ax = axes[k * pairs + p][s]
                ax.imshow(line[p, s].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
            axes[k * pairs + p][0].set_ylabel(label[m], fontsize=7)
    fig.suptitle(f"{title}: latent interpolations, 4 random pairs per model (left to right)", fontsize=9)
    fig.tight_layout()
    paths.append(f"{prefix}-interpolations.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(sets), figsize=(3.1 * len(sets), 6), squeeze=False)
    for c, (name, imgs) in enumerate(sets.items()):
        centres, present = object_centres(imgs)
        found = centres[present]
        e = entropies(imgs)
        who = "data" if name == "data" else f"{title}, {label[name]}"
        for row, (hist, what, key, extent) in enumerate(
            [
                (coverage_histogram(found), "object centres", "coverage_entropy", (0, CANVAS, CANVAS, 0)),
                (
                    relative_histogram(found),
                    "red minus blue centre",
                    "relative_entropy",
                    (-CANVAS, CANVAS, CANVAS, -CANVAS),
                ),
            ]
        ):
            ax = axes[row][c]
            ax.imshow((hist / hist.sum().clamp(min=1)).numpy(), cmap="magma", extent=extent)
            ax.set_title(f"{who}: {what}\nentropy {e[key]:.2f} bits", fontsize=8)
            ax.set_xlabel("column (px)", fontsize=7)
            ax.set_ylabel("row (px)", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(
        f"{title}: where objects are (top) and where red lies relative to blue (bottom), share per bin", fontsize=9
    )
    fig.tight_layout()
    paths.append(f"{prefix}-coverage.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
