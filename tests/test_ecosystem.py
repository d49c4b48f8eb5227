"""Everything users do with nn.Conv2d keeps working: ONNX export (onnxruntime), TorchScript
(script and trace), autocast, channels_last, DistributedDataParallel, and model conversion of a
real torchvision ResNet."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.distributed as dist
import torch.fx
import torch.fx.experimental.optimization
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision

from coordconv_fused import (
    AddCoords,
    CoordConv1d,
    CoordConv2d,
    CoordConv3d,
    CoordConvTranspose2d,
    convert_to_coordconv,
    coord_conv1d,
    coord_conv2d,
    coord_conv3d,
    coord_conv_transpose2d,
    fuse_conv_bn_eval,
)
from coordconv_fused.functional import add_coords
from coordconv_fused.testing import assert_autocast_grads_match_float64

EAGER_BACKENDS = ["torch", "cpp", "auto"]  # (triton: tests/test_triton.py)


# ---- ONNX ----------------------------------------------------------------------------------------

ONNX_MODELS = {
    "1d": (
        lambda: nn.Sequential(
            CoordConv1d(2, 4, 3, padding=1, with_r=True),
            nn.ReLU(),
            CoordConv1d(4, 3, 4, padding="same", padding_mode="reflect", coord_kernel_size=1),
        ),
        (2, 2, 11),
        [(1, 2, 5), (3, 2, 17)],
    ),
    "2d": (
        lambda: nn.Sequential(
            CoordConv2d(3, 8, 3, padding=1, with_r=True),
            nn.ReLU(),
            CoordConv2d(8, 4, 3, stride=2, padding=1, padding_mode="replicate"),
            CoordConv2d(4, 4, 4, padding="same", coord_kernel_size=1, with_r=True),
        ),
        (2, 3, 9, 7),
        [(1, 3, 5, 12), (4, 3, 1, 6), (3, 3, 16, 16)],
    ),
    "3d": (
        lambda: nn.Sequential(
            CoordConv3d(1, 2, 3, padding=1, with_r=True),
            CoordConv3d(2, 2, 2, coord_kernel_size=1, padding_mode="replicate", padding=1),
        ),
        (1, 1, 4, 5, 6),
        [(2, 1, 3, 3, 3), (1, 1, 6, 2, 5), (1, 1, 1, 4, 3)],
    ),
}


@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    make, shape, other_shapes = ONNX_MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    dims = {0: torch.export.Dim("batch")}
    dims.update({2 + i: torch.export.Dim(f"s{i}", min=1) for i in range(len(shape) - 2)})
    path = str(tmp_path / f"{name}.onnx")
    torch.onnx.export(model, (x,), path, dynamic_shapes=({k: v for k, v in dims.items()},), dynamo=True)
    import onnx

    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert all(not op.startswith("coordconv") for op in ops)  # only standard operators
    sess = ort.InferenceSession(path)
    for s in [shape] + other_shapes:
        xx = torch.randn(*s)
        got = sess.run(None, {sess.get_inputs()[0].name: xx.numpy()})[0]
        with torch.no_grad():
            expected = model(xx).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


# (the tracer's warnings come from the argument checks, which read sizes once; the outputs on other
# shapes, size-1 axes included, show that the computation follows them)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")
@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_torchscript_based_onnx_export_runs_in_onnxruntime(name, tmp_path):
    """The older exporter (``dynamo=False``, still what many scripts call): it traces the model with
    ``torch.jit.trace``, which gives sizes as 0-d tensors; dynamic batch and spatial axes."""
    make, shape, other_shapes = ONNX_MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "coord_weight"):
                m.coord_weight.normal_()
    path = str(tmp_path / f"{name}.onnx")
    axes = {0: "batch", **{2 + i: f"s{i}" for i in range(len(shape) - 2)}}
    torch.onnx.export(model, (torch.randn(*shape),), path, dynamo=False, input_names=["x"], dynamic_axes={"x": axes})
    import onnx

    assert all(not n.op_type.startswith("coordconv") for n in onnx.load(path).graph.node)
    sess = ort.InferenceSession(path)
    for s in [shape] + other_shapes:
        xx = torch.randn(*s)
        with torch.no_grad():
            expected = model(xx).numpy()
        np.testing.assert_allclose(sess.run(None, {"x": xx.numpy()})[0], expected, atol=1e-5, rtol=1e-5)


def test_aot_inductor_package_runs_and_matches_eager(tmp_path):
    """Deployment without Python: ``torch.export`` (plain ATen ops) compiled ahead of time by
    AOTInductor into a package, loaded back and run on several batch sizes."""
    torch.manual_seed(0)
    model = ONNX_MODELS["2d"][0]().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CoordConv2d):
                m.coord_weight.normal_()
    x = torch.randn(2, 3, 9, 7)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for n in (1, 2, 5):
        xx = torch.randn(n, 3, 9, 7)
        with torch.no_grad():
            torch.testing.assert_close(runner(xx), model(xx), atol=1e-5, rtol=1e-5)


# ---- TorchScript ---------------------------------------------------------------------------------


def _script_model():
    torch.manual_seed(0)
    return nn.Sequential(
        CoordConv2d(3, 8, 3, padding=1, with_r=True),
        nn.ReLU(),
        CoordConv2d(8, 4, 4, padding="same", padding_mode="reflect", coord_kernel_size=1),
        CoordConvTranspose2d(4, 2, 2, stride=2, with_r=True),
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_script_matches_eager_and_trains():
    model = _script_model()
    scripted = torch.jit.script(model)
    for shape in [(2, 3, 9, 7), (1, 3, 4, 11)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(scripted(x), model(x))
    torch.testing.assert_close(scripted(x[0]), model(x[0]))  # unbatched
    scripted(x).square().sum().backward()
    scripted_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for got, want in zip(scripted_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_trace_matches_eager():
    """Traced, every call takes the validating path: the tracer's check runs the model again and
    needs the same graph (a plan kept from the first call gave another), and no plan is keyed by
    the traced sizes (0-d tensors: a new plan for every traced call)."""
    from torch.utils._pytree import tree_leaves

    from coordconv_fused import functional

    model = _script_model()
    x = torch.randn(2, 3, 9, 7)
    functional.clear_plan_cache()
    traced = torch.jit.trace(model, x)
    assert not any(isinstance(leaf, torch.Tensor) for key in functional._PLANS for leaf in tree_leaves(key))
    torch.testing.assert_close(traced(x), model(x))
    x2 = torch.randn(3, 3, 9, 7)  # other batch size, same spatial size
    torch.testing.assert_close(traced(x2), model(x2))


# ---- autocast ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EAGER_BACKENDS + ["reference"])
@pytest.mark.parametrize("kwargs", [{"with_r": True}, {"padding_mode": "reflect", "coord_kernel_size": 1}], ids=str)
def test_autocast_bfloat16_follows_conv2d(backend, kwargs):
    torch.manual_seed(0)
    m = CoordConv2d(8, 16, 3, padding=1, backend=backend, **kwargs)
    plain = nn.Conv2d(8, 16, 3, padding=1, padding_mode=kwargs.get("padding_mode", "zeros"))
    x = torch.randn(4, 8, 12, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, plain_out = m(x), plain(x)
    assert out.dtype == plain_out.dtype == torch.bfloat16
    ref = m.float()(x)
    # Our low-precision error is of the order of nn.Conv2d's own.
    plain_err = (plain_out.float() - plain(x)).abs().max()
    assert (out.float() - ref).abs().max() <= 4 * plain_err + 1e-3
    out.float().sum().backward()
    assert m.weight.grad.dtype == m.coord_weight.grad.dtype == torch.float32
    assert_autocast_grads_match_float64(m, x, torch.bfloat16)


# ---- channels_last -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_channels_last_follows_conv2d(backend, padding_mode):
    torch.manual_seed(0)
    m = CoordConv2d(4, 6, 3, padding=1, padding_mode=padding_mode, with_r=True, backend=backend)
    plain = nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(2, 4, 9, 7).to(memory_format=torch.channels_last)
    out = m(x)
    expected_cl = plain(x).is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) == expected_cl
    m.backend = "reference"
    torch.testing.assert_close(out, m(x.contiguous()), atol=2e-5, rtol=2e-5)
    m_cl = m.to(memory_format=torch.channels_last)
    m_cl.backend = backend
    torch.testing.assert_close(m_cl(x), out, atol=2e-5, rtol=2e-5)


# ---- DistributedDataParallel ----------------------------------------------------------------------


def _ddp_model(backend="auto"):
    torch.manual_seed(0)
    return nn.Sequential(
        CoordConv2d(2, 8, 3, padding=1, with_r=True, backend=backend),
        nn.ReLU(),
        CoordConv2d(8, 4, 3, padding=1, coord_kernel_size=1, backend=backend),
        nn.Flatten(),
        nn.Linear(4 * 6 * 5, 3),
    )


def _ddp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, 6, 5, generator=g), torch.randn(8, 3, generator=g)


def _train(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _ddp_worker(rank, rendezvous, out_path):
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick, so no race with other processes for it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(_ddp_model())
        x, y = _ddp_data()
        _train(model, x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4])
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equals_single_process_reference(tmp_path):
    """DDP over 2 processes (backend auto: cpp on CPU) trains to the weights one process reaches with
    the reference backend (an independent implementation: a stale cache could not agree with it)."""
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), out_path), nprocs=2, join=True)
    ddp_state = torch.load(out_path)
    single = _ddp_model("reference")
    _train(single, *_ddp_data())
    assert ddp_state.keys() == single.state_dict().keys()
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert any("coord_weight" in k for k in ddp_state)


# ---- conversion of a real model -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_convert_torchvision_resnet18(backend):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        before = model(x)
    model = convert_to_coordconv(model, with_r=True, backend=backend)
    n_coord = sum(isinstance(m, CoordConv2d) for m in model.modules())
    assert n_coord == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20
    with torch.no_grad():
        after = model(x)
    if backend == "torch":
        assert torch.equal(after, before)
    else:
        torch.testing.assert_close(after, before)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    grad = model.conv1.coord_weight.grad.clone()
    model.zero_grad()
    for m in model.modules():
        if isinstance(m, CoordConv2d):
            m.backend = "reference"
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    torch.testing.assert_close(grad, model.conv1.coord_weight.grad, atol=1e-5, rtol=1e-4)
    assert grad.abs().max() > 1e-4  # a test of something: the coordinate filter does get a gradient
    opt.step()
    torch.testing.assert_close(model.conv1.coord_weight.detach(), -0.01 * model.conv1.coord_weight.grad)


# ---- torch.fx and __torch_function__ -------------------------------------------------------------


class _FxModel(nn.Module):
    """Layers of every kind plus a call of the functional form, as a traced model holds them."""

    def __init__(self):
        super().__init__()
        self.c1 = CoordConv1d(2, 3, 3, padding=1, padding_mode="reflect")
        self.c2 = CoordConv2d(3, 4, 3, padding=1, with_r=True)
        self.bn = nn.BatchNorm2d(4)
        self.t2 = CoordConvTranspose2d(4, 2, 3, stride=2)
        self.c3 = CoordConv3d(1, 2, 2, coord_kernel_size=1, padding=1)
        self.weight = nn.Parameter(torch.randn(2, 2, 3, 3))
        self.coord_weight = nn.Parameter(torch.randn(2, 2, 1, 1))
        self.add_coords = AddCoords(2, with_r=True)

    def forward(self, x1, x2, x3):
        y = self.t2(torch.relu(self.bn(self.c2(x2))))
        y = coord_conv2d(y, self.weight, self.coord_weight, None, padding=1)
        return self.c1(x1).sum() + y.sum() + self.c3(x3).square().sum() + self.add_coords(x2).square().mean()


def test_fx_symbolic_trace_records_one_call_per_layer_and_matches_eager():
    """``torch.fx.symbolic_trace`` (what FX quantization, ``torch.fx.experimental.optimization`` and
    torchvision's feature extraction build on): each layer is one call of the public functional form
    with its parameters as ``get_attr`` nodes, so the traced module trains the same parameters."""
    torch.manual_seed(0)
    model = _FxModel().double()
    inputs = tuple(torch.randn(*s, dtype=torch.float64) for s in [(2, 2, 9), (2, 3, 8, 7), (1, 1, 3, 4, 3)])
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    for fn in (coord_conv1d, coord_conv2d, coord_conv3d, coord_conv_transpose2d, add_coords):
        assert fn in targets, f"{fn.__name__} not recorded: {targets}"
    assert targets.count(coord_conv2d) == 2
    grads = []
    for module in (model, traced):
        module.zero_grad()
        out = module(*inputs)
        out.backward()
        grads.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, msg=lambda m, n=name: f"{n}: {m}")
    # conv-bn folding by FX leaves the CoordConv call alone (it scales weight and bias only)
    fused = torch.fx.experimental.optimization.fuse(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), model(*inputs))


def test_torchvision_feature_extractor_on_a_converted_resnet():
    torch.manual_seed(0)
    from torchvision.models.feature_extraction import create_feature_extractor

    model = convert_to_coordconv(torchvision.models.resnet18(weights=None, num_classes=10), with_r=True).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CoordConv2d):
                m.coord_weight.normal_(0, 0.1)  # (a converted layer starts at zero: make the term count)
    seen = {}
    model.layer2.register_forward_hook(lambda m, i, o: seen.__setitem__("layer2", o))
    x = torch.randn(2, 3, 64, 48)
    extractor = create_feature_extractor(model, {"layer2": "mid", "fc": "logits"})
    with torch.no_grad():
        got = extractor(x)
        want = model(x)
    torch.testing.assert_close(got["logits"], want)
    torch.testing.assert_close(got["mid"], seen["layer2"])


class _Tagged(torch.Tensor):
    """A tensor subclass that logs the functions ``__torch_function__`` is asked for."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_tensor_subclass_sees_the_functional_call(backend):
    """As for ``F.conv2d``: a subclass's ``__torch_function__`` gets the CoordConv call itself, and
    the result is of the subclass."""
    x = torch.randn(2, 3, 6, 5)
    w, cw, b = torch.randn(4, 3, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4)
    _Tagged.calls.clear()
    out = coord_conv2d(x.as_subclass(_Tagged), w, cw, b, padding=1, backend=backend)
    assert _Tagged.calls[0] is coord_conv2d
    assert type(out) is _Tagged
    torch.testing.assert_close(out.as_subclass(torch.Tensor), coord_conv2d(x, w, cw, b, padding=1, backend=backend))


# ---- folding a batch norm ------------------------------------------------------------------------

FUSE_CASES = {
    "2d": (lambda: CoordConv2d(3, 4, 3, padding=1, with_r=True), nn.BatchNorm2d(4), (2, 3, 7, 6)),
    "2d-groups-no-bias": (lambda: CoordConv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 6, 6)),
    "2d-separate": (
        lambda: CoordConv2d(3, 4, 3, padding=1, coord_kernel_size=1),
        nn.BatchNorm2d(4, affine=False),
        (1, 3, 5, 5),
    ),
    "1d": (lambda: CoordConv1d(2, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm1d(3), (2, 2, 9)),
    "3d": (lambda: CoordConv3d(1, 2, 2, padding=1), nn.BatchNorm3d(2), (1, 1, 3, 4, 3)),
    "transposed-2d": (lambda: CoordConvTranspose2d(3, 4, 3, stride=2, with_r=True), nn.BatchNorm2d(4), (2, 3, 4, 5)),
}


@pytest.mark.parametrize("name", list(FUSE_CASES))
def test_fuse_conv_bn_eval_equals_conv_then_batch_norm(name):
    torch.manual_seed(0)
    make, bn, shape = FUSE_CASES[name]
    conv, bn = make().double().eval(), bn.double().eval()
    with torch.no_grad():
        conv.coord_weight.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(*shape, dtype=torch.float64)
    fused = fuse_conv_bn_eval(conv, bn)
    assert type(fused) is type(conv) and fused is not conv
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
        conv_only = conv(x)
    torch.testing.assert_close(conv(x), conv_only)  # (the original layer is untouched)


def test_fuse_conv_bn_eval_refuses_what_it_cannot_fold():
    conv, bn = CoordConv2d(3, 4, 3), nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn_eval(conv, bn)
    with pytest.raises(TypeError, match="expects a CoordConv layer, got Conv2d"):
        fuse_conv_bn_eval(nn.Conv2d(3, 4, 3).eval(), bn.eval())
    with pytest.raises(ValueError, match="5 features, the layer 4 output channels"):
        fuse_conv_bn_eval(conv.eval(), nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="no running statistics"):
        fuse_conv_bn_eval(conv.eval(), nn.BatchNorm2d(4, track_running_stats=False).eval())
