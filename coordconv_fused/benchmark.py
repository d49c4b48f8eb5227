"""Side-by-side timing and memory of CoordConv providers against a plain convolution.

Every round runs every provider once, in a rotated order, so that machine noise hits all providers
alike; a provider's cost is the median over rounds of its per-round ratio to plain ``nn.Conv2d``
on the same input (the floor). A provider's sample in a round is the mean time of a run of
consecutive calls, as many as make the fastest provider's run last :data:`SAMPLE_SECONDS` (the same
count for every provider of a shape and mode): one call of a millisecond layer is too short a sample
to be steady. Memory is measured two ways: the bytes autograd holds between
forward and backward (saved-tensor hooks: exact and deterministic), and the peak resident-set
growth of one forward+backward in a fresh subprocess. ``coordconv-fused bench`` prints the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .backends import available_backends
from .backends.choice_file import cpu_model_and_flags, isa_caps
from .backends.native import choice_confirm_calls, kernel_choices
from .malloc_tunables import GLIBC_TUNABLES
from .modules import CoordConv2d

__all__ = [
    "Shape",
    "STANDARD_SHAPES",
    "QUICK_SHAPES",
    "TARGETS",
    "NaiveCoordConv",
    "make_providers",
    "held_bytes",
    "peak_bytes",
    "rss_bytes",
    "run",
    "format_report",
    "choices_table",
    "plot",
    "ForeignLoad",
    "steadiness",
]


@dataclasses.dataclass(frozen=True)
class Shape:
    """A convolution problem: (N, C, H, W) input, C_out, k x k kernel, stride, padding."""

    name: str
    n: int
    c: int
    h: int
    w: int
    c_out: int
    k: int
    stride: int
    pad: int

    def __str__(self) -> str:
        return f"{self.name} ({self.n},{self.c},{self.h},{self.w})→{self.c_out} k{self.k} s{self.stride} p{self.pad}"


STANDARD_SHAPES = [
    Shape("input layer", 32, 3, 64, 64, 32, 3, 1, 1),
    Shape("mid layer", 8, 64, 56, 56, 64, 3, 1, 1),
    Shape("deep layer", 8, 256, 14, 14, 256, 3, 1, 1),
    Shape("batch-1 stem", 1, 3, 224, 224, 64, 7, 2, 3),
    Shape("paper 1x1 layer", 64, 1, 64, 64, 8, 1, 1, 0),
    Shape("high resolution", 16, 32, 128, 128, 32, 3, 1, 1),
    Shape("RGB 1x1 layer", 8, 3, 224, 224, 8, 1, 1, 0),  # the paper's ImageNet CoordConv layer (S5)
]
QUICK_SHAPES = [STANDARD_SHAPES[0], STANDARD_SHAPES[1], STANDARD_SHAPES[4]]
FLOOR, NAIVE = "nn.Conv2d (floor)", "naive cat"
# Ratio-of-medians targets against the floor, per mode.
TARGETS = {"forward": 1.10, "forward+backward": 1.05}


class NaiveCoordConv(nn.Module):
    """CoordConv as the popular ports write it: build coordinate channels for the batch with
    ``linspace``, concatenate them to the input, convolve ``C + 2`` channels."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        yy = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
        xx = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        return self.conv(torch.cat([x, yy, xx], 1))


def default_backends() -> list[str]:
    """Every backend usable on CPU here, and ``auto`` (not Triton's interpreter: that is a test
    harness, not a CPU implementation)."""
    return [b for b in available_backends("cpu") if b != "triton"] + ["auto"]


_MEASURING = ("coordconv[cpp]", "coordconv[auto]")  # (providers whose first calls time kernels)


def make_providers(shape: Shape, backends: Sequence[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The floor, the naive concatenation, and a CoordConv2d per backend, for ``shape``."""
    torch.manual_seed(0)
    plain = nn.Conv2d(shape.c, shape.c_out, shape.k, shape.stride, shape.pad)
    cat_conv = nn.Conv2d(shape.c + 2, shape.c_out, shape.k, shape.stride, shape.pad)
    out: dict[str, Callable] = {FLOOR: plain, NAIVE: NaiveCoordConv(cat_conv)}
    for b in backends:
        out[f"coordconv[{b}]"] = CoordConv2d(shape.c, shape.c_out, shape.k, shape.stride, shape.pad, backend=b)
    return out


class ForeignLoad:
    """Measures CPU time spent by *other* processes while the benchmark runs (Linux /proc/stat)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
        own = sum(os.times()[:4])
        return busy, own, time.perf_counter()

    def fraction(self) -> float | None:
        """Share of the machine's CPU capacity used by other processes since construction."""
        end = self._read()
        if self._start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


SAMPLE_SECONDS = 0.03
"""The least duration of one timed sample (a run of consecutive calls) of the fastest provider."""
_MAX_CALLS = 200


def _time_calls(fn: Callable, x: torch.Tensor, mode: str, calls: int = 1) -> float:
    """Mean seconds per call over ``calls`` consecutive calls of ``fn`` on ``x`` (forward without
    autograd, or forward and backward with gradients reset before each call, so that none of them
    accumulates into an earlier one)."""
    if mode == "forward":
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            return (time.perf_counter() - t0) / calls
    xg = x.requires_grad_(True)
    params = list(getattr(fn, "parameters", lambda: [])())
    t0 = time.perf_counter()
    for _ in range(calls):
        xg.grad = None
        for p in params:
            p.grad = None
        out = fn(xg)
        out.backward(torch.ones_like(out))
    return (time.perf_counter() - t0) / calls


def calls_per_sample(fastest_seconds: float, sample_seconds: float = SAMPLE_SECONDS) -> int:
    """Consecutive calls per timed sample for a provider taking ``fastest_seconds`` per call."""
    if sample_seconds <= 0 or fastest_seconds <= 0:
        return 1
    return max(1, min(_MAX_CALLS, math.ceil(sample_seconds / fastest_seconds)))


def held_bytes(fn: Callable, x: torch.Tensor) -> int:
    """Bytes of tensor storage autograd keeps from forward for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in getattr(fn, "parameters", lambda: [])()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_(True))
    return sum(seen.values())


_PEAK_SCRIPT = """
import sys, torch
from coordconv_fused.benchmark import STANDARD_SHAPES, make_providers, rss_bytes
torch.set_num_threads(int(sys.argv[3]))
shape = [s for s in STANDARD_SHAPES if s.name == sys.argv[1]][0]
backend = sys.argv[2][len("coordconv["):-1] if sys.argv[2].startswith("coordconv[") else None
fn = make_providers(shape, [backend] if backend else [])[sys.argv[2]]
small = torch.randn(1, shape.c, 2 * shape.k, 2 * shape.k, requires_grad=True)
fn(small).sum().backward()  # first call: lazy imports and initialisation, not the provider's memory
x = torch.randn(shape.n, shape.c, shape.h, shape.w, requires_grad=True)
before = rss_bytes("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
out = fn(x)
out.backward(torch.ones_like(out))
print(rss_bytes("VmHWM") - before)
"""


def rss_bytes(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(shape: Shape, provider: str, threads: int = 2) -> int | None:
    """Growth of the peak resident set over one forward+backward, in a fresh process (Linux; glibc
    malloc tunables keep freed memory mapped, so growth means new memory). ``None`` if unsupported."""
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
    for _ in range(2):  # one retry: a measurement process can die of an unrelated hiccup
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, shape.name, provider, str(threads)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return int(proc.stdout.strip())
    return None


def run(
    shapes: Sequence[Shape] = QUICK_SHAPES,
    modes: Sequence[str] = ("forward", "forward+backward"),
    rounds: int = 7,
    backends: Sequence[str] | None = None,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
    sample_seconds: float = SAMPLE_SECONDS,
) -> dict:
    """Time (and measure the memory of) every provider on every shape and mode; each timed sample
    lasts ``sample_seconds`` at least for the fastest provider (0: one call per sample)."""
    backends = list(backends) if backends is not None else default_backends()
    load = ForeignLoad()
    results = []
    for shape in shapes:
        providers = make_providers(shape, backends)
        names = list(providers)
        x = torch.randn(shape.n, shape.c, shape.h, shape.w)
        for mode in modes:
            warm = {}
            for name in names:  # warm-up (and fill any cache a provider keeps)
                # (the cpp backend, also behind auto, times its candidates on a layer's first call and
                # again choice_confirm_calls() calls later: all before the timed rounds)
                for _ in range(1 + max(choice_confirm_calls(), default=0) if name in _MEASURING else 1):
                    _time_calls(providers[name], x.detach().clone(), mode)
                warm[name] = _time_calls(providers[name], x.detach().clone(), mode)
            calls = calls_per_sample(min(warm.values()), sample_seconds)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    times[name].append(_time_calls(providers[name], x.detach().clone(), mode, calls))
                if progress:
                    progress(f"{shape.name}: {mode}, round {r + 1}/{rounds}")
            for name in names:
                t = times[name]
                ratios = [a / b for a, b in zip(t, times[FLOOR])]
                vs_naive = [a / b for a, b in zip(t, times[NAIVE])]
                results.append(
                    {
                        "shape": str(shape),
                        "shape_name": shape.name,
                        "mode": mode,
                        "provider": name,
                        "calls_per_sample": calls,
                        "median_ms": 1e3 * statistics.median(t),
                        "min_ms": 1e3 * min(t),
                        "max_ms": 1e3 * max(t),
                        "ratio": statistics.median(t) / statistics.median(times[FLOOR]),
                        "paired_ratio_median": statistics.median(ratios),
                        "paired_ratio_min": min(ratios),
                        "paired_ratio_max": max(ratios),
                        "vs_naive": statistics.median(vs_naive),
                    }
                )
        if memory:
            for name in names:
                entry = {
                    "shape": str(shape),
                    "shape_name": shape.name,
                    "provider": name,
                    "held_bytes": held_bytes(providers[name], x),
                    "peak_bytes": peak_bytes(shape, name),
                }
                results.append(dict(entry, mode="memory"))
                if progress:
                    progress(f"{shape.name}: memory of {name}")
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_description(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": rounds,
        "sample_seconds": sample_seconds,
        "foreign_load": load.fraction(),
        "results": results,
        # what the cpp backend chose for each layer, by measurement (COORDCONV_CPU_KERNEL)
        "kernel_selection": os.environ.get("COORDCONV_CPU_KERNEL", "measure"),
        "kernel_choices": kernel_choices(),
    }


def cpu_description() -> str:
    """The CPU model and the widest x86 vector ISA it offers (from /proc/cpuinfo), e.g.
    'AMD EPYC 9R14 (AVX-512)', and every cap on the ISA in effect: this package's AVX-512 kernels
    off (COORDCONV_NO_AVX512=1), oneDNN's (ONEDNN_MAX_CPU_ISA) and ATen's (ATEN_CPU_CAPABILITY)
    limits -- with all three at AVX2 the process computes as on an AVX2-only CPU."""
    model, flags = cpu_model_and_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    caps = isa_caps()
    if isa and caps:
        isa += ", limited: " + " ".join(caps)
    return f"{model} ({isa})" if isa else model


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


# Fewer interleaved rounds than this is a smoke run: the report states no verdict on the targets.
MIN_JUDGED_ROUNDS = 3


# Above this max/min of nn.Conv2d's own times over the rounds, a row's ratios are called unsteady.
UNSTEADY = 1.25


def _floor_spread(report: dict) -> dict[tuple[str, str], float]:
    """max/min of the floor's times over the rounds, per (shape, mode): how steady the machine was."""
    return {
        (r["shape"], r["mode"]): r["max_ms"] / r["min_ms"] if r["min_ms"] > 0 else float("inf")
        for r in report["results"]
        if r["provider"] == FLOOR and r["mode"] != "memory"
    }


def steadiness(report: dict) -> str:
    """One line: how much nn.Conv2d's own time varied over the rounds, and on how many rows beyond
    :data:`UNSTEADY` (where ratios move by as much: a VM whose memory bandwidth or clock varies)."""
    spread = _floor_spread(report)
    if not spread:
        return ""
    (shape, mode), worst = max(spread.items(), key=lambda kv: kv[1])
    unsteady = sum(v > UNSTEADY for v in spread.values())
    verdict = (
        f"above {UNSTEADY:.2f}× on {unsteady} of {len(spread)} rows: an unsteady machine, ratios there move as much"
        if unsteady
        else "steady"
    )
    return (
        f"Steadiness: nn.Conv2d's own time varied by up to {worst:.2f}× (max/min) over the rounds "
        f"({shape}, {mode}); {verdict}."
    )


def _target_misses(report: dict) -> list[str]:
    """Where `auto` misses the targets: ratio to the floor, slower than naive, more memory held."""
    misses = []
    rows = report["results"]
    spread = _floor_spread(report)
    for r in rows:
        if r["provider"] != "coordconv[auto]":
            continue
        if r["mode"] in TARGETS:
            target = TARGETS[r["mode"]]
            if r["ratio"] > target:
                unsteady = spread[(r["shape"], r["mode"])]
                note = f"; nn.Conv2d's own time varied {unsteady:.2f}× over the rounds" if unsteady > UNSTEADY else ""
                misses.append(
                    f"{r['shape']} {r['mode']}: {r['ratio']:.3f}× > {target:.2f}× "
                    f"(over by {100 * (r['ratio'] / target - 1):.1f}%; paired-round median "
                    f"{r['paired_ratio_median']:.2f}×{note})"
                )
            if r["vs_naive"] > 1.0:
                misses.append(f"{r['shape']} {r['mode']}: slower than the naive concatenation ({r['vs_naive']:.2f}×)")
        elif r["mode"] == "memory":
            floor = next(
                f for f in rows if f["mode"] == "memory" and f["shape"] == r["shape"] and f["provider"] == FLOOR
            )
            if r["held_bytes"] > floor["held_bytes"]:
                misses.append(
                    f"{r['shape']}: holds {_mib(r['held_bytes'] - floor['held_bytes'])} MiB more "
                    f"than nn.Conv2d for backward"
                )
    return misses


def choices_table(caption: str, columns: tuple[str, str], rows: list[tuple[str, str, str, dict]]) -> list[str]:
    """Markdown lines: a caption and a table of choices made by measurement, one row per
    ``(first column, second column, chosen, {candidate: µs})``."""
    lines = ["", caption, "", f"| {columns[0]} | {columns[1]} | chosen | candidates |", "|---|---|---|---|"]
    for first, second, chosen, times in rows:
        timings = ", ".join(f"{name} {us:.0f}" for name, us in times.items())
        lines.append(f"| {first} | {second} | {chosen} | {timings} |")
    return lines


def _sample_words(report: dict) -> str:
    seconds = report.get("sample_seconds") or 0  # (None: a report from before samples were runs)
    if seconds <= 0:
        return ", one call per sample"
    return (
        f", each sample the mean of consecutive calls lasting {1e3 * seconds:.0f} ms or more for the "
        "fastest provider (the count per shape and mode in the table)"
    )


def format_report(report: dict) -> str:
    """Markdown: timing table, memory table, target check, machine line."""
    lines = [
        "| shape | mode | provider | median ms | min–max ms | ratio to nn.Conv2d (medians) "
        "| paired ratio median (min–max) | vs naive | calls per sample |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r["mode"] == "memory":
            continue
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['median_ms']:.2f} | "
            f"{r['min_ms']:.2f}–{r['max_ms']:.2f} | {r['ratio']:.2f}× | {r['paired_ratio_median']:.2f}× "
            f"({r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}) | {r['vs_naive']:.2f}× | "
            f"{r.get('calls_per_sample', 1)} |"
        )
    mem = [r for r in report["results"] if r["mode"] == "memory"]
    if mem:
        lines += [
            "",
            "| shape | provider | held for backward (MiB) | peak RSS growth, fwd+bwd (MiB) |",
            "|---|---|---:|---:|",
        ]
        for r in mem:
            lines.append(f"| {r['shape']} | {r['provider']} | {_mib(r['held_bytes'])} | {_mib(r['peak_bytes'])} |")
    targets = (
        "Targets for `auto` (forward ≤ 1.10×, forward+backward ≤ 1.05× of nn.Conv2d, never slower "
        "than the naive concatenation, no more held for backward than nn.Conv2d): "
    )
    if report["rounds"] < MIN_JUDGED_ROUNDS:
        lines += [
            "",
            targets + f"not judged: {report['rounds']} round(s) is a smoke run, not a timing "
            f"(use --rounds {MIN_JUDGED_ROUNDS} or more).",
        ]
    else:
        misses = _target_misses(report)
        lines += ["", targets + ("all met." if not misses else f"{len(misses)} missed:")]
        lines += [f"- {m}" for m in misses]
    choices = report.get("kernel_choices") or []
    if choices:
        lines += choices_table(
            f"Kernels of the cpp backend (COORDCONV_CPU_KERNEL={report.get('kernel_selection', 'measure')}; "
            "chosen by timing each candidate on the layer's first call and again "
            f"{' and '.join(map(str, choice_confirm_calls()))} calls later, best time of the timed calls, "
            "µs; the fixed rule's "
            "pick is kept unless another is over 5% faster):",
            ("op", "layer"),
            [
                (
                    c["op"],
                    c["layer"],
                    c["chosen"] + (" (timed once)" if c.get("measurements", 1) < 2 else ""),
                    c["candidates_us"],
                )
                for c in choices
            ],
        )
    m = report["machine"]
    lines.append("")
    lines.append(
        f"{report['date']}; {m['processor']}, {m['cpus']} CPUs, {m['threads']} threads, torch "
        f"{m['torch']}; {report['rounds']} interleaved rounds{_sample_words(report)}; GLIBC_TUNABLES="
        f"{m['glibc_tunables'] or '(unset)'}."
    )
    load = report.get("foreign_load")
    if load is not None:
        verdict = (
            "WARNING: other processes used the CPU during the run, the figures are unreliable"
            if load > 0.1
            else "quiet"
        )
        lines.append(f"Foreign CPU load during the run: {100 * load:.0f}% ({verdict}).")
    steady = steadiness(report) if report["rounds"] > 1 else ""
    if steady:
        lines.append(steady)
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """A PNG: per shape and mode, each provider's ratio to nn.Conv2d (with min–max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["mode"] != "memory"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys(r["shape_name"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(
        1, len(modes), figsize=(6 * len(modes), 0.6 * len(shapes) * len(providers) / 2 + 2), squeeze=False
    )
    for ax, mode in zip(axes[0], modes):
        height = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            vals = [
                next((r for r in rows if (r["mode"], r["shape_name"], r["provider"]) == (mode, s, prov)), None)
                for s in shapes
            ]
            ys = [j + i * height for j in range(len(shapes))]
            med = [v["paired_ratio_median"] if v else 0 for v in vals]
            err = [
                [m - (v["paired_ratio_min"] if v else 0) for m, v in zip(med, vals)],
                [(v["paired_ratio_max"] if v else 0) - m for m, v in zip(med, vals)],
            ]
            ax.barh(ys, med, height=height, xerr=err, label=prov, capsize=2)
        ax.axvline(1.0, color="k", lw=0.8)
        target = TARGETS.get(mode, 1.0)
        ax.axvline(target, color="r", lw=0.8, ls="--")
        ax.annotate(
            f"target ≤ {target:.2f}×",
            (target, 0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 3),
            textcoords="offset points",
            color="r",
            fontsize=7,
        )
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(shapes))], shapes)
        ax.invert_yaxis()
        ax.set_xlabel("time / nn.Conv2d time (median of paired rounds; whiskers min–max)")
        ax.set_title(mode)
    axes[0][0].legend(fontsize=7, loc="lower right")
    m = report["machine"]
    fig.suptitle(
        f"CoordConv vs nn.Conv2d — {m['processor']}, {m['threads']} threads, torch {m['torch']}, {report['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
