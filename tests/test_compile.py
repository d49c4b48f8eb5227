"""torch.compile: a model of CoordConv layers compiles with no graph break (fullgraph=True),
with static and dynamic shapes, and matches eager in forward and backward."""

import pytest
import torch
import torch.nn as nn

from coordconv_fused import CoordConv1d, CoordConv2d, CoordConvTranspose2d


def _model(backend):
    torch.manual_seed(0)
    return nn.Sequential(
        CoordConv2d(3, 8, 3, padding=1, with_r=True, backend=backend),
        nn.ReLU(),
        CoordConv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect", backend=backend),
        nn.ReLU(),
        CoordConv2d(8, 4, 3, padding="same", coord_kernel_size=1, backend=backend),
        CoordConvTranspose2d(4, 2, 2, stride=2, backend=backend),
    )


def _fwd_bwd(fn, model, x, g):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(g)
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(backend, dynamic):
    torch._dynamo.reset()
    model = _model(backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for shape in [(2, 3, 12, 10), (3, 3, 9, 14)] if dynamic else [(2, 3, 12, 10)]:
        x = torch.randn(*shape)
        g = torch.randn(shape[0], 2, (shape[2] + 1) // 2 * 2, (shape[3] + 1) // 2 * 2)
        expected = _fwd_bwd(model, model, x, g)
        got = _fwd_bwd(compiled, model, x, g)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_compile_inductor_1d():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = CoordConv1d(2, 3, 3, padding=1, with_r=True)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 2, 11)
    torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)


def test_dynamic_shapes_do_not_recompile():
    torch._dynamo.reset()
    m = CoordConv2d(2, 3, 3, padding=1)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend=counter)
    for h, w in [(5, 6), (7, 9), (12, 8)]:
        x = torch.randn(2, 2, h, w)
        torch.testing.assert_close(compiled(x), m(x))
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compile_inductor_backward(backend):
    """Inductor (the default torch.compile backend) in forward and backward: outputs and every
    gradient equal eager's."""
    torch._dynamo.reset()
    model = _model(backend)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 12, 10)
    g = torch.randn(2, 2, 12, 10)
    expected = _fwd_bwd(model, model, x, g)
    got = _fwd_bwd(compiled, model, x, g)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
