"""``auto`` by measurement, the idea of ``torch.backends.cudnn.benchmark``: where several backends
can run a call and which is fastest depends on the device and the layer (on a GPU: cuDNN's speed,
the launch overhead, the kernel's), the first call of each layer signature times every candidate on
the call's own tensors and the fastest is kept for the process.

* Candidates: :data:`AUTO_MEASURED` by device type (CUDA: ``torch`` and ``cuda``), those usable
  there and supporting the call; with fewer than two, nothing is measured.
* Signature: the spec, the shapes, dtypes, device and memory format of the tensors, and whether
  a gradient is recorded (training is timed forward+backward, inference forward only).
* Cost: one warm-up and three timed calls per candidate, interleaved (GPU: CUDA events, one
  synchronisation at the end), on the first call of a signature only.
* ``COORDCONV_AUTO=fixed`` (read on every first call): no measurement, the order of
  ``AUTO_PREFERENCE`` as before -- for inputs whose shape changes from call to call, where every
  new shape would be measured (``cudnn.benchmark``'s caveat too). :func:`auto_choices` says what
  was chosen, with the times.

The candidates compute the same sums, so the choice changes results by floating-point
reassociation at most; it never writes to the caller's tensors (backward runs on detached copies).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..spec import ConvSpec
from .base import Backend

__all__ = ["AUTO_MEASURED", "measured_choice", "auto_choices", "clear_auto_choices", "measuring"]

AUTO_MEASURED: dict[str, tuple[str, ...]] = {"cuda": ("torch", "cuda")}
"""Backends ``auto`` times against each other on the first call of a signature, by device type."""

ROUNDS = 3

_CHOICES: dict[tuple, dict] = {}
_MAX_CHOICES = 4096
_LOCK = threading.Lock()


def measuring() -> bool:
    """Whether ``auto`` measures (``COORDCONV_AUTO`` unset or ``measure``; ``fixed`` turns it off)."""
    mode = os.environ.get("COORDCONV_AUTO", "measure") or "measure"
    if mode not in ("measure", "fixed"):
        raise ValueError(f"COORDCONV_AUTO must be 'measure' or 'fixed', got {mode!r}")
    return mode == "measure"


def _signature(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (tuple(t.shape), t.dtype, t.device, t.is_contiguous())


def _training(tensors: Sequence[Tensor | None]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _call_fn(backend: Backend, spec: ConvSpec, tensors: tuple, training: bool) -> Callable[[], object]:
    """One call of ``backend`` on copies of ``tensors`` that share their data: the forward, and in
    training the gradients of those that want one (discarded; no ``.grad`` is touched)."""
    fn = backend.bind(spec)
    if not training:

        def forward():
            with torch.no_grad():
                return fn(*tensors)

        return forward
    leaves = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors)
    wanted = [t for t in leaves if t is not None and t.requires_grad]

    def forward_backward():
        out = fn(*leaves)
        return torch.autograd.grad(out, wanted, torch.ones_like(out))

    return forward_backward


def _time(calls: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Best time (µs) of each call over :data:`ROUNDS` interleaved rounds after one warm-up each."""
    for call in calls.values():
        call()
    if device.type == "cuda":
        events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {n: [] for n in calls}
        for _ in range(ROUNDS):
            for name, call in calls.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(device)
        return {n: 1000.0 * min(s.elapsed_time(e) for s, e in pairs) for n, pairs in events.items()}
    best = {n: float("inf") for n in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            best[name] = min(best[name], 1e6 * (time.perf_counter() - t0))
    return best


def _describe(spec: ConvSpec, input: Tensor, weight: Tensor) -> str:
    layout = "" if input.is_contiguous() else " channels-last" if input.dim() > 3 else " strided"
    kind = "transposed " if spec.transposed else ""
    return (
        f"{tuple(input.shape)}{layout} {str(input.dtype).replace('torch.', '')} {kind}k={spec.kernel_size} "
        f"stride={spec.stride} padding={spec.padding} groups={spec.groups} weight {tuple(weight.shape)}"
    )


def measured_choice(
    candidates: Sequence[Backend],
    spec: ConvSpec,
    input: Tensor,
    weight: Tensor,
    coord_weight: Tensor,
    bias: Tensor | None,
) -> Backend:
    """The fastest of ``candidates`` (two or more) on this call, measured on its first call and
    remembered for its signature."""
    tensors = (input, weight, coord_weight, bias)
    training = _training(tensors)
    key = (spec, training, *(_signature(t) for t in tensors), tuple(b.name for b in candidates))
    with _LOCK:
        entry = _CHOICES.get(key)
    if entry is None:
        calls = {b.name: _call_fn(b, spec, tensors, training) for b in candidates}
        times = _time(calls, input.device)
        chosen = min(times, key=times.__getitem__)
        entry = {
            "layer": _describe(spec, input, weight),
            "timed": "forward+backward" if training else "forward",
            "chosen": chosen,
            "times_us": times,
        }
        with _LOCK:
            if len(_CHOICES) >= _MAX_CHOICES:
                _CHOICES.clear()
            _CHOICES.setdefault(key, entry)
    return next(b for b in candidates if b.name == entry["chosen"])


def auto_choices() -> list[dict]:
    """What ``auto`` chose by measurement so far: the layer, what was timed, the winner and each
    candidate's best time in µs."""
    with _LOCK:
        return [dict(e) for e in _CHOICES.values()]


def clear_auto_choices() -> None:
    """Forget the measured choices (the next call of each signature measures again)."""
    with _LOCK:
        _CHOICES.clear()
