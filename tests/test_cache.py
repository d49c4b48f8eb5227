"""The `cpp` backend caches the coordinate term per (coord_weight tensor, geometry), and the `torch`
backend's eager path keeps the last coordinate term of a layer where no gradient of coord_weight is
wanted; both are valid only while coord_weight holds the same values: they must follow every way the
values or the geometry change."""

import pytest
import torch

from coordconv_fused import CoordConv2d, coord_conv2d

pytestmark = pytest.mark.parametrize("backend", ["cpp", "torch"])


def _same_as_reference(layer, x):
    backend = layer.backend
    got = layer(x)
    layer.backend = "reference"
    want = layer(x)
    layer.backend = backend
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cache_follows_optimizer_steps(backend):
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, with_r=True, backend=backend)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 7)
    outputs = []
    for _ in range(3):
        opt.zero_grad()
        y = layer(x)
        outputs.append(y.detach())
        y.square().mean().backward()
        opt.step()  # in-place update of coord_weight
        _same_as_reference(layer, x)
    assert not torch.equal(outputs[0], outputs[-1])  # the steps did change the layer


def test_cache_follows_geometry_with_the_same_weight(backend):
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, backend=backend).eval()
    with torch.no_grad():
        for shape in [(1, 3, 8, 7), (1, 3, 5, 9), (2, 3, 8, 7), (1, 3, 5, 9)]:  # alternate sizes
            _same_as_reference(layer, torch.randn(*shape))
        # The same coord_weight tensor under other arguments of the functional API.
        x = torch.randn(1, 3, 9, 9)
        for kwargs in [dict(stride=2), dict(padding=2, dilation=2), dict(padding_mode="reflect", padding=1)]:
            args = dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="zeros")
            args.update(kwargs)
            got = coord_conv2d(x, layer.weight, layer.coord_weight, layer.bias, backend=backend, **args)
            want = coord_conv2d(x, layer.weight, layer.coord_weight, layer.bias, backend="reference", **args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cache_survives_eviction(backend):
    """More layers than the cache holds (256 entries): entries are dropped and recomputed, never
    confused."""
    torch.manual_seed(0)
    layers = [CoordConv2d(1, 2, 3, padding=1, backend=backend).eval() for _ in range(300)]
    x = torch.randn(1, 1, 6, 5)
    with torch.no_grad():
        first = [layer(x) for layer in layers]
        for layer, y in zip(layers[:20], first[:20]):  # evicted by now, recomputed
            torch.testing.assert_close(layer(x), y)
            layer.backend = "reference"
            torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)


def test_cache_not_fooled_by_a_new_tensor_with_other_values(backend):
    torch.manual_seed(0)
    layer = CoordConv2d(2, 3, 3, padding=1, backend=backend).eval()
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        layer(x)
        for _ in range(5):  # new tensors (possibly at a freed address), other values
            layer.coord_weight = torch.nn.Parameter(torch.randn_like(layer.coord_weight))
            _same_as_reference(layer, x)


def test_cache_follows_writes_that_bump_no_version(backend):
    """``param.data.copy_(...)`` (old-style training loops, EMA updates) changes the values without
    bumping the parameter's version counter: a cache keyed by version would return a stale term."""
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, backend=backend).eval()
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        before = layer(x)
        version = layer.coord_weight._version
        layer.coord_weight.data.copy_(torch.randn_like(layer.coord_weight))
        assert layer.coord_weight._version == version  # (the premise of this test)
        _same_as_reference(layer, x)
        assert not torch.equal(layer(x), before)
        layer.coord_weight.mul_(-1.0)  # an in-place write that does bump it
        _same_as_reference(layer, x)


def test_frozen_coord_weight_under_autograd(backend):
    """A frozen coordinate filter with gradients flowing to the input and the other parameters:
    the kept term is reused, and every gradient still matches the reference."""
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, backend=backend)
    layer.coord_weight.requires_grad_(False)
    ref = CoordConv2d(3, 4, 3, padding=1, backend="reference")
    ref.load_state_dict(layer.state_dict())
    ref.coord_weight.requires_grad_(False)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 5, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y, yr = layer(x), ref(xr)
        torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)
        assert layer.coord_weight.grad is None
        with torch.no_grad():  # a new frozen filter each step
            layer.coord_weight.data.normal_()
            ref.coord_weight.copy_(layer.coord_weight)
