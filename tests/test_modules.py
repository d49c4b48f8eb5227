"""The modules: constructor contract, initialisation, conversion, serialisation, unbatched input."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import coordconv_fused as cc
from coordconv_fused import (
    CoordConv1d,
    CoordConv2d,
    CoordConv3d,
    CoordConvTranspose1d,
    CoordConvTranspose2d,
    CoordConvTranspose3d,
    convert_to_coordconv,
)


def test_is_a_conv2d_with_coord_weight():
    m = CoordConv2d(3, 8, 3, stride=2, padding=1, dilation=1, groups=1, bias=True, padding_mode="reflect", with_r=True)
    assert isinstance(m, nn.Conv2d)
    assert m.coord_weight.shape == (8, 3, 3, 3)
    assert m.padding_mode == "reflect" and m.stride == (2, 2)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["weight", "bias", "coord_weight"]
    r = repr(m)
    assert "with_r=True" in r and "coord_kernel_size=None" in r and "backend='auto'" in r


@pytest.mark.parametrize("cls,nd", [(CoordConv1d, 1), (CoordConv2d, 2), (CoordConv3d, 3)])
def test_shapes_per_rank(cls, nd):
    m = cls(4, 6, 3, groups=2, coord_kernel_size=1)
    assert m.coord_weight.shape == (6, nd, *(1,) * nd)
    assert m.coord_kernel_size == 1
    x = torch.randn(2, 4, *(5,) * nd)
    assert m(x).shape == (2, 6, *(3,) * nd)
    assert m(x[0]).shape == (6, *(3,) * nd)  # unbatched input, like nn.Conv


def test_coord_kernel_size_values():
    assert CoordConv2d(1, 1, 3, coord_kernel_size=(1, 1)).separate
    for bad in (2, 3, (3, 3), 0, "1"):
        with pytest.raises(ValueError, match="coord_kernel_size"):
            CoordConv2d(1, 1, 3, coord_kernel_size=bad)


def test_unknown_backend_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        CoordConv2d(1, 1, 3, backend="cuda-magic")


def test_init_uses_concatenated_fan_in():
    torch.manual_seed(0)
    m = CoordConv2d(16, 64, 3, groups=2, with_r=True)
    bound = 1 / math.sqrt((16 // 2 + 3) * 9)
    for p in (m.weight, m.coord_weight, m.bias):
        assert p.abs().max().item() <= bound
        assert p.abs().max().item() > 0.9 * bound  # uniform over the whole range
    # Same distribution as nn.Conv2d with the coordinate channels concatenated (groups == 1).
    ref = nn.Conv2d(16 + 2, 64, 3)
    m1 = CoordConv2d(16, 64, 3)
    assert math.isclose(ref.weight.abs().max().item(), m1.weight.abs().max().item(), rel_tol=0.05)


def test_device_and_dtype_follow_factory_kwargs():
    m = CoordConv2d(2, 3, 3, dtype=torch.float64)
    assert m.coord_weight.dtype == torch.float64
    out = m(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert out.dtype == torch.float64
    m16 = CoordConv2d(2, 3, 3).to(torch.bfloat16)
    assert m16(torch.randn(1, 2, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("with_r,coord_kernel_size", [(False, None), (True, None), (True, 1)])
def test_from_conv_is_exact(backend, with_r, coord_kernel_size):
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="replicate")
    m = CoordConv2d.from_conv(conv, with_r=with_r, coord_kernel_size=coord_kernel_size)
    m.backend = backend
    x = torch.randn(2, 3, 9, 7)
    if backend == "torch":
        assert torch.equal(m(x), conv(x))
    else:
        torch.testing.assert_close(m(x), conv(x))
    assert m.coord_weight.abs().sum() == 0
    assert m.weight.data_ptr() != conv.weight.data_ptr()


def test_from_conv_rejects_wrong_rank():
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        CoordConv2d.from_conv(nn.Conv1d(1, 1, 3))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.head = nn.Conv1d(4, 2, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = self.up(self.down(x))
        return self.head(x.flatten(2))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_convert_to_coordconv_keeps_outputs_and_trains(backend):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.randn(2, 3, 10, 12)
    before = model(x)
    model = convert_to_coordconv(model, with_r=True, backend=backend)
    assert isinstance(model.stem[0], CoordConv2d) and isinstance(model.block[2], CoordConv2d)
    assert isinstance(model.down, CoordConv2d) and isinstance(model.head, CoordConv1d)
    assert type(model.up) is nn.ConvTranspose2d  # only nn.Conv1d/2d/3d are converted
    after = model(x)
    if backend == "torch":
        assert torch.equal(after, before)
    else:
        torch.testing.assert_close(after, before)
    after.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for m in model.modules():
        if hasattr(m, "coord_weight"):
            m.backend = "reference"
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for m in (model.stem[0], model.down, model.head):
        assert m.coord_weight.grad.abs().max() > 1e-6
    # Converting twice changes nothing.
    assert convert_to_coordconv(model) is model and isinstance(model.down, CoordConv2d)


def test_convert_root_conv():
    conv = nn.Conv3d(2, 3, 3)
    new = convert_to_coordconv(conv, coord_kernel_size=1)
    assert isinstance(new, CoordConv3d) and new.separate


def _roundtrip_state(m):
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CoordConv2d(3, 4, 3, padding=1, with_r=True),
        lambda: CoordConv1d(3, 4, 3, coord_kernel_size=1),
        lambda: CoordConvTranspose2d(3, 4, 3, stride=2, with_r=True),
    ],
)
def test_state_dict_deepcopy_pickle(make):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 3, *([6, 5] if isinstance(m, (CoordConv2d, CoordConvTranspose2d)) else [7]))
    expected = m(x)
    torch.manual_seed(1)
    m2 = make()
    assert "coord_weight" in m.state_dict()
    m2.load_state_dict(_roundtrip_state(m))
    assert torch.equal(m2(x), expected)
    assert torch.equal(copy.deepcopy(m)(x), expected)
    m3 = pickle.loads(pickle.dumps(m))
    assert torch.equal(m3(x), expected) and repr(m3) == repr(m)


@pytest.mark.parametrize("cls,nd", [(CoordConvTranspose1d, 1), (CoordConvTranspose2d, 2), (CoordConvTranspose3d, 3)])
def test_transposed_output_size_and_shapes(cls, nd):
    m = cls(4, 6, 3, stride=2, padding=1, groups=2, with_r=True)
    assert m.coord_weight.shape == (nd + 1, 6, *(3,) * nd)
    x = torch.randn(2, 4, *(4,) * nd)
    assert m(x).shape == (2, 6, *(7,) * nd)
    assert m(x, output_size=[8] * nd).shape == (2, 6, *(8,) * nd)
    ref = getattr(nn, f"ConvTranspose{nd}d")(4 + nd + 1, 6, 3, stride=2, padding=1)
    assert m(x[0]).shape == ref(torch.randn(4 + nd + 1, *(4,) * nd)).shape


def test_public_api():
    for name in (
        "CoordConv1d",
        "CoordConv2d",
        "CoordConv3d",
        "CoordConvTranspose2d",
        "AddCoords",
        "coord_conv1d",
        "coord_conv2d",
        "coord_conv3d",
        "convert_to_coordconv",
        "available_backends",
    ):
        assert hasattr(cc, name)
    assert {"reference", "torch"} <= set(cc.available_backends())


def test_readme_example_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})


def test_loading_a_conv2d_state_dict():
    """An nn.Conv2d checkpoint into a CoordConv2d: strict loading names the missing coord_weight; with
    strict=False weight and bias load exactly, and a zeroed coord_weight reproduces the conv (or use
    CoordConv2d.from_conv, which does both)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = CoordConv2d(3, 5, 3, padding=1)
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "coord_weight"'):
        layer.load_state_dict(conv.state_dict())
    result = layer.load_state_dict(conv.state_dict(), strict=False)
    assert result.missing_keys == ["coord_weight"] and result.unexpected_keys == []
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    with torch.no_grad():
        layer.coord_weight.zero_()
    x = torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(CoordConv2d.from_conv(conv)(x), conv(x))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "auto"])
def test_non_contiguous_parameters(backend):
    """weight and coord_weight as transposed views, channels_last and sliced tensors: outputs and
    gradients equal the reference's on contiguous copies."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    weights = {
        "transposed": (torch.randn(3, 4, 3, 3).transpose(0, 1), torch.randn(2, 4, 3, 3).transpose(0, 1)),
        "channels_last": (
            torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
            torch.randn(4, 2, 3, 3).to(memory_format=torch.channels_last),
        ),
        "sliced": (torch.randn(8, 3, 3, 3)[::2], torch.randn(4, 4, 3, 3)[:, 1:3]),
    }
    for name, (w, cw) in weights.items():
        assert not (w.is_contiguous() and cw.is_contiguous()), name
        w, cw = w.requires_grad_(), cw.requires_grad_()
        y = cc.coord_conv2d(x, w, cw, None, 1, 1, backend=backend)
        w2, cw2 = w.detach().contiguous().requires_grad_(), cw.detach().contiguous().requires_grad_()
        want = cc.coord_conv2d(x, w2, cw2, None, 1, 1, backend="reference")
        torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
        g = torch.randn_like(y)
        got_grads = torch.autograd.grad(y, (w, cw), g)
        want_grads = torch.autograd.grad(want, (w2, cw2), g)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n} grad: {m}")


def test_calls_are_validated_once_per_signature(monkeypatch):
    """The per-call path: a layer's call is validated and resolved once per input signature; a new
    shape, dtype or registry change is validated again, and bad input still raises every time."""
    from coordconv_fused import backends, functional

    calls = []
    original = functional.check_tensors
    monkeypatch.setattr(functional, "check_tensors", lambda *a: calls.append(1) or original(*a))
    functional.clear_plan_cache()
    layer = CoordConv2d(3, 4, 3, padding=1, backend="torch")
    x = torch.randn(2, 3, 6, 5)
    first = layer(x)
    for _ in range(3):
        torch.testing.assert_close(layer(x), first)
    assert len(calls) == 1
    layer(torch.randn(2, 3, 7, 5))  # another shape
    layer(torch.randn(3, 6, 5))  # unbatched
    assert len(calls) == 3
    with backends.temporary_backend(backends.Backend("extra", backends.coord_conv_decomposed)):
        layer(x)  # the registry changed
    assert len(calls) == 4
    for _ in range(2):
        with pytest.raises(ValueError, match="expects 3 input channels"):
            layer(torch.randn(2, 4, 6, 5))
    # A parameter changed in place through .data (same object, no version bump) is validated again.
    layer.bias.data = layer.bias.data.double()
    with pytest.raises(ValueError, match="bias has dtype torch.float64 but input has dtype torch.float32"):
        layer(x)
    layer.bias.data = layer.bias.data.float()
    layer.coord_weight.data = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"coord_weight must have shape \[4, 2, 3, 3\]"):
        layer(x)


@pytest.mark.parametrize("backend", ["torch", "cpp", "reference"])
def test_configuration_set_after_a_call_is_followed(backend):
    """A layer keeps its configuration's part of the plan key; setting ``stride``, ``padding``,
    ``dilation``, ``padding_mode`` or ``with_r`` after a call takes effect on the next call, as on
    ``nn.Conv2d``."""
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, backend=backend).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    layer(x)
    changes = [("stride", (2, 1)), ("padding", (0, 2)), ("dilation", (2, 2)), ("padding_mode", "reflect")]
    for name, value in changes:
        setattr(layer, name, value)
        want = cc.coord_conv2d(
            x, layer.weight, layer.coord_weight, layer.bias, layer.stride, layer.padding, layer.dilation,
            padding_mode=layer.padding_mode, backend="reference",
        )  # fmt: skip
        torch.testing.assert_close(layer(x), want, msg=lambda m, n=name: f"after setting {n}: {m}")
    layer.with_r = True  # (coord_weight now has one channel too few: the call is validated again)
    with pytest.raises(ValueError, match=r"coord_weight must have shape \[4, 3, 3, 3\]"):
        layer(x)


@pytest.mark.backend("cpp")  # (call_signature is the extension's)
def test_call_signature_tells_apart_what_a_plan_depends_on():
    """The tensors' part of a plan key, packed in C++: equal for tensors that differ only in their
    values (or in being a Parameter), different for any change of shape, dtype, device or a bias
    that is absent; ``NotImplemented`` (the Python key then) for what it does not take."""
    from torch.overrides import TorchFunctionMode

    from coordconv_fused.backends.native import call_signature

    x, w, cw, b = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4)
    base = call_signature(x, w, cw, b)
    assert call_signature(x + 1, nn.Parameter(w), cw * 2, b.clone()) == base
    variants = [
        (x[:1], w, cw, b),
        (x.view(2, 3, 5, 6), w, cw, b),
        (x.double(), w, cw, b),
        (x.to("meta"), w, cw, b),
        (x.unsqueeze(-1), w.unsqueeze(-1), cw.unsqueeze(-1), b),
        (x, w[:, :, :2], cw, b),
        (x, w, cw.half(), b),
        (x, w, cw, b.double()),
        (x, w, cw, b[:2]),
        (x, w, cw, None),
        (x, w, cw, torch.tensor(1.0)),
    ]
    signatures = {call_signature(*v) for v in variants}
    assert len(signatures) == len(variants) and base not in signatures

    class Sub(torch.Tensor):
        pass

    assert call_signature(x.as_subclass(Sub), w, cw, b) is NotImplemented
    assert call_signature([1.0], w, cw, b) is NotImplemented
    with TorchFunctionMode():
        assert call_signature(x, w, cw, b) is NotImplemented


@pytest.mark.parametrize(
    "cls,backend",
    [
        (CoordConv2d, "torch"),
        (CoordConv2d, "cpp"),
        (CoordConv2d, "reference"),
        (CoordConvTranspose2d, "torch"),
        (CoordConvTranspose2d, "reference"),
    ],
)
@pytest.mark.parametrize("how", ["parametrize", "weight_norm", "no bias, parametrized coord_weight"])
def test_parameters_that_are_not_plain_entries(cls, backend, how):
    """The forward reads the parameters from ``_parameters`` where they are plain entries (its fast
    path); one replaced by a parametrization (a property) or by ``weight_norm`` (a plain attribute
    recomputed before each call) is read as an attribute: the layer computes what a plain layer
    holding the effective parameters computes, and gradients reach the underlying tensors."""
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = cls(3, 4, 3, padding=1, bias=not how.startswith("no bias"), backend=backend).double()
    if how == "parametrize":
        for name in ("weight", "coord_weight", "bias"):
            parametrize.register_parametrization(layer, name, Double())
    elif how == "weight_norm":
        with warnings.catch_warnings():  # (deprecated for torch.nn.utils.parametrizations.weight_norm)
            warnings.simplefilter("ignore")
            layer = nn.utils.weight_norm(layer, name="weight")
    else:
        parametrize.register_parametrization(layer, "coord_weight", Double())
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    out = layer(x)
    plain = cls(3, 4, 3, padding=1, bias=layer.bias is not None, backend="reference").double()
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.coord_weight.copy_(layer.coord_weight)
        if plain.bias is not None:
            plain.bias.copy_(layer.bias)
    torch.testing.assert_close(out, plain(x))
    out.sum().backward()
    leaves = [p for p in layer.parameters() if p.requires_grad]
    assert leaves and all(p.grad is not None and p.grad.abs().sum() > 0 for p in leaves)
