"""Second-order gradients on every backend: ``gradgradcheck`` in float64 and a WGAN-GP-style
gradient-penalty step against the reference.

Every backend's first-order backward may be a fused kernel or an opaque op; when autograd records a
graph of the gradients (``create_graph=True``) they all take the differentiable ATen backward
(``coordconv_fused.ops.autograd.differentiable_backward``; for the C++ ops, their C++ autograd with
``coord_weight_grad_aten``). Before that, the ``cpp`` backend (``auto``'s
choice on CPU) returned silently wrong second-order gradients.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from coordconv_fused import CoordConv1d, CoordConv2d, CoordConv3d, coord_conv2d
from coordconv_fused.testing import Case, assert_gradients_keep_their_graph, warm_up

CPU_BACKENDS = ["reference", "torch", "cpp", "auto", "cuda_emulated"]

CASES = [
    Case((4, 3), batch=1, in_channels=2, out_channels=2, padding=1),
    Case((4, 3), batch=2, in_channels=2, out_channels=2, padding=1, with_r=True),
    Case((5, 4), batch=1, in_channels=2, out_channels=2, kernel_size=2, padding="same", separate=True, with_r=True),
    Case((5, 4), batch=1, in_channels=2, out_channels=2, stride=2, padding=1, padding_mode="reflect"),
    Case((4, 4), batch=1, in_channels=1, out_channels=2, padding=1, padding_mode="replicate", separate=True),
    Case((4, 3), batch=1, in_channels=2, out_channels=2, padding=1, padding_mode="circular", with_r=True),
    Case((4, 3), batch=1, in_channels=2, out_channels=4, groups=2, padding=1, dilation=(2, 1)),
    Case((6,), batch=2, in_channels=2, out_channels=2, padding=1, with_r=True),
    Case((3, 3, 2), batch=1, in_channels=1, out_channels=2, kernel_size=2, padding=1, with_r=True),
    Case((3, 4), batch=1, in_channels=2, out_channels=2, transposed=True, stride=2, with_r=True),
]


def _check(backend, case, device="cpu"):
    tensors = case.make_tensors(torch.float64, device, seed=5)
    names = [n for n, t in tensors.items() if t is not None]

    def fn(*args):
        return case.run(backend, dict(zip(names, args)))

    warm_up(fn, [tensors[n] for n in names])
    assert torch.autograd.gradgradcheck(fn, tuple(tensors[n] for n in names), eps=1e-6, atol=1e-6)
    assert_gradients_keep_their_graph(fn, [tensors[n] for n in names])


# (the C++/CUDA and Triton kernels have no transposed form: those pairs are not generated)
PAIRS = [(b, c) for c in CASES for b in CPU_BACKENDS if not (c.transposed and b in ("cpp", "cuda_emulated"))]


@pytest.mark.parametrize("backend,case", PAIRS, ids=[f"{b}-{c}" for b, c in PAIRS])
def test_gradgradcheck(backend, case, request):
    if backend == "cuda_emulated":
        request.getfixturevalue("emulated_cuda")
    _check(backend, case)


@pytest.mark.backend("triton")
@pytest.mark.parametrize("case", [CASES[7]], ids=str)
def test_gradgradcheck_triton(case):
    """The Triton kernels' backward (first order: the opaque coordinate-gradient op) under the
    interpreter; on small problems, the interpreter being slow."""
    _check("triton", case)


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton", "auto"])
@pytest.mark.parametrize("device", ["cuda"])
def test_gradgradcheck_cuda(backend, device):
    for case in CASES[:3] + [CASES[7]]:
        _check(backend, case, device)


def _gradient_penalty_step(layer_cls, backend, shape, device="cpu", **kwargs):
    """One discriminator step of WGAN-GP: critic loss plus the penalty (||grad_x D(x)|| - 1)^2 on
    interpolates, whose gradient needs the second derivative of every layer. Returns the
    parameters' gradients."""
    torch.manual_seed(0)
    layer = layer_cls(shape[1], 4, 3, padding=1, backend=backend, **kwargs).double().to(device)
    head = torch.nn.Linear(4, 1).double().to(device)
    real = torch.randn(*shape, dtype=torch.float64, device=device)
    fake = torch.randn(*shape, dtype=torch.float64, device=device)

    def critic(x):
        h = torch.nn.functional.softplus(layer(x))  # non-linear: the penalty's gradient depends on it
        return head(h.flatten(2).mean(2))

    alpha = torch.rand(shape[0], *([1] * (len(shape) - 1)), dtype=torch.float64, device=device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_()
    warm_up(critic, [mixed])  # (the penalty's second derivative then goes through the steady state)
    (grad_x,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
    loss.backward()
    return {
        f"{part}.{name}": p.grad
        for part, module in (("layer", layer), ("head", head))
        for name, p in module.named_parameters()
    }


@pytest.mark.parametrize("backend", ["torch", "cpp", "auto", "torch_device_path"])
@pytest.mark.parametrize(
    "layer_cls,shape,kwargs",
    [
        (CoordConv2d, (3, 2, 6, 5), {"with_r": True}),
        (CoordConv2d, (2, 2, 6, 6), {"coord_kernel_size": 1, "padding_mode": "reflect", "stride": 2}),
        (CoordConv1d, (3, 2, 9), {}),
        (CoordConv3d, (2, 1, 3, 4, 3), {"with_r": True}),
    ],
    ids=["2d-with_r", "2d-separate-reflect-stride2", "1d", "3d"],
)
def test_gradient_penalty_equals_reference(backend, layer_cls, shape, kwargs, request):
    if backend == "torch_device_path":
        request.getfixturevalue("device_path")
    got = _gradient_penalty_step(layer_cls, backend, shape, **kwargs)
    want = _gradient_penalty_step(layer_cls, "reference", shape, **kwargs)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
        if name != "head.bias":  # (the critic difference cancels the head's bias)
            assert g.abs().max() > 1e-3, f"{name}: the loss's gradient should not vanish here"


def _maml_step(backend, device="cpu"):
    """One MAML meta-step: an inner SGD step whose gradients stay in the graph, then the outer loss
    of the adapted layer; returns the meta-gradients of the original parameters (second derivatives
    through every gradient of the layer, coord_weight's included)."""
    torch.manual_seed(0)
    layer = CoordConv2d(2, 3, 3, padding=1, with_r=True, backend=backend).double().to(device)
    x, x2 = torch.randn(2, 4, 2, 6, 5, dtype=torch.float64, device=device)
    t, t2 = torch.randn(2, 4, 3, 6, 5, dtype=torch.float64, device=device)
    params = [layer.weight, layer.coord_weight, layer.bias]
    warm_up(layer, [x])  # (both steps then go through the steady state)
    warm_up(lambda *p: coord_conv2d(x2, *p, padding=1, with_r=True, backend=backend), [p * 1 for p in params])
    inner = torch.nn.functional.softplus(layer(x)).sub(t).square().mean()
    grads = torch.autograd.grad(inner, params, create_graph=True)
    w, cw, b = (p - 0.5 * g for p, g in zip(params, grads))
    out = coord_conv2d(x2, w, cw, b, padding=1, with_r=True, backend=backend)
    outer = torch.nn.functional.softplus(out).sub(t2).square().mean()
    return torch.autograd.grad(outer, params)


@pytest.mark.parametrize("backend", ["torch", "cpp", "auto", "torch_device_path"])
def test_maml_meta_gradient_equals_reference(backend, request):
    if backend == "torch_device_path":
        request.getfixturevalue("device_path")
    for got, want, name in zip(_maml_step(backend), _maml_step("reference"), ("weight", "coord_weight", "bias")):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.backend("triton")
def test_gradient_penalty_triton():
    got = _gradient_penalty_step(CoordConv2d, "triton", (2, 2, 5, 4), with_r=True)
    want = _gradient_penalty_step(CoordConv2d, "reference", (2, 2, 5, 4), with_r=True)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton", "auto"])
@pytest.mark.parametrize("device", ["cuda"])
def test_gradient_penalty_cuda(backend, device):
    got = _gradient_penalty_step(CoordConv2d, backend, (3, 2, 6, 5), device, with_r=True)
    want = _gradient_penalty_step(CoordConv2d, "reference", (3, 2, 6, 5), device, with_r=True)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-9, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    for got, want in zip(_maml_step(backend, device), _maml_step("reference", device)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-8)


class _OpLog(TorchDispatchMode):
    """The ops that reach the backend kernels (below autograd) while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.backend("cpp")
def test_first_order_backward_keeps_the_fused_path():
    """The differentiable route (ATen ops and ``coord_weight_grad_aten``) is taken only when a
    graph of the gradients is recorded: a plain backward runs the cpp backend's fused backward op."""
    layer = CoordConv2d(2, 3, 3, padding=1, backend="cpp")
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    loss = layer(x).square().sum()
    with _OpLog() as plain:
        loss.backward()
    assert "coordconv_fused.coord_conv_ext_backward" in plain.names
    assert not any("coord_weight_grad" in n for n in plain.names)
    loss = layer(x).square().sum()
    with _OpLog() as recorded:
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert "coordconv_fused.coord_conv_ext_backward" not in recorded.names
    assert "aten.convolution_backward" in recorded.names
    g.sum().backward()
    assert layer.coord_weight.grad is not None
