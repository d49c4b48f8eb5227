"""The `cpp` backend caches the coordinate term per (coord_weight tensor, geometry), valid while
coord_weight holds the same values: it must follow every way the values or the geometry change."""

import pytest
import torch

from coordconv_fused import CoordConv2d, coord_conv2d

pytestmark = pytest.mark.backend("cpp")


def _same_as_reference(layer, x):
    backend = layer.backend
    got = layer(x)
    layer.backend = "reference"
    want = layer(x)
    layer.backend = backend
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cache_follows_optimizer_steps():
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, with_r=True, backend="cpp")
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


def test_cache_follows_geometry_with_the_same_weight():
    torch.manual_seed(0)
    layer = CoordConv2d(3, 4, 3, padding=1, backend="cpp").eval()
    with torch.no_grad():
        for shape in [(1, 3, 8, 7), (1, 3, 5, 9), (2, 3, 8, 7), (1, 3, 5, 9)]:  # alternate sizes
            _same_as_reference(layer, torch.randn(*shape))
        # The same coord_weight tensor under other arguments of the functional API.
        x = torch.randn(1, 3, 9, 9)
        for kwargs in [dict(stride=2), dict(padding=2, dilation=2), dict(padding_mode="reflect", padding=1)]:
            args = dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="zeros")
            args.update(kwargs)
            got = coord_conv2d(x, layer.weight, layer.coord_weight, layer.bias, backend="cpp", **args)
            want = coord_conv2d(x, layer.weight, layer.coord_weight, layer.bias, backend="reference", **args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cache_survives_eviction():
    """More layers than the cache holds (256 entries): entries are dropped and recomputed, never
    confused."""
    torch.manual_seed(0)
    layers = [CoordConv2d(1, 2, 3, padding=1, backend="cpp").eval() for _ in range(300)]
    x = torch.randn(1, 1, 6, 5)
    with torch.no_grad():
        first = [layer(x) for layer in layers]
        for layer, y in zip(layers[:20], first[:20]):  # evicted by now, recomputed
            torch.testing.assert_close(layer(x), y)
            layer.backend = "reference"
            torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)


def test_cache_not_fooled_by_a_new_tensor_with_other_values():
    torch.manual_seed(0)
    layer = CoordConv2d(2, 3, 3, padding=1, backend="cpp").eval()
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        layer(x)
        for _ in range(5):  # new tensors (possibly at a freed address), other values
            layer.coord_weight = torch.nn.Parameter(torch.randn_like(layer.coord_weight))
            _same_as_reference(layer, x)
