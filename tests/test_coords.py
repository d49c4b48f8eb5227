"""The coordinate convention, checked against the contract's formulas written out by hand (the
backends and the reference share coordconv_fused.coords, so it must be checked independently)."""

import math

import pytest
import torch

from coordconv_fused import AddCoords, coord_channels, coord_conv1d, coord_conv2d
from coordconv_fused.coords import centre_coord_channels


def _expected_axis(n):
    return [0.0 if n == 1 else 2 * i / (n - 1) - 1 for i in range(n)]


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (3, 3), (5, 8), (64, 64), (7, 2)])
@pytest.mark.parametrize("with_r", [False, True])
def test_coord_channels_2d(h, w, with_r):
    c = coord_channels((h, w), with_r, dtype=torch.float64)
    assert c.shape == (3 if with_r else 2, h, w)
    ei, ej = _expected_axis(h), _expected_axis(w)
    for y in range(h):
        for x in range(w):
            assert c[0, y, x].item() == pytest.approx(ei[y], abs=1e-15)
            assert c[1, y, x].item() == pytest.approx(ej[x], abs=1e-15)
            if with_r:
                assert c[2, y, x].item() == pytest.approx(math.hypot(ei[y], ej[x]), abs=1e-15)


def test_endpoints_exact_in_float32():
    for n in (2, 3, 7, 10, 33, 224, 1000):
        c = coord_channels((n,), dtype=torch.float32)[0]
        assert c[0].item() == -1.0 and c[-1].item() == 1.0
        if n % 2:
            assert c[n // 2].item() == 0.0
        torch.testing.assert_close(c, torch.tensor(_expected_axis(n), dtype=torch.float32))


def test_radius_range_and_centre():
    c = coord_channels((5, 9), with_r=True, dtype=torch.float64)
    assert c[2].min().item() == 0.0 and c[2, 2, 4].item() == 0.0
    assert c[2].max().item() == pytest.approx(math.sqrt(2))


def test_1d_and_3d_layout():
    c1 = coord_channels((5,), with_r=True, dtype=torch.float64)
    torch.testing.assert_close(c1[1], c1[0].abs())
    c3 = coord_channels((2, 3, 4), with_r=True, dtype=torch.float64)
    assert c3.shape == (4, 2, 3, 4)
    torch.testing.assert_close(c3[0, :, 0, 0], torch.tensor(_expected_axis(2), dtype=torch.float64))
    torch.testing.assert_close(c3[1, 0, :, 0], torch.tensor(_expected_axis(3), dtype=torch.float64))
    torch.testing.assert_close(c3[2, 0, 0, :], torch.tensor(_expected_axis(4), dtype=torch.float64))
    torch.testing.assert_close(c3[3], (c3[:3] ** 2).sum(0).sqrt())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_rounded_float32(dtype):
    c = coord_channels((13, 11), with_r=True, dtype=dtype)
    assert c.dtype == dtype
    assert torch.equal(c, coord_channels((13, 11), with_r=True, dtype=torch.float32).to(dtype))


def test_add_coords_concatenates():
    x = torch.randn(2, 3, 4, 6)
    y = AddCoords(2, with_r=True)(x)
    assert y.shape == (2, 6, 4, 6)
    assert torch.equal(y[:, :3], x)
    assert torch.equal(y[1, 3:], coord_channels((4, 6), True))
    assert AddCoords(1)(torch.randn(3, 7)).shape == (4, 7)  # unbatched 1-D
    assert AddCoords(3)(torch.randn(1, 1, 2, 3, 4)).shape == (1, 4, 2, 3, 4)


@pytest.mark.parametrize(
    "out_n,in_n,stride,pad,dil,k",
    [(5, 5, 1, 1, 1, 3), (3, 7, 2, 0, 1, 3), (4, 6, 2, 1, 1, 4), (6, 6, 1, 1, 2, 2), (3, 1, 1, 1, 1, 3)],
)
def test_centre_coordinates_formula(out_n, in_n, stride, pad, dil, k):
    c = centre_coord_channels((out_n,), (in_n,), False, stride=(stride,), pad_before=(pad,),
                              dilation=(dil,), kernel_size=(k,), dtype=torch.float64, device="cpu")
    for o in range(out_n):
        h = o * stride - pad + dil * (k - 1) / 2
        expected = 0.0 if in_n == 1 else 2 * h / (in_n - 1) - 1
        assert c[0, o].item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("with_r", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_separate_filter_equals_centre_tap_of_full_filter(backend, with_r, stride):
    # For an odd kernel whose centre tap lies inside the image, the separate 1x1 coordinate filter
    # equals a full coordinate kernel that is zero except at its centre tap.
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    d = 3 if with_r else 2
    cw1 = torch.randn(4, d, 1, 1, dtype=torch.float64)
    cw_full = torch.zeros(4, d, 3, 3, dtype=torch.float64)
    cw_full[:, :, 1, 1] = cw1[:, :, 0, 0]
    sep = coord_conv2d(x, w, cw1, None, stride, 1, 1, 1, "zeros", with_r, backend, coord_kernel_size=1)
    full = coord_conv2d(x, w, cw_full, None, stride, 1, 1, 1, "zeros", with_r, backend)
    torch.testing.assert_close(sep, full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_reference_is_cat_then_conv(backend):
    # The contract's literal definition: nn.Conv on the concatenated channels (groups == 1).
    conv = torch.nn.Conv2d(3 + 2, 5, 3, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64)
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    expected = conv(torch.cat([x, coord_channels((9, 6), dtype=torch.float64).expand(2, -1, -1, -1)], 1))
    w, cw = conv.weight[:, :3], conv.weight[:, 3:]
    got = coord_conv2d(x, w, cw, conv.bias, 2, 1, 1, 1, "reflect", False, backend)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    conv1 = torch.nn.Conv1d(2 + 2, 3, 3, padding="same", dtype=torch.float64)
    x1 = torch.randn(2, 2, 7, dtype=torch.float64)
    expected1 = conv1(AddCoords(1, with_r=True)(x1))
    got1 = coord_conv1d(x1, conv1.weight[:, :2], conv1.weight[:, 2:], conv1.bias, 1, "same", 1, 1,
                        "zeros", True, backend)
    torch.testing.assert_close(got1, expected1, atol=1e-12, rtol=1e-12)


def test_radius_is_correctly_rounded_in_float32():
    # sqrt of the float32 sum of squares, rounded once (computed in float64 as the oracle).
    c = coord_channels((37, 53), with_r=True, dtype=torch.float32)
    squares = c[0] * c[0] + c[1] * c[1]
    assert torch.equal(c[2], squares.double().sqrt().float())
