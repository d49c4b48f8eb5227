"""The backends: the registry, the single dispatch point every CoordConv call goes through, and
``auto``.

A backend is a :class:`Backend` record: a function ``fn(input, weight, coord_weight, bias, spec)``
on a batched, validated input and a :class:`~coordconv_fused.spec.ConvSpec`, where it runs and what it
supports. One module per backend, named for what it is, all registered at the end of this file:

=============  =====================  =========================================================
backend        module                 what
=============  =====================  =========================================================
``reference``  :mod:`.reference`      the explicit concatenation: the oracle
``torch``      :mod:`.aten`           the ATen decomposition (op ``coordconv_fused::coord_conv``)
``cpp``        :mod:`.native`         the C++ extension on CPU tensors (op ``coord_conv_ext``)
``cuda``       :mod:`.native`         the same op's CUDA kernels
``triton``     :mod:`.triton`         the Triton kernels (op ``coord_conv_triton``)
=============  =====================  =========================================================

``backend="auto"`` takes the first usable backend of the device's preference list
(:data:`AUTO_PREFERENCE`), except where several are candidates for measurement
(:data:`~.measured.AUTO_MEASURED`, CUDA: ``torch`` and ``cuda``): there the first call of each layer
signature times them and keeps the fastest (:mod:`.measured`). Tests and experiments register their
own with :func:`temporary_backend`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..spec import ConvSpec
from . import aten, native, reference, triton
from . import choice_file as choice_file  # (COORDCONV_CPU_KERNEL_CACHE is read at import)
from .base import Backend, BackendFn
from .measured import AUTO_MEASURED, auto_choices, clear_auto_choices, measured_choice, measuring

__all__ = [
    "Backend",
    "BackendFn",
    "register_backend",
    "unregister_backend",
    "temporary_backend",
    "available_backends",
    "backend_names",
    "get_backend",
    "resolve_backend",
    "dispatch",
    "compiles_as_op",
    "generation",
    "AUTO_PREFERENCE",
    "AUTO_MEASURED",
    "auto_choices",
    "clear_auto_choices",
]

_BACKENDS: dict[str, Backend] = {}
_GENERATION = [0]  # bumped by every change of the registry (resolved calls are cached per generation)


def generation() -> int:
    """A number that changes whenever a backend is registered or removed."""
    return _GENERATION[0]


# ``auto``'s order of preference by device type; names not registered or not available are skipped.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("torch",),
    "cuda": ("torch",),
}
_AUTO_FALLBACK = "torch"


def register_backend(backend: Backend, *, prefer_on: dict[str, int] | None = None) -> None:
    """Register ``backend``; ``prefer_on={"cuda": 0}`` inserts it into ``auto``'s order there."""
    _BACKENDS[backend.name] = backend
    _GENERATION[0] += 1
    for device, position in (prefer_on or {}).items():
        order = [n for n in AUTO_PREFERENCE.get(device, ()) if n != backend.name]
        order.insert(position, backend.name)
        AUTO_PREFERENCE[device] = tuple(order)


def unregister_backend(name: str) -> None:
    """Remove the backend ``name`` (and its place in ``auto``'s order)."""
    del _BACKENDS[name]
    _GENERATION[0] += 1
    for device, order in AUTO_PREFERENCE.items():
        AUTO_PREFERENCE[device] = tuple(n for n in order if n != name)


@contextlib.contextmanager
def temporary_backend(backend: Backend) -> Iterator[str]:
    """Register ``backend`` for the duration of a ``with`` block (tests, experiments); yields its
    name. ``auto`` never picks it."""
    if backend.name in _BACKENDS:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    _GENERATION[0] += 1
    try:
        yield backend.name
    finally:
        _BACKENDS.pop(backend.name, None)
        _GENERATION[0] += 1


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (``KeyError`` if there is none)."""
    return _BACKENDS[name]


def backend_names() -> list[str]:
    """Names of every registered backend, usable here or not (see :func:`available_backends`)."""
    return sorted(_BACKENDS)


def _usable(backend: Backend, device_type: str | None) -> bool:
    if backend.unavailable_reason() is not None:
        return False
    return device_type is None or backend.devices is None or device_type in backend.devices


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable on this machine (on ``device``'s type, if given)."""
    device_type = torch.device(device).type if device is not None else None
    return [name for name, b in _BACKENDS.items() if _usable(b, device_type)]


def _auto_eligible(name: str, input: Tensor, weight: Tensor, spec: ConvSpec) -> Backend | None:
    """The backend ``name`` if ``auto`` may run it for this call (registered, usable on the input's
    device, supporting the spec, and its own heuristic agreeing), else None."""
    b = _BACKENDS.get(name)
    if b is None or not _usable(b, input.device.type) or b.supports(spec) is not None:
        return None
    return b if b.auto_ok(input, weight, spec) else None


def _measured_candidates(input: Tensor, weight: Tensor, spec: ConvSpec) -> list[Backend]:
    """The backends ``auto`` times against each other for this call (none where it does not measure:
    switched off, fake or traced tensors, or fewer than two candidates)."""
    names = AUTO_MEASURED.get(input.device.type, ())
    if not names or type(input) is not torch.Tensor or torch.compiler.is_compiling() or not measuring():
        return []
    if input.is_cuda and torch.cuda.is_current_stream_capturing():  # (timing would break the capture)
        return []
    usable = [b for b in (_auto_eligible(n, input, weight, spec) for n in names) if b is not None]
    return usable if len(usable) > 1 else []


def resolve_backend(
    name: str,
    input: Tensor,
    weight: Tensor,
    spec: ConvSpec,
    coord_weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Backend:
    """The backend ``name`` (or ``auto``'s choice) for these tensors; raises if unusable. Given
    ``coord_weight`` (and ``bias``), ``auto`` may choose by measurement (:mod:`.measured`)."""
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {type(name).__name__}")
    device = input.device
    if name == "auto":
        if coord_weight is not None:
            candidates = _measured_candidates(input, weight, spec)
            if candidates:
                return measured_choice(candidates, spec, input, weight, coord_weight, bias)
        for candidate in AUTO_PREFERENCE.get(device.type, ()):
            b = _auto_eligible(candidate, input, weight, spec)
            if b is not None:
                return b
        return _BACKENDS[_AUTO_FALLBACK]
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {sorted(_BACKENDS)}")
    b = _BACKENDS[name]
    reason = b.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    if b.devices is not None and device.type not in b.devices:
        raise RuntimeError(
            f"backend {name!r} runs on {sorted(b.devices)} tensors, but the input is on {device}; "
            f"use backend='auto' or one of {available_backends(device)}"
        )
    reason = b.supports(spec)
    if reason is not None:
        raise ValueError(f"backend {name!r} does not support this call: {reason}")
    return b


def dispatch(
    name: str, input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec
) -> Tensor:
    """Run the CoordConv described by ``spec`` on backend ``name``."""
    return resolve_backend(name, input, weight, spec, coord_weight, bias).fn(input, weight, coord_weight, bias, spec)


def compiles_as_op(name: str, input: Tensor, spec: ConvSpec) -> bool:
    """Whether ``torch.compile`` keeps a call on backend ``name`` as the ``cpp`` op, one node
    (``auto`` and ``cpp`` on the CPU with the extension: :func:`.native.compiles_as_op`); elsewhere
    the graph has the layer as ATen ops (:func:`coordconv_fused.ops.aten.composite`)."""
    return name in ("auto", "cpp") and native.compiles_as_op(input, spec)


register_backend(reference.backend)
register_backend(aten.backend)
register_backend(triton.backend)
register_backend(native.cpp_backend, prefer_on={"cpu": 0})
register_backend(native.cuda_backend)

# (older import paths)
coord_conv_decomposed = aten.coord_conv_decomposed
coord_conv_ref = reference.coord_conv_ref
