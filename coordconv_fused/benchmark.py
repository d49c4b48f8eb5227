"""Side-by-side timing of CoordConv providers against a plain convolution, interleaved and paired.

Every round runs every provider once, in a rotated order, so that machine noise hits all providers
alike; a provider's cost is reported as the median over rounds of its per-round ratio to plain
``nn.Conv2d`` on the same input (the floor). The CLI's ``bench`` command prints the table.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .backends import available_backends
from .modules import CoordConv2d

__all__ = ["Shape", "STANDARD_SHAPES", "QUICK_SHAPES", "naive_coordconv", "run", "format_table",
           "ForeignLoad"]


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
        return (f"{self.name} ({self.n},{self.c},{self.h},{self.w})→{self.c_out} "
                f"k{self.k} s{self.stride} p{self.pad}")


STANDARD_SHAPES = [
    Shape("input layer", 32, 3, 64, 64, 32, 3, 1, 1),
    Shape("mid layer", 8, 64, 56, 56, 64, 3, 1, 1),
    Shape("deep layer", 8, 256, 14, 14, 256, 3, 1, 1),
    Shape("batch-1 stem", 1, 3, 224, 224, 64, 7, 2, 3),
    Shape("paper 1x1 layer", 64, 1, 64, 64, 8, 1, 1, 0),
    Shape("high resolution", 16, 32, 128, 128, 32, 3, 1, 1),
]
QUICK_SHAPES = [STANDARD_SHAPES[0], STANDARD_SHAPES[1], STANDARD_SHAPES[4]]


def naive_coordconv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """CoordConv as the popular ports write it: build coordinate channels for the batch with
    ``linspace``, concatenate them to the input, convolve ``C + 2`` channels."""
    n, _, h, w = x.shape
    yy = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
    xx = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
    return conv(torch.cat([x, yy, xx], 1))


def _providers(shape: Shape, backends: Sequence[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    plain = nn.Conv2d(shape.c, shape.c_out, shape.k, shape.stride, shape.pad)
    cat_conv = nn.Conv2d(shape.c + 2, shape.c_out, shape.k, shape.stride, shape.pad)
    out: dict[str, Callable] = {"nn.Conv2d (floor)": plain, "naive cat": lambda x: naive_coordconv(cat_conv, x)}
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


def _time_once(fn: Callable, x: torch.Tensor, mode: str) -> float:
    if mode == "forward":
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(x)
        return time.perf_counter() - t0
    xg = x.requires_grad_(True)
    t0 = time.perf_counter()
    out = fn(xg)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - t0


def run(shapes: Sequence[Shape] = QUICK_SHAPES, modes: Sequence[str] = ("forward", "forward+backward"),
        rounds: int = 7, backends: Sequence[str] | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Time every provider on every shape and mode; returns a JSON-serialisable result."""
    backends = list(backends) if backends is not None else available_backends("cpu") + ["auto"]
    load = ForeignLoad()
    results = []
    for shape in shapes:
        providers = _providers(shape, backends)
        names = list(providers)
        x = torch.randn(shape.n, shape.c, shape.h, shape.w)
        for mode in modes:
            for name in names:  # warm-up
                _time_once(providers[name], x.detach().clone(), mode)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order:
                    for p in getattr(providers[name], "parameters", lambda: [])():
                        p.grad = None
                    times[name].append(_time_once(providers[name], x.detach().clone(), mode))
                if progress:
                    progress(f"{shape.name} {mode} round {r + 1}/{rounds}")
            floor = times[names[0]]
            for name in names:
                t = times[name]
                ratios = [a / b for a, b in zip(t, floor)]
                results.append({
                    "shape": str(shape), "mode": mode, "provider": name,
                    "median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                    "max_ms": 1e3 * max(t), "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios), "ratio_max": max(ratios),
                })
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": rounds,
        "foreign_load": load.fraction(),
        "results": results,
    }


def format_table(report: dict) -> str:
    """A markdown table of a :func:`run` report."""
    lines = [
        "| shape | mode | provider | median ms | min–max ms | ratio to nn.Conv2d (median, min–max) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['median_ms']:.2f} | "
            f"{r['min_ms']:.2f}–{r['max_ms']:.2f} | {r['ratio_median']:.2f}× "
            f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |"
        )
    m = report["machine"]
    lines.append("")
    lines.append(f"{report['date']}; {m['processor']}, {m['cpus']} CPUs, {m['threads']} threads, torch "
                 f"{m['torch']}; {report['rounds']} interleaved rounds; GLIBC_TUNABLES="
                 f"{m['glibc_tunables'] or '(unset)'}.")
    load = report.get("foreign_load")
    if load is not None:
        verdict = "WARNING: other processes used the CPU, figures are unreliable" if load > 0.1 else "quiet"
        lines.append(f"Foreign CPU load during the run: {100 * load:.0f}% ({verdict}).")
    return "\n".join(lines)

