"""Per-call cost: host time of one call on a tiny input, and torch.compile against nn.Conv2d.

* :func:`host_overhead`: a ``(1, 3, 8, 8)`` input, where the arithmetic is negligible and the time
  is what a call costs the host (argument handling, dispatch, autograd bookkeeping, kernel launch
  or tiny kernel). ``nn.Conv2d`` and a ``CoordConv2d`` per backend, forward under ``no_grad`` and
  forward+backward, each timed over a batch of calls, in interleaved rotated rounds; medians and
  ratios to ``nn.Conv2d`` of the same round.
* :func:`compiled_ratio`: ``torch.compile`` of ``CoordConv2d + ReLU`` against ``torch.compile`` of
  ``Conv2d + ReLU`` on a mid-sized layer, forward, interleaved rounds (inductor on CPU, or on the
  device given).

Both feed ``coordconv-fused bench`` (table and JSON); nothing here asserts a target.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .backends.native import choice_confirm_calls
from .modules import CoordConv2d

__all__ = ["host_overhead", "compiled_ratio", "format_host_overhead", "format_compiled"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rounds(
    calls: Mapping[str, Callable[[], object]], rounds: int, per_round: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each callable, one batch of ``per_round`` calls per round, interleaved in a
    rotated order, after a warm-up: plans, caches, autotuning, compilation, and the ``cpp``
    backend's kernel choice, timed again on a schedule of calls (:func:`choice_confirm_calls`)."""
    names = list(calls)
    warm_up = 1 + max((3, *choice_confirm_calls()))
    for fn in calls.values():
        for _ in range(warm_up):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = calls[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / per_round)
    return times


def _summary(times: dict[str, list[float]], floor: str) -> dict[str, dict]:
    out = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times[floor])]
        out[name] = {
            "median_us": 1e6 * statistics.median(t),
            "min_us": 1e6 * min(t),
            "max_us": 1e6 * max(t),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out


DEVICE_PATH = "torch_device_path"
"""The row of the ``torch`` backend's path off the CPU run on CPU tensors (:func:`host_overhead`)."""


def host_overhead(
    backends: Sequence[str],
    device: str = "cpu",
    rounds: int = 9,
    per_round: int = 200,
    progress: Callable[[str], None] | None = None,
    device_path: bool | None = None,
) -> dict:
    """Per-call time on a tiny ``(1, 3, 8, 8)`` input, forward (no grad) and forward+backward, for
    ``nn.Conv2d`` and a ``CoordConv2d(3, 8, 3, padding=1)`` per backend. With ``device_path``
    (default: on the CPU), also the ``torch`` backend's path as it runs off the CPU (the term by a
    GEMM, nothing kept by value), on CPU tensors: a proxy, measurable without a GPU, for that
    path's host time on one."""
    if device_path is None:
        device_path = device == "cpu"
    if device_path:
        from . import backends as registry
        from .testing import device_path_torch_backend

        with registry.temporary_backend(device_path_torch_backend()) as name:
            return host_overhead([*backends, name], device, rounds, per_round, progress, device_path=False)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8, device=device)
    xg = x.clone().requires_grad_()
    layers: dict[str, nn.Module] = {"nn.Conv2d": nn.Conv2d(3, 8, 3, padding=1).to(device)}
    for b in backends:
        layers[f"coordconv[{b}]"] = CoordConv2d(3, 8, 3, padding=1, backend=b).to(device)
    result = {
        "input": [1, 3, 8, 8],
        "layer": "3 -> 8, 3x3, padding 1",
        "device": device,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "calls_per_round": per_round,
    }
    for mode in ("forward", "forward+backward"):

        def make(layer, mode=mode):
            if mode == "forward":

                def fwd():
                    with torch.no_grad():
                        layer(x)

                return fwd
            return lambda: layer(xg).sum().backward()

        times = _rounds({n: make(m) for n, m in layers.items()}, rounds, per_round, device)
        result[mode] = _summary(times, "nn.Conv2d")
        if progress:
            progress(f"host overhead: {mode}")
    return result


EAGER = "Conv2d + ReLU, eager"

# From this many times the eager model's time on, the compiled Conv2d + ReLU is flagged as not
# measuring the layer (e.g. with ATen capped by ATEN_CPU_CAPABILITY=avx2, inductor's oneDNN
# convolutions took 155-290 ms against 5-9 ms eager, on a Xeon, 2026-12-02).
SLOW_COMPILED = 2.0


def compiled_ratio(
    device: str = "cpu",
    shape: tuple[int, int, int, int] = (8, 64, 56, 56),
    rounds: int = 9,
    per_round: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """``torch.compile(CoordConv2d + ReLU)`` against ``torch.compile(Conv2d + ReLU)`` (forward,
    inference), 3x3, ``C -> C`` channels; and the eager ``Conv2d + ReLU`` in the same rounds, so
    that a compiled convolution much slower than eager (a sign that the comparison measures
    something other than the layer) shows."""
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, device=device)
    models = {
        "Conv2d + ReLU": nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()),
        "CoordConv2d + ReLU": nn.Sequential(CoordConv2d(c, c, 3, padding=1), nn.ReLU()),
        EAGER: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()),
    }
    calls = {}
    for name, model in models.items():
        model = model.to(device).eval()
        run = model if name == EAGER else torch.compile(model)

        def call(run=run):
            with torch.no_grad():
                run(x)

        calls[name] = call
    times = _rounds(calls, rounds, per_round, device)
    if progress:
        progress("compiled CoordConv2d + ReLU")
    return {
        "shape": list(shape),
        "device": device,
        "torch": torch.__version__,
        "rounds": rounds,
        "results": _summary(times, "Conv2d + ReLU"),
    }


def format_host_overhead(result: dict) -> str:
    lines = [
        f"Per-call host time on a tiny input {tuple(result['input'])} ({result['layer']}, {result['device']}, "
        f"{result['threads']} thread(s); median of {result['rounds']} interleaved rounds of "
        f"{result['calls_per_round']} calls):",
        "",
        "| provider | forward (no grad) µs | × nn.Conv2d | forward+backward µs | × nn.Conv2d |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in result["forward"]:
        f, b = result["forward"][name], result["forward+backward"][name]
        lines.append(
            f"| {name} | {f['median_us']:.1f} | {f['ratio']:.2f}× | {b['median_us']:.1f} | {b['ratio']:.2f}× |"
        )
    if f"coordconv[{DEVICE_PATH}]" in result["forward"]:
        lines += [
            "",
            f"coordconv[{DEVICE_PATH}]: the `torch` backend's path off the CPU (the coordinate term by one "
            "GEMM, nothing kept by value), run on CPU tensors: a proxy for its host time on a GPU.",
        ]
    return "\n".join(lines)


def format_compiled(result: dict) -> str:
    r = result["results"]
    ours = r["CoordConv2d + ReLU"]
    text = (
        f"torch.compile, forward, {tuple(result['shape'])} 3x3 on {result['device']} (torch {result['torch']}): "
        f"Conv2d + ReLU {r['Conv2d + ReLU']['median_us'] / 1e3:.3f} ms, CoordConv2d + ReLU "
        f"{ours['median_us'] / 1e3:.3f} ms: {ours['ratio']:.3f}× (paired rounds {ours['ratio_min']:.3f}–"
        f"{ours['ratio_max']:.3f}×)."
    )
    eager = r[EAGER]
    text += f" Eager Conv2d + ReLU: {eager['median_us'] / 1e3:.3f} ms."
    slowdown = r["Conv2d + ReLU"]["median_us"] / eager["median_us"]
    if slowdown >= SLOW_COMPILED:
        text += (
            f" **The compiled Conv2d + ReLU runs {slowdown:.1f}× slower than eager here: the compiled ratio "
            "measures that, not the coordinate term.**"
        )
    return text
