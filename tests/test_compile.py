"""torch.compile: a model of CoordConv layers compiles with no graph break (fullgraph=True),
with static and dynamic shapes, and matches eager in forward and backward."""

import pytest
import torch
import torch._dynamo.testing
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


@pytest.mark.parametrize(
    "backend,device", [("auto", "cpu"), ("torch", "cpu"), ("auto", "cuda")], ids=["auto-cpu", "torch-cpu", "auto-cuda"]
)
def test_compile_inductor_backward(backend, device, exact_cuda):
    """Inductor (the default torch.compile backend) in forward and backward: outputs and every
    gradient equal eager's (on CUDA: the data convolution plus the coordinate term by a GEMM,
    ``ops.aten.term_by_gemm``, in inductor's graph; a GPU run only)."""
    torch._dynamo.reset()
    model = _model(backend).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 12, 10, device=device)
    g = torch.randn(2, 2, 12, 10, device=device)
    expected = _fwd_bwd(model, model, x, g)
    got = _fwd_bwd(compiled, model, x, g)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "backend,device",
    [("auto", "cpu"), ("torch", "cpu"), ("reference", "cpu"), ("torch", "cuda")],
    ids=["auto-cpu", "torch-cpu", "reference-cpu", "torch-cuda"],
)
def test_compile_inductor_dynamic_shapes(backend, device, exact_cuda):
    """Inductor with dynamic shapes, forward and backward (on the CPU the ``cpp`` op's fake kernel
    over symbolic sizes; the coordinate tensors a training graph saves are tensors of their own,
    not views: ``coordconv_fused.ops.arguments.batched``): outputs and every gradient equal eager's on three
    input sizes, one of them a batch of one."""
    torch._dynamo.reset()
    model = _model(backend).to(device)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for shape in [(2, 3, 12, 10), (3, 3, 9, 14), (1, 3, 16, 8)]:
        x = torch.randn(*shape, device=device)
        g = torch.randn(shape[0], 2, (shape[2] + 1) // 2 * 2, (shape[3] + 1) // 2 * 2, device=device)
        torch.testing.assert_close(_fwd_bwd(compiled, model, x, g), _fwd_bwd(model, model, x, g), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compile_inductor_channels_last_graph(backend):
    """A CoordConv layer after an ``nn.Conv2d``, whose graph inductor makes channels-last (on the CPU
    the ``cpp`` op then gets the channels-last tensor as it is: ``flexible_layout``), and a
    channels-last model: outputs and every gradient equal eager's, and the output's memory format too."""
    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), CoordConv2d(8, 6, 3, padding=1, backend=backend)),
        nn.Sequential(CoordConv2d(3, 6, 3, padding=1, with_r=True, backend=backend), nn.ReLU()).to(
            memory_format=torch.channels_last
        ),
    ]
    x = torch.randn(2, 3, 10, 9)
    for model, xin in zip(models, (x, x.contiguous(memory_format=torch.channels_last))):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        g = torch.randn(2, 6, 10, 9)
        expected = _fwd_bwd(model, model, xin, g)
        got = _fwd_bwd(compiled, model, xin, g)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            eager_out, compiled_out = model(xin), compiled(xin)
        torch.testing.assert_close(compiled_out, eager_out, atol=1e-4, rtol=1e-4)
        cl = torch.channels_last
        assert compiled_out.is_contiguous(memory_format=cl) == eager_out.is_contiguous(memory_format=cl)


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


def _compiled_graph_targets(m, x, backend_name="capture"):
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend=capture)(x), m(x))
    (gm,) = graphs
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def test_cpu_compiles_the_torch_backends_term_as_a_convolution():
    """Backend ``torch`` (plain PyTorch) compiles to two convolutions on the CPU (data and
    coordinate term) and no GEMM over an im2col matrix (docs/tuning.md measured the convolution
    faster there)."""
    targets = _compiled_graph_targets(CoordConv2d(4, 6, 3, padding=1, backend="torch"), torch.randn(2, 4, 9, 11))
    assert targets.count(torch.convolution) == 2
    assert torch.nn.functional.unfold not in targets
    assert not [t for t in targets if "coordconv_fused" in str(t)]


@pytest.mark.backend("cpp")
@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_cpu_compiles_the_layer_as_the_cpp_op(backend):
    """With the C++ extension, a compiled CPU layer is the ``cpp`` op, one node (it adds the
    coordinate term inside the convolution's output pass); under ``auto`` a transposed layer, which
    the op does not implement, stays ATen ops."""
    targets = _compiled_graph_targets(CoordConv2d(4, 6, 3, padding=1, backend=backend), torch.randn(2, 4, 9, 11))
    assert [str(t) for t in targets if "coordconv_fused" in str(t) or t is torch.convolution] == [
        "coordconv_fused.coord_conv_ext.default"
    ]
    if backend != "auto":
        return
    targets = _compiled_graph_targets(CoordConvTranspose2d(4, 6, 3, backend=backend), torch.randn(2, 4, 9, 11))
    assert targets.count(torch.convolution) == 2
    assert not [t for t in targets if "coordconv_fused" in str(t)]


@pytest.mark.backend("cpp")
def test_exported_graph_stays_aten():
    """torch.export keeps the coordinate term as ATen ops (a portable program), also on the CPU."""
    m = CoordConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 9, 11)
    ep = torch.export.export(m, (x,))
    targets = [str(node.target) for node in ep.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "coordconv_fused" in t], targets
    torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.backend("cpp")
@pytest.mark.parametrize(
    "variant", [{}, {"with_r": True, "stride": 2}, {"coord_kernel_size": 1}, {"padding_mode": "reflect"}], ids=str
)
def test_compiled_layer_follows_coord_weight(variant):
    """A compiled inference layer (the ``cpp`` op, whose coordinate term is cached while
    coord_weight holds the same values) makes the term again when they change: in place (the
    version counter moves), through ``.data`` (it does not), or a new parameter; every output
    equals the reference backend's."""
    torch.manual_seed(0)
    m = CoordConv2d(3, 5, 3, padding=1, **variant).eval()
    ref = CoordConv2d(3, 5, 3, padding=1, backend="reference", **variant).eval()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 3, 10, 9)

    def check():
        ref.load_state_dict(m.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)

    torch._dynamo.reset()
    check()
    check()
    with torch.no_grad():
        m.coord_weight.mul_(2)
    check()
    m.coord_weight.data.add_(1)
    check()
    m.coord_weight = torch.nn.Parameter(torch.randn_like(m.coord_weight))
    check()


@pytest.mark.backend("cpp")
def test_compiled_layer_trains():
    """A compiled layer trained for a few steps (coord_weight changes each step) follows eager
    step for step: outputs, and every gradient through the ``cpp`` op's backward in the graph."""
    torch.manual_seed(0)
    eager = nn.Sequential(CoordConv2d(3, 4, 3, padding=1, with_r=True), nn.ReLU())
    twin = nn.Sequential(CoordConv2d(3, 4, 3, padding=1, with_r=True), nn.ReLU())
    twin.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, twin)]
    for _ in range(3):
        x = torch.randn(2, 3, 8, 7)
        outs = []
        for model, fn, opt in zip((eager, twin), (eager, compiled), opts):
            opt.zero_grad()
            out = fn(x)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
