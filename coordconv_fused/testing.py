"""Test helpers shared by every backend's tests: problem cases and the parity check.

``assert_matches_reference(backend, case)`` runs a CoordConv on ``backend`` and on the reference,
with the same inputs and the same upstream gradient, and compares the output and the gradients of
``input``, ``weight``, ``coord_weight`` and ``bias``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from . import backends
from . import functional as CF
from .coords import num_coord_channels
from .spec import ConvSpec, make_spec

__all__ = [
    "Case",
    "kernel_events",
    "assert_matches_reference",
    "assert_gradients_keep_their_graph",
    "warm_up",
    "default_tolerances",
    "supported",
    "BACKENDS_UNDER_TEST",
    "why_backend_may_be_missing",
    "torch_ships_triton",
    "assert_low_precision_matches_float64",
    "assert_as_accurate_as_aten",
    "assert_autocast_grads_match_float64",
    "emulated_epilogue_policy",
]

# The backends a test run exercises per device type, named explicitly: a backend that should be
# there (see why_backend_may_be_missing) and is not fails the tests that name it, never skips them.
BACKENDS_UNDER_TEST: dict[str, tuple[str, ...]] = {
    "cpu": ("reference", "torch", "cpp", "triton", "auto"),
    "cuda": ("reference", "torch", "cuda", "triton", "auto"),
}


def torch_ships_triton() -> bool:
    """Whether the installed torch declares Triton as a dependency on this platform (its CUDA builds
    for Linux do): then Triton is expected to be importable."""
    import importlib.metadata

    parse: Callable[[str], Any] | None
    try:
        from packaging.requirements import Requirement

        parse = Requirement
    except ImportError:  # packaging missing: judge by the requirement's name alone
        parse = None
    try:
        requirements = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    for text in requirements:
        if parse is None:
            if text.split(";")[0].strip().lower().startswith("triton"):
                return True
            continue
        req = parse(text)
        if req.name.lower() == "triton" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            return True
    return False


def why_backend_may_be_missing(name: str, device: str = "cpu") -> str | None:
    """``None`` if backend ``name`` must be usable on ``device`` in this environment (a test run
    without it is a failure), or the reason it may legitimately be missing (its tests skip)."""
    import os

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if name == "cpp" and os.environ.get("COORDCONV_NO_EXTENSION") == "1":
        return "the package was installed with COORDCONV_NO_EXTENSION=1 (no C++ extension)"
    if name == "cuda" and os.environ.get("COORDCONV_NO_EXTENSION") == "1":
        return "the package was installed with COORDCONV_NO_EXTENSION=1 (no C++/CUDA extension)"
    if name == "triton":
        if not torch_ships_triton():
            return "this torch does not ship Triton"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    return None


@dataclasses.dataclass(frozen=True)
class Case:
    """One CoordConv problem: shapes and arguments (``sizes`` is the input's spatial size)."""

    sizes: tuple[int, ...]
    batch: int = 2
    in_channels: int = 3
    out_channels: int = 4
    kernel_size: int | tuple[int, ...] = 3
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] | str = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    padding_mode: str = "zeros"
    with_r: bool = False
    separate: bool = False
    bias: bool = True
    transposed: bool = False
    output_padding: int | tuple[int, ...] = 0

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    def _kernel(self) -> tuple[int, ...]:
        k = self.kernel_size
        return (k,) * self.ndim if isinstance(k, int) else tuple(k)

    def spec(self) -> ConvSpec:
        return make_spec(
            self.ndim,
            self._kernel(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
            self.with_r,
            self.separate,
            self.transposed,
            self.output_padding,
        )

    def make_tensors(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
    ) -> dict[str, Tensor | None]:
        """Random input and parameters (leaf tensors requiring grad)."""
        g = torch.Generator().manual_seed(seed)
        d = num_coord_channels(self.ndim, self.with_r)
        k = self._kernel()
        if self.transposed:
            w_shape = (self.in_channels, self.out_channels // self.groups, *k)
            cw_shape = (d, self.out_channels, *k)
        else:
            w_shape = (self.out_channels, self.in_channels // self.groups, *k)
            cw_shape = (self.out_channels, d, *((1,) * self.ndim if self.separate else k))

        def rand(*shape):
            t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
            return t.requires_grad_()

        return {
            "input": rand(self.batch, self.in_channels, *self.sizes),
            "weight": rand(*w_shape),
            "coord_weight": rand(*cw_shape),
            "bias": rand(self.out_channels) if self.bias else None,
        }

    def run(self, backend: str, tensors: dict[str, Tensor | None]) -> Tensor:
        """Call the functional API on ``backend``."""
        t = cast(dict[str, Any], tensors)
        if self.transposed:
            conv_t: Any = CF.CONV_TRANSPOSE_FUNCTIONS[self.ndim]
            return conv_t(
                t["input"],
                t["weight"],
                t["coord_weight"],
                t["bias"],
                self.stride,
                self.padding,
                self.output_padding,
                self.groups,
                self.dilation,
                self.with_r,
                backend,
            )
        return CF.CONV_FUNCTIONS[self.ndim](
            t["input"],
            t["weight"],
            t["coord_weight"],
            t["bias"],
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
            self.with_r,
            backend,
            coord_kernel_size=1 if self.separate else None,
        )


def supported(backend: str, case: Case) -> bool:
    """Whether ``backend`` implements ``case`` (e.g. the Triton kernels have no transposed form)."""
    return backend == "auto" or backends.get_backend(backend).supports(case.spec()) is None


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing a backend with the reference in ``dtype``."""
    return {
        torch.float64: (1e-10, 1e-9),
        torch.float32: (2e-5, 2e-5),
        torch.bfloat16: (5e-2, 2e-2),
        torch.float16: (1e-2, 5e-3),
    }[dtype]


def _prefixed(prefix: str) -> Callable[[str], str]:
    """An assert_close message: ``prefix`` before torch.testing's own."""
    return lambda message: f"{prefix}: {message}"


def _present(tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The tensors that are there (bias may be None)."""
    return {n: t for n, t in tensors.items() if t is not None}


def _grads(out: Tensor, grad_out: Tensor, tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    present = _present(tensors)
    names = list(present)
    grads = torch.autograd.grad(out, [present[n] for n in names], grad_out, allow_unused=True)
    return dict(zip(names, grads))


# The number of terms per input point up to which the input gradient is held to the unscaled
# tolerances (assert_matches_reference).
_INPUT_GRAD_DEPTH = 256


def assert_matches_reference(
    backend: str,
    case: Case,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    check: Sequence[str] = ("input", "weight", "coord_weight", "bias"),
) -> None:
    """Assert ``backend`` matches the reference on the output and every gradient of ``case``.

    Tolerances scale with the number of terms summed per output (so large reductions in low
    precision are judged fairly); ``atol``/``rtol`` override :func:`default_tolerances`.
    """
    d_atol, d_rtol = default_tolerances(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    tensors = case.make_tensors(dtype, device, seed)
    ref_tensors = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in tensors.items()}
    out = case.run(backend, tensors)
    ref = case.run("reference", ref_tensors)
    assert out.shape == ref.shape, f"{backend}: output shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype and out.device == ref.device
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{backend} output: {m}")
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(
        dtype=dtype, device=device
    )
    grads = _grads(out, grad_out, tensors)
    ref_grads = _grads(ref, grad_out, ref_tensors)
    for name in check:
        if name not in ref_grads:
            continue
        g, rg = grads[name], ref_grads[name]
        like = _present(tensors)[name]
        if rg is None:  # e.g. an empty batch: the reference has no path to this tensor
            rg = torch.zeros_like(like)
        if g is None:
            g = torch.zeros_like(like)
        # Gradients of parameters sum over the batch and the output: scale the tolerance with it. The
        # input's sums over the output channels of a group and the taps: beyond the depth that the
        # unscaled tolerances are set for (_INPUT_GRAD_DEPTH terms), scale it with that too (a 7x7
        # stem to 64 channels sums 3,136 terms per input point, ~4x a shallow layer's rounding).
        if name == "input":
            depth = case.out_channels // case.groups * math.prod(case._kernel())
            scale = max(1.0, (depth / _INPUT_GRAD_DEPTH) ** 0.5)
        else:
            scale = max(1.0, float(ref.numel() / max(1, ref.shape[1])) ** 0.5)
        torch.testing.assert_close(g, rg, atol=atol * scale, rtol=rtol, msg=_prefixed(f"{backend} grad of {name}"))


# ---- low precision against a float64 oracle, with error bounds derived from the dtype ------------


def _bound_scale(dtype: torch.dtype, reduction: int) -> float:
    """Relative error bound of a bf16/fp16 CoordConv result against its float64 value, as a
    multiple of the sum of the magnitudes of its terms: a few roundings to ``dtype`` (inputs,
    coordinates, intermediate and final results: ``4u``) plus float32 accumulation over
    ``reduction`` terms."""
    u = torch.finfo(dtype).eps / 2
    return 4 * u + reduction * 2.0**-24


def _magnitudes(case: Case, t64: dict[str, Tensor | None], grad64: Tensor) -> dict[str, Tensor]:
    """Sums of the magnitudes of the terms of the output and of every gradient, in float64:
    the reference on |input|, |weight|, |bias| and |grad| (the data part), plus ``max|coordinate|``
    times the coordinate filter's or the upstream gradient's magnitudes (the coordinate part)."""
    given = _present(t64)
    abs_t: dict[str, Tensor | None] = {n: None for n in t64}
    abs_t.update({n: t.detach().abs().requires_grad_() for n, t in given.items()})
    abs_t["coord_weight"] = torch.zeros_like(given["coord_weight"], requires_grad=True)
    out = case.run("reference", abs_t)
    ndim = case.ndim
    cmax = ndim**0.5 if case.with_r else 1.0
    cw = given["coord_weight"].detach().abs()
    if case.transposed:
        coord_out = cmax * cw.sum(dim=[0] + list(range(2, cw.dim())))
    else:
        coord_out = cmax * cw.flatten(1).sum(1)
    mags = {"output": out.detach() + coord_out.reshape(1, -1, *([1] * ndim))}
    data = _present({n: abs_t[n] for n in ("input", "weight", "bias")})
    grads = torch.autograd.grad(out, list(data.values()), grad64.abs(), allow_unused=True)
    mags.update({n: (g if g is not None else torch.zeros_like(t)) for (n, t), g in zip(data.items(), grads)})
    g_sum = grad64.abs().sum(dim=[0] + list(range(2, grad64.dim())))  # per output channel
    cw64 = given["coord_weight"]
    shape = (-1,) + (1,) * (cw64.dim() - 1)
    if case.transposed:
        mags["coord_weight"] = (cmax * g_sum.reshape(1, -1, *([1] * ndim))).expand_as(cw64)
    else:
        mags["coord_weight"] = (cmax * g_sum.reshape(shape)).expand_as(cw64)
    return mags


def _against_float64(
    backend: str, case: Case, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[list[tuple[str, Tensor, Tensor]], dict[str, Tensor | None], Tensor]:
    """``backend`` run in ``dtype`` and the reference in float64 on the same (``dtype``-exact) values
    and output gradient: ``(name, value as float64, float64 value)`` for the output and every
    gradient (zeros where a path is unused), the float64 tensors, and the output gradient."""
    tensors = case.make_tensors(dtype, device, seed)
    t64 = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in tensors.items()}
    out = case.run(backend, tensors)
    ref = case.run("reference", t64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    g = g.to(dtype=dtype, device=device)
    present, present64 = _present(tensors), _present(t64)
    names = list(present)
    got = torch.autograd.grad(out, list(present.values()), g, allow_unused=True)
    want = torch.autograd.grad(ref, [present64[n] for n in names], g.double(), allow_unused=True)
    pairs = [("output", out.double(), ref)]
    for name, value, expected in zip(names, got, want):
        expected = torch.zeros_like(present64[name]) if expected is None else expected
        pairs.append((name, torch.zeros_like(expected) if value is None else value.double(), expected))
    return pairs, t64, g.double()


def assert_low_precision_matches_float64(
    backend: str, case: Case, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0
) -> None:
    """``backend`` run in ``dtype`` against the float64 reference on the same (``dtype``-exact)
    values: the output and every gradient within the bound of :func:`_bound_scale` times the
    magnitudes of their terms, element by element."""
    pairs, t64, g64 = _against_float64(backend, case, dtype, device, seed)
    mags = _magnitudes(case, t64, g64)
    taps = math.prod(case._kernel())
    out_shape = pairs[0][2].shape
    n_points = out_shape[0] * math.prod(out_shape[2:])
    reduction = max((case.in_channels // case.groups + case.ndim + 1) * taps, n_points, case.out_channels * taps)
    scale = _bound_scale(dtype, reduction)
    for name, value, expected in pairs:
        err = (value - expected).abs()
        bound = scale * mags[name] + torch.finfo(dtype).tiny
        worst = (err / bound).max().item() if err.numel() else 0.0
        assert worst <= 1.0, f"{backend} {name} in {dtype}: error {worst:.2f}x the derived bound"


def _float32_errors(backend: str, case: Case, seed: int = 0) -> dict[str, tuple[float, float]]:
    """For ``backend``'s float32 output and every gradient on ``case``: the largest error against the
    float64 reference, and the largest float64 magnitude."""
    pairs, _, _ = _against_float64(backend, case, torch.float32, "cpu", seed)
    return {
        name: ((value - expected).abs().max().item(), expected.abs().max().item()) if expected.numel() else (0.0, 0.0)
        for name, value, expected in pairs
    }


def assert_as_accurate_as_aten(
    backend: str, case: Case, names: Sequence[str] = ("output", "input", "coord_weight", "bias"), factor: float = 4.0
) -> None:
    """``backend`` in float32 on the CPU, against the float64 reference: the error of the output and
    of each gradient in ``names`` at most ``factor`` times that of the reference's own float32
    result (ATen's convolutions and reductions); below that, a floor of a few float32 ulps at the
    scale of the result or of 1 (the test tensors are of unit scale), for results that cancel to
    near zero, where ATen may be lucky. Unlike a fixed tolerance, this holds for any depth of
    reduction, and it catches a kernel whose float32 sums lose accuracy that ATen's keep (e.g. one
    running sum over a large image)."""
    mine, aten = _float32_errors(backend, case), _float32_errors("reference", case)
    for name in names:
        if name not in mine:
            continue
        (err, magnitude), (aten_err, _) = mine[name], aten[name]
        bound = factor * max(aten_err, 8 * torch.finfo(torch.float32).eps * max(magnitude, 1.0))
        assert err <= bound, f"{backend} {name}: float32 error {err:.2e}, ATen's {aten_err:.2e} (bound {bound:.2e})"


def assert_autocast_grads_match_float64(module: Any, x: Tensor, dtype: torch.dtype) -> None:
    """The parameter gradients of a CoordConv ``module`` run under ``torch.autocast(dtype)`` (loss:
    the output's sum) against the float64 reference, within the derived bound."""
    import copy

    module.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype):
        out = module(x)
    out.float().sum().backward()
    got = {n: p.grad for n, p in module.named_parameters()}
    ref = copy.deepcopy(module).double()
    ref.backend = "reference"
    ref.zero_grad()
    ref(x.double()).sum().backward()
    mag = copy.deepcopy(ref)
    with torch.no_grad():
        mag.coord_weight.zero_()
    mag.zero_grad()
    mag(x.double().abs()).sum().backward()
    n_points = out.shape[0] * math.prod(out.shape[2:])
    cmax = module._ndim**0.5 if module.with_r else 1.0
    bounds = {
        "weight": mag.weight.grad,
        "bias": torch.full_like(ref.bias, n_points) if ref.bias is not None else None,
        "coord_weight": torch.full_like(ref.coord_weight, cmax * n_points),
    }
    scale = _bound_scale(dtype, n_points)
    for name, p in ref.named_parameters():
        err = (got[name].double() - p.grad).abs()
        worst = (err / (scale * bounds[name] + torch.finfo(dtype).tiny)).max().item()
        assert worst <= 1.0, f"{name} under autocast({dtype}): error {worst:.2f}x the derived bound"


def assert_layer_matches_reference(layer: Any, x: Tensor, backend: str) -> Tensor:
    """Run ``layer`` (a CoordConv module) on ``x`` with ``backend``, then with the reference on a
    contiguous copy of ``x``: the outputs, and the gradients of ``x`` and of every parameter of
    ``out.square().sum()``, must match. Returns the backend's output (its layout is the caller's
    to check)."""
    saved = layer.backend
    x = x.detach().requires_grad_()
    layer.zero_grad()
    layer.backend = backend
    out = layer(x)
    out.square().sum().backward()
    got = [x.grad] + [cast(Tensor, p.grad).clone() for p in layer.parameters()]
    xr = x.detach().contiguous().requires_grad_()
    layer.zero_grad()
    layer.backend = "reference"
    ref = layer(xr)
    ref.square().sum().backward()
    layer.backend = saved
    torch.testing.assert_close(out, ref)
    for g, r in zip(got, [xr.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(g, r)
    return out


# ---- the CUDA backend's code on the CPU ----------------------------------------------------------


def kernel_events(fn: Callable[[], object], name: str) -> tuple[int, int]:
    """Run ``fn`` under the PyTorch profiler and return how many events ``name`` (e.g.
    ``"coordconv_fused::avx512_direct"``, recorded by the extension's kernels) it recorded, and on how
    many distinct threads."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name == name]
    return len(events), len({e.thread for e in events})


_EMULATED: list = []


def device_path_torch_backend() -> backends.Backend:
    """A backend ``torch_device_path``: the ``torch`` backend's eager path as it runs off the CPU
    (the bias inside the coordinate term, nothing kept by value; with the extension, the calls after
    a signature's first made from C++), on CPU tensors. Register it with
    :func:`coordconv_fused.backends.temporary_backend`."""
    from .backends.aten import prepare_eager
    from .ops import aten

    def prepare(spec: ConvSpec):
        saved, aten.CPU_PATH = aten.CPU_PATH, False
        try:
            return prepare_eager(spec)
        finally:
            aten.CPU_PATH = saved

    def run(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
        return prepare(spec)(input, weight, coord_weight, bias)

    return backends.Backend("torch_device_path", run, devices=frozenset({"cpu"}), prepare=prepare)


def torch_backend_counting_python(spec: ConvSpec, cpu_path: bool = True) -> tuple[Callable[..., Tensor], list[int]]:
    """The ``torch`` backend's prepared call for ``spec`` (:func:`~.backends.aten.prepare_eager`;
    ``cpu_path=False``: the path that runs off the CPU, on CPU tensors too), and a list that grows
    by one on each call that runs the Python path rather than C++'s."""
    from .backends.aten import prepare_eager
    from .ops import aten

    python_calls: list[int] = []
    prepare = aten.prepare_forward

    def counting(spec: ConvSpec, on_signature=None):
        run = prepare(spec, on_signature)

        def call(*args):
            python_calls.append(1)
            return run(*args)

        return call

    saved = aten.prepare_forward, aten.CPU_PATH
    aten.prepare_forward, aten.CPU_PATH = counting, cpu_path
    try:
        return prepare_eager(spec), python_calls
    finally:
        aten.prepare_forward, aten.CPU_PATH = saved


def emulated_cuda_backend() -> backends.Backend:
    """A backend ``cuda_emulated`` running the CUDA backend's host code and kernel bodies on CPU
    tensors (an emulation of the CUDA grid, built as ``coordconv_fused._C_testing``), with the
    ``cuda`` backend's autograd: register it with :func:`coordconv_fused.backends.temporary_backend`.
    Raises ImportError when the test extension is not built."""
    if not _EMULATED:
        from .ops import call_coord_conv_op, register_native_coord_conv_op
        from .ops.schema import define_testing_ops

        define_testing_ops()
        from . import _C_testing  # type: ignore[attr-defined]  # noqa: F401  (registers the kernels)

        register_native_coord_conv_op("coord_conv_cuda_emulated")

        def run(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
            op = torch.ops.coordconv_fused.coord_conv_cuda_emulated
            return call_coord_conv_op(op, input, weight, coord_weight, bias, spec)

        _EMULATED.append(
            backends.Backend(
                "cuda_emulated", run, devices=frozenset({"cpu"}),
                supports=lambda spec: "transposed CoordConv is not emulated" if spec.transposed else None,
            )
        )  # fmt: skip
    return _EMULATED[0]


@contextlib.contextmanager
def emulated_epilogue_policy(policy: str) -> Iterator[None]:
    """Within the block, the emulated CUDA backend's forward epilogue runs under ``policy`` (one of
    :data:`coordconv_fused.backends.native.EPILOGUE_POLICIES`), as
    :func:`coordconv_fused.backends.native.cuda_epilogue_policy` sets the real one's."""
    emulated_cuda_backend()
    from . import _C_testing  # type: ignore[attr-defined]
    from .backends.native import _set_epilogue_policy

    previous = _set_epilogue_policy(_C_testing.epilogue_policy, policy)
    try:
        yield
    finally:
        _set_epilogue_policy(_C_testing.epilogue_policy, previous)


def assert_gradients_keep_their_graph(fn: Callable[..., Tensor], inputs: Sequence[Tensor]) -> None:
    """Assert that each first-order gradient of ``fn(*inputs)``, linear in the output's gradient
    ``g``, is recorded as a function of ``g`` under ``create_graph=True``, on a signature's first
    calls and on the later ones (which may take another path: the ``torch`` backend's C++).
    ``gradgradcheck`` cannot see a gradient that lost its graph: it checks only the first-order
    gradients that require grad, and a detached one passes."""
    for _ in range(3):
        out = fn(*inputs)
        g = torch.randn_like(out).requires_grad_()
        grads = torch.autograd.grad(out, list(inputs), g, create_graph=True)
        for i, grad in enumerate(grads):
            assert grad.requires_grad, f"the gradient of argument {i} lost its graph (create_graph=True)"


def warm_up(fn: Callable[..., Tensor], inputs: Sequence[Tensor], calls: int = 3) -> None:
    """Call ``fn(*inputs)`` ``calls`` times, so that the checks that follow (``gradcheck``,
    ``gradgradcheck``) see a signature's steady state: its first calls may take another path than the
    later ones (the ``torch`` backend's Python path before its C++ one), and those checks compute
    their analytical gradients on one of their first calls."""
    for _ in range(calls):
        fn(*inputs)
