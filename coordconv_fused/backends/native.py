"""The C++/CUDA extension ``coordconv_fused._C``: backends ``cpp`` (CPU) and ``cuda``.

Both run the op ``coordconv_fused::coord_conv_ext``, declared in :mod:`coordconv_fused.ops.schema`,
with a CPU implementation (csrc/cpu/), when built with CUDA a CUDA one (csrc/cuda/), and its
autograd (csrc/autograd/); fake kernels are added here. If the extension is not built, the
pure-PyTorch backends still work and asking for ``cpp``/``cuda`` raises an error that says how to
build it. (The test-only
emulation of the CUDA kernels on the CPU is :func:`coordconv_fused.testing.emulated_cuda_backend`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import (
    call_coord_conv_op,
    define_native_ops,
    pre_pad,
    prepare_call,
    register_native_coord_conv_op,
    static_arguments,
)
from ..ops.arguments import exporting
from ..spec import ConvSpec
from .base import Backend

__all__ = [
    "LOAD_ERROR",
    "call_signature",
    "avx512_direct_available",
    "avx2_direct_available",
    "has_cuda_kernels",
    "coord_conv_cpp",
    "compiles_as_op",
    "cpp_backend",
    "cuda_backend",
    "kernel_choices",
    "clear_kernel_choices",
    "choice_confirm_calls",
    "cuda_epilogue_policy",
    "EPILOGUE_POLICIES",
]

define_native_ops()  # the schemas; the extension brings the kernels
try:
    from .. import _C  # type: ignore[attr-defined]  # (registers the CPU and CUDA kernels)

    LOAD_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    LOAD_ERROR = str(e)

call_signature = None if LOAD_ERROR is not None else getattr(_C, "call_signature", None)
"""``call_signature(input, weight, coord_weight, bias)``: the tensors' shapes, dtypes and devices
packed in one ``bytes`` (csrc/prepared_call.cpp), the part of a call's plan key that reads the
tensors, in one C call instead of a dozen attribute reads (0.9 -> 0.2 µs, Xeon); ``NotImplemented``
for what it does not take (tensor subclasses, symbolic sizes, a torch function mode). None without
the extension."""

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (add FORCE_CUDA=1 and CUDA_HOME for the CUDA kernels)"
)


def has_cuda_kernels() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "coordconv_fused::coord_conv_ext", "CUDA"
    )


def avx512_direct_available() -> bool:
    """Whether the ``cpp`` backend's AVX-512 direct kernel (shallow float32 layers, e.g. a network's
    first layer) runs on this CPU (``COORDCONV_NO_AVX512=1`` turns it off)."""
    return LOAD_ERROR is None and _C.avx512_direct_available()


def avx2_direct_available() -> bool:
    """Whether the same kernel's AVX2 build runs on this CPU (where AVX-512 is absent or turned off;
    elsewhere shallow layers take oneDNN plus the coordinate epilogue, or the row kernel)."""
    return LOAD_ERROR is None and _C.avx2_direct_available()


def kernel_choices() -> list[dict]:
    """What the ``cpp`` backend chose for each layer it has measured in this process: dicts with
    ``op`` ("forward", "input_grad", or "backward": the input gradient's choice where the weight
    gradient is wanted too, timed as the whole of each candidate's work), ``layer`` (shape, dtype,
    threads), ``chosen`` and
    ``candidates_us`` (each candidate's time, microseconds, best of the timed calls) and
    ``measurements`` (1, and one more each time the candidates are timed again,
    :func:`choice_confirm_calls` calls after the first; each keeps its best time of all, and the
    choice is made again).

    The choice is made by measurement the first time a layer is seen (``COORDCONV_CPU_KERNEL``:
    ``measure``, the default; ``heuristic`` for the fixed thresholds of docs/tuning.md; ``direct`` or
    ``aten`` to force one kind of implementation; an implementation's name, e.g. ``avx512_direct_6x4``,
    to force it where it is a candidate). Each dict also has ``key``, the layer's lookup key, with
    which :mod:`.choice_file` saves the choices to a file and restores them in a later process."""
    return [] if LOAD_ERROR is not None else _C.kernel_choices()


def choice_confirm_calls() -> tuple[int, ...]:
    """The calls of a layer, counted after its first, at which its measured choice is timed again
    (increasing; a first call may find the machine busy or the memory cold, for longer than a few
    calls: csrc/cpu/kernel_choice.h). Empty without the extension."""
    return () if LOAD_ERROR is not None else tuple(int(c) for c in _C.KERNEL_CHOICE_CONFIRM_CALLS)


def clear_kernel_choices() -> None:
    """Forget the measured choices (the next call of each layer measures again)."""
    if LOAD_ERROR is None:
        _C.clear_kernel_choices()


EPILOGUE_POLICIES = ("rule", "vectors", "scalars", "split")


def cuda_epilogue_policy(policy: str | None = None) -> str:
    """How the ``cuda`` backend's forward adds the coordinate term and the bias to cuDNN's output:
    ``"rule"`` (the default: one kernel, with 16-byte accesses on channels-last layers with many
    16-byte runs per sample, see csrc/gpu_host.h), ``"vectors"`` / ``"scalars"`` (that kernel with
    16-byte accesses wherever the output allows / nowhere), or ``"split"`` (one sample's terms
    computed once into a buffer, then added over the batch by a second kernel). Sets the
    process-wide policy when ``policy`` is given; returns the previous one. For timing them side by
    side (``coordconv-fused bench --device cuda --epilogue-policies``); results are the same bits
    under every policy."""
    if LOAD_ERROR is not None:
        raise RuntimeError(_cpp_unavailable())
    if policy is None:
        return EPILOGUE_POLICIES[_C.cuda_epilogue_policy(-1)]
    return _set_epilogue_policy(_C.cuda_epilogue_policy, policy)


def _set_epilogue_policy(switch, policy: str) -> str:
    """Sets a module's epilogue policy switch (``_C``'s, or the CUDA emulation's in ``_C_testing``)."""
    if policy not in EPILOGUE_POLICIES:
        raise ValueError(f"cuda_epilogue_policy: policy must be one of {EPILOGUE_POLICIES}, got {policy!r}")
    return EPILOGUE_POLICIES[switch(EPILOGUE_POLICIES.index(policy))]


def _cpp_unavailable() -> str | None:
    if LOAD_ERROR is not None:
        return f"the C++ extension coordconv_fused._C is not built ({LOAD_ERROR}); {_BUILD_HINT}"
    return None


def _cuda_unavailable() -> str | None:
    if LOAD_ERROR is not None:
        return _cpp_unavailable()
    if not has_cuda_kernels():
        return f"the extension was built without CUDA kernels; {_BUILD_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def _supports(spec: ConvSpec) -> str | None:
    if spec.transposed:
        return "transposed CoordConv is not implemented in the C++/CUDA kernels; use backend='torch'"
    return None


def coord_conv_cpp(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
    """Run the ``cpp``/``cuda`` backends (the op dispatches on the input's device)."""
    return call_coord_conv_op(torch.ops.coordconv_fused.coord_conv_ext, input, weight, coord_weight, bias, spec)


if LOAD_ERROR is None:
    register_native_coord_conv_op("coord_conv_ext", fused_backward=True)


def compiles_as_op(input: Tensor, spec: ConvSpec) -> bool:
    """Whether a graph ``torch.compile`` makes of this call keeps it as the ``cpp`` backend's op,
    one node: on the CPU with the extension, where the op adds the coordinate term inside the
    convolution's own output pass (csrc/cpu/forward.cpp), which a graph of ATen ops cannot: compiled
    ``CoordConv2d + ReLU`` 0.965-0.985x compiled ``Conv2d + ReLU`` on a Xeon, training 0.99-1.00x,
    against 1.03-1.05x and 1.15x with the data convolution and the term as separate nodes
    (docs/tuning.md). Not while exporting (a portable program of ATen ops), nor on a GPU or for a
    transposed layer."""
    return (
        LOAD_ERROR is None
        and not spec.transposed
        and input.device.type == "cpu"
        and torch.compiler.is_compiling()
        and not exporting()
    )


def _prepare(spec: ConvSpec):
    """The per-call path of a spec: ``_C.call_prepared`` with the op's non-tensor arguments converted
    once (csrc/prepared_call.cpp: a tiny layer's forward 27 → 14 µs on the Xeon), and torch.ops'
    path where an argument is not a plain tensor (``__torch_function__``)."""
    generic = prepare_call(torch.ops.coordconv_fused.coord_conv_ext, spec)
    pads, mode, args = static_arguments(spec)
    handle = _C.prepare_call("coordconv_fused::coord_conv_ext", *args)
    call_prepared = _C.call_prepared

    def call(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None) -> Tensor:
        padded = input if pads is None else pre_pad(input, pads, mode)
        out = call_prepared(handle, padded, weight, coord_weight, bias)
        return generic(input, weight, coord_weight, bias) if out is NotImplemented else out

    return call


cpp_backend: Backend = Backend(
    "cpp",
    coord_conv_cpp,
    devices=frozenset({"cpu"}),
    unavailable_reason=_cpp_unavailable,
    supports=_supports,
    prepare=_prepare,
)
cuda_backend: Backend = Backend(
    "cuda",
    coord_conv_cpp,
    devices=frozenset({"cuda"}),
    unavailable_reason=_cuda_unavailable,
    supports=_supports,
    prepare=_prepare,
)
