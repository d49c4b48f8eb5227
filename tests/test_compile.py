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


@pytest.mark.parametrize(
    "size, kernel, stride, padding, dilation",
    [
        ((9, 7), (3, 3), (1, 1), (1, 1), (1, 1)),
        ((12, 10), (3, 2), (2, 1), (1, 0), (1, 2)),
        ((8, 8), (1, 1), (1, 1), (0, 0), (1, 1)),
    ],
)
def test_term_by_gemm_matches_the_convolution(size, kernel, stride, padding, dilation):
    """The GEMM form of the coordinate term (what a GPU compiles) equals the batch-of-one
    convolution (what the CPU compiles and exporters get), on the value and the filter's gradient,
    in float64: it runs only on a GPU under torch.compile, so its arithmetic is checked here."""
    from coordconv_fused.geometry import conv_output_size
    from coordconv_fused.ops.aten import term_by_gemm

    torch.manual_seed(0)
    coords = torch.randn(1, 3, *size, dtype=torch.float64)
    cw = torch.randn(5, 3, *kernel, dtype=torch.float64, requires_grad=True)
    out_sizes = [conv_output_size(n, k, s, p, p, d) for n, k, s, p, d in zip(size, kernel, stride, padding, dilation)]
    expected = torch.nn.functional.conv2d(coords, cw, None, stride, padding, dilation)
    got = term_by_gemm(coords, cw, out_sizes, stride, padding, dilation)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, cw, g)
    (got_grad,) = torch.autograd.grad(got, cw, g)
    torch.testing.assert_close(got_grad, expected_grad)


def test_cpu_compiles_the_term_as_a_convolution():
    """On the CPU the compiled graph holds two convolutions (data and coordinate term) and no GEMM
    over an im2col matrix (docs/tuning.md measured the convolution faster there)."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = CoordConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 9, 11)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend=capture)(x), m(x))
    (gm,) = graphs
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.convolution) == 2
    assert torch.nn.functional.unfold not in targets
