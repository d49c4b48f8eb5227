"""The GPU benchmark: CoordConv providers against ``nn.Conv2d`` on CUDA, timed with CUDA events.

Per shape and dtype, every provider is timed forward and forward+backward: the median over
repetitions of the CUDA-event time of one call, with the L2 cache flushed before each repetition
(a write over a buffer larger than the cache), providers interleaved round by round -- both as GPU
time (the call queued whole behind a GPU spin, so the host's per-call time is hidden, as in a
network whose host runs ahead) and as the time of the call alone (host and GPU in series). Peak memory is
``torch.cuda.max_memory_allocated`` over one forward+backward beyond what the inputs and parameters
hold. ``coordconv-fused bench --device cuda`` prints the report and writes JSON and a plot (the
same layout as the CPU benchmark's).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn as nn

from .backends import auto_choices, available_backends
from .benchmark import FLOOR, NAIVE, STANDARD_SHAPES, Shape, choices_table, make_providers

__all__ = ["GPU_SHAPES", "GPU_TARGETS", "run", "format_report", "kernel_breakdown", "epilogue_policies"]

# The standard shapes and the larger batches a GPU is used for.
GPU_SHAPES = [
    *STANDARD_SHAPES,
    Shape("mid layer b64", 64, 64, 56, 56, 64, 3, 1, 1),
    Shape("deep layer b64", 64, 256, 14, 14, 256, 3, 1, 1),
    Shape("input layer b64 256²", 64, 3, 256, 256, 32, 3, 1, 1),
    Shape("high resolution b32", 32, 64, 128, 128, 64, 3, 1, 1),
    Shape("stem b64", 64, 3, 224, 224, 64, 7, 2, 3),
]
# Targets of the GPU issue (forward and forward+backward time over nn.Conv2d's).
GPU_TARGETS = {"forward": 1.10, "forward+backward": 1.10}
MODES = ("forward", "forward+backward")


def _providers(
    shape: Shape, backends: Sequence[str], dtype: torch.dtype, channels_last: bool, compiled: bool
) -> dict[str, Callable]:
    providers = make_providers(shape, backends)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out: dict[str, Callable] = {}
    for name, m in providers.items():
        module = cast(nn.Module, m).to(device="cuda", dtype=dtype)
        # (torch 2.11's stubs lack Module.to(memory_format=...); it exists at run time)
        out[name] = module.to(memory_format=fmt)  # type: ignore[call-overload, unused-ignore]
    if compiled:
        out[f"{FLOOR} compiled"] = torch.compile(out[FLOOR])
        out["coordconv[auto] compiled"] = torch.compile(out["coordconv[auto]"])
    return out


def _call(fn: Callable, x: torch.Tensor, mode: str, params: Sequence[torch.Tensor]) -> None:
    if mode == "forward":
        with torch.no_grad():
            fn(x)
        return
    out = fn(x)
    torch.autograd.grad(out, [x, *params], torch.ones_like(out))


def _cycles_per_ms() -> float:
    """How many ``torch.cuda._sleep`` cycles the GPU spins per millisecond (timed once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # (warm-up)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    return 2_000_000 / start.elapsed_time(end)


def _timed(fn: Callable[[], None], flush: torch.Tensor, sleep_cycles: int) -> float:
    """CUDA-event time (ms) of one call after an L2 flush; with ``sleep_cycles``, the GPU first spins
    that long so that the host has queued the whole call before the GPU reaches it."""
    flush.zero_()
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run(
    shapes: Sequence[Shape] = GPU_SHAPES,
    dtypes: Sequence[str] = ("float32", "bfloat16-cl"),
    reps: int = 25,
    compiled: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every provider on every shape, dtype and mode (float32: NCHW, PyTorch's defaults;
    bfloat16-cl: bfloat16 in channels_last), two ways per repetition:

    * **GPU time** (``median_ms``): the GPU spins (``torch.cuda._sleep``) for three times the longest
      host time of a call seen in the warm-up before the timed call, so the host has queued it
      whole: the time of the call's GPU work alone, what a layer costs in a network whose host runs
      ahead of the GPU;
    * **call time** (``call_median_ms``): the call alone after the flush, host and GPU in series: on
      layers whose GPU work is shorter than the host's per-call time, that time.
    """
    backends = [b for b in available_backends("cuda") if b != "reference"] + ["auto"]
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # > L2
    cycles_per_ms = _cycles_per_ms()
    results = []
    for dtype_name in dtypes:
        dtype = torch.bfloat16 if dtype_name.startswith("bfloat16") else torch.float32
        channels_last = dtype_name.endswith("-cl")
        for shape in shapes:
            providers = _providers(shape, backends, dtype, channels_last, compiled)
            x = torch.randn(shape.n, shape.c, shape.h, shape.w, device="cuda", dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            params = {n: list(getattr(m, "parameters", list)()) for n, m in providers.items()}
            for mode in MODES:
                host_ms = 0.0
                for name, fn in providers.items():  # warm-up: caches, autotuning, compilation
                    for _ in range(2):
                        _call(fn, x, mode, params[name])
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()  # (the host's time of a warm call)
                    _call(fn, x, mode, params[name])
                    host_ms = max(host_ms, 1e3 * (time.perf_counter() - t0))
                torch.cuda.synchronize()
                sleep_cycles = int(cycles_per_ms * max(1.0, 3 * host_ms))
                gpu: dict[str, list[float]] = {n: [] for n in providers}
                call: dict[str, list[float]] = {n: [] for n in providers}
                names = list(providers)
                for r in range(reps):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        fn, p = providers[name], params[name]
                        gpu[name].append(_timed(functools.partial(_call, fn, x, mode, p), flush, sleep_cycles))
                        call[name].append(_timed(functools.partial(_call, fn, x, mode, p), flush, 0))
                floor, naive = statistics.median(gpu[FLOOR]), statistics.median(gpu[NAIVE])
                call_floor, call_naive = statistics.median(call[FLOOR]), statistics.median(call[NAIVE])
                for name, t in gpu.items():
                    med, call_med = statistics.median(t), statistics.median(call[name])
                    results.append(
                        {
                            "shape": f"{shape} {dtype_name}",
                            "shape_name": f"{shape.name} {dtype_name}",
                            "dtype": dtype_name,
                            "mode": mode,
                            "provider": name,
                            "median_ms": med,
                            "min_ms": min(t),
                            "max_ms": max(t),
                            "ratio": med / floor,
                            "paired_ratio_median": med / floor,
                            "paired_ratio_min": min(t) / floor,
                            "paired_ratio_max": max(t) / floor,
                            "vs_naive": med / naive,
                            "call_median_ms": call_med,
                            "call_ratio": call_med / call_floor,
                            "call_vs_naive": call_med / call_naive,
                        }
                    )
                if progress:
                    progress(f"{shape.name} {dtype_name}: {mode}")
            for name, fn in providers.items():
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                _call(fn, x, "forward+backward", params[name])
                torch.cuda.synchronize()
                results.append(
                    {
                        "shape": f"{shape} {dtype_name}",
                        "shape_name": f"{shape.name} {dtype_name}",
                        "dtype": dtype_name,
                        "mode": "memory",
                        "provider": name,
                        "peak_extra_bytes": torch.cuda.max_memory_allocated() - base,
                    }
                )
            del providers
            torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    return {
        "machine": {
            "processor": f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)",
            "cpus": None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32": torch.backends.cudnn.allow_tf32,
            "glibc_tunables": "",
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": reps,
        "device": "cuda",
        "results": results,
        "auto_choices": auto_choices(),
    }


def format_report(report: dict) -> str:
    """Markdown: per shape and dtype, each provider's GPU time forward and forward+backward as a ratio
    to nn.Conv2d's (and to the naive concatenation's), its time per isolated call likewise, peak
    memory, and the targets of `auto` on both."""
    rows = [r for r in report["results"] if r["mode"] != "memory"]
    mem = {(r["shape"], r["provider"]): r["peak_extra_bytes"] for r in report["results"] if r["mode"] == "memory"}
    lines = [
        "| shape | provider | forward GPU ms | × nn.Conv2d | × naive | fwd+bwd GPU ms | × nn.Conv2d | × naive "
        "| call fwd / fwd+bwd ms | call × nn.Conv2d | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys((r["shape"], r["provider"]) for r in rows))
    misses: dict[str, list[str]] = {"GPU time": [], "call time": []}
    for shape, provider in keys:
        f = next(r for r in rows if (r["shape"], r["provider"], r["mode"]) == (shape, provider, "forward"))
        b = next(r for r in rows if (r["shape"], r["provider"], r["mode"]) == (shape, provider, "forward+backward"))
        call = "| — | — "
        if "call_median_ms" in f:
            call = (
                f"| {f['call_median_ms']:.3f} / {b['call_median_ms']:.3f} "
                f"| {f['call_ratio']:.2f}× / {b['call_ratio']:.2f}× "
            )
        lines.append(
            f"| {shape} | {provider} | {f['median_ms']:.3f} | {f['ratio']:.2f}× | {f['vs_naive']:.2f}× | "
            f"{b['median_ms']:.3f} | {b['ratio']:.2f}× | {b['vs_naive']:.2f}× "
            f"{call}| {mem.get((shape, provider), 0) / 2**20:.1f} |"
        )
        if provider == "coordconv[auto]":
            for r in (f, b):
                for kind, ratio, naive in (
                    ("GPU time", r["ratio"], r["vs_naive"]),
                    ("call time", r.get("call_ratio"), r.get("call_vs_naive")),
                ):
                    if ratio is not None and (ratio > GPU_TARGETS[r["mode"]] or naive > 1.0):
                        misses[kind].append(f"{shape} {r['mode']}: {ratio:.2f}× nn.Conv2d, {naive:.2f}× naive")
    m = report["machine"]
    for kind, missed in misses.items():
        if kind == "call time" and not any("call_ratio" in r for r in rows):
            continue
        lines += [
            "",
            f"Targets for `auto` on {kind} (≤ {GPU_TARGETS['forward']:.2f}× nn.Conv2d forward and "
            "forward+backward, never slower than the naive concatenation): "
            + ("all met." if not missed else f"{len(missed)} missed:"),
        ]
        lines += [f"- {x}" for x in missed]
    choices = report.get("auto_choices") or []
    if choices:
        lines += choices_table(
            "What `auto` chose by measurement (first call of each layer signature, best of three, µs):",
            ("layer", "timed"),
            [(c["layer"], c["timed"], c["chosen"], c["times_us"]) for c in choices],
        )
    lines += [
        "",
        f"{report['date']}; {m['processor']}; torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
        f"TF32 {'on' if m['tf32'] else 'off'}; CUDA-event medians of {report['rounds']} repetitions, L2 "
        "flushed before each, providers interleaved. GPU time: the call queued whole behind a GPU spin "
        "before it is reached (its GPU work alone); call time: the call alone, host and GPU in series.",
    ]
    return "\n".join(lines)


def kernel_breakdown(shapes: Sequence[Shape], dtype_name: str = "bfloat16-cl", calls: int = 5) -> str:
    """Where the GPU time goes: per shape and provider, the CUDA kernels of ``calls`` forward+backward
    calls under the PyTorch profiler (total microseconds per call, the five largest kernels). Markdown."""
    from torch.profiler import ProfilerActivity, profile

    backends = [b for b in available_backends("cuda") if b not in ("reference", "triton")]
    dtype = torch.bfloat16 if dtype_name.startswith("bfloat16") else torch.float32
    fmt = torch.channels_last if dtype_name.endswith("-cl") else torch.contiguous_format
    lines = []
    for shape in shapes:
        providers = _providers(shape, backends, dtype, fmt == torch.channels_last, compiled=False)
        x = torch.randn(shape.n, shape.c, shape.h, shape.w, device="cuda", dtype=dtype)
        x = x.to(memory_format=fmt).requires_grad_()
        lines += ["", f"**{shape} {dtype_name}**, per forward+backward call:", ""]
        for name, fn in providers.items():
            params = list(getattr(fn, "parameters", list)())
            for _ in range(3):
                _call(fn, x, "forward+backward", params)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    _call(fn, x, "forward+backward", params)
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
            kernels.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in kernels) / calls
            top = "; ".join(f"{e.key[:60]} {e.device_time_total / calls:.0f}" for e in kernels[:5])
            lines.append(f"- {name}: {total:.0f} µs: {top}")
    return "\n".join(lines)


def _forward_with_policy(policy: str, fn: Callable, x: torch.Tensor) -> None:
    from .backends import native

    native.cuda_epilogue_policy(policy)
    _call(fn, x, "forward", [])


def epilogue_policies(
    shapes: Sequence[Shape], dtypes: Sequence[str] = ("float32", "bfloat16-cl"), reps: int = 15
) -> str:
    """The ``cuda`` backend's forward under each policy of its epilogue
    (:func:`coordconv_fused.backends.native.cuda_epilogue_policy`: rule, vectors, scalars, split),
    timed side by side with nn.Conv2d as in :func:`run` (GPU time: the call queued behind a GPU spin;
    L2 flushed; policies interleaved). Markdown: median ms and the ratio to nn.Conv2d."""
    from .backends import native

    policies = native.EPILOGUE_POLICIES
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    cycles_per_ms = _cycles_per_ms()
    lines = [
        "| shape | nn.Conv2d ms | " + " | ".join(f"cuda, {p} ms (× nn.Conv2d)" for p in policies) + " |",
        "|---|---:|" + "---:|" * len(policies),
    ]
    previous = native.cuda_epilogue_policy()
    try:
        for dtype_name in dtypes:
            dtype = torch.bfloat16 if dtype_name.startswith("bfloat16") else torch.float32
            for shape in shapes:
                providers = _providers(shape, ["cuda"], dtype, dtype_name.endswith("-cl"), compiled=False)
                conv, cuda = providers[FLOOR], providers["coordconv[cuda]"]
                x = torch.randn(shape.n, shape.c, shape.h, shape.w, device="cuda", dtype=dtype)
                if dtype_name.endswith("-cl"):
                    x = x.to(memory_format=torch.channels_last)
                runs: dict[str, Callable[[], None]] = {FLOOR: functools.partial(_call, conv, x, "forward", [])}
                for policy in policies:
                    runs[policy] = functools.partial(_forward_with_policy, policy, cuda, x)
                for fn in runs.values():  # (warm-up)
                    fn()
                    fn()
                torch.cuda.synchronize()
                sleep_cycles = int(cycles_per_ms * 3)
                times: dict[str, list[float]] = {n: [] for n in runs}
                names = list(runs)
                for r in range(reps):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        times[name].append(_timed(runs[name], flush, sleep_cycles))
                floor = statistics.median(times[FLOOR])
                cells = [
                    f"{statistics.median(times[p]):.3f} ({statistics.median(times[p]) / floor:.2f}×)" for p in policies
                ]
                lines.append(f"| {shape} {dtype_name} | {floor:.3f} | " + " | ".join(cells) + " |")
                del providers
                torch.cuda.empty_cache()
    finally:
        native.cuda_epilogue_policy(previous)
    return "\n".join(lines)
