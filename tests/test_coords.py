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
def test_low_precision_is_the_rounded_formula(dtype):
    c = coord_channels((13, 11), with_r=True, dtype=dtype)
    assert c.dtype == dtype
    ei, ej = _expected_axis(13), _expected_axis(11)
    # Axis channels: the formula's float64 value rounded once to dtype (double rounding through
    # float32 is innocuous for a division).
    assert torch.equal(c[0], torch.tensor(ei, dtype=torch.float64).to(dtype)[:, None].expand(13, 11))
    assert torch.equal(c[1], torch.tensor(ej, dtype=torch.float64).to(dtype)[None, :].expand(13, 11))
    radius = torch.tensor([[math.hypot(a, b) for b in ej] for a in ei], dtype=torch.float64)
    ulp = torch.finfo(dtype).eps * radius.clamp(min=2**-10)
    assert (c[2].double() - radius).abs().le(ulp).all()


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
    c = centre_coord_channels(
        (out_n,),
        (in_n,),
        False,
        stride=(stride,),
        pad_before=(pad,),
        dilation=(dil,),
        kernel_size=(k,),
        dtype=torch.float64,
        device="cpu",
    )
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
    got1 = coord_conv1d(
        x1, conv1.weight[:, :2], conv1.weight[:, 2:], conv1.bias, 1, "same", 1, 1, "zeros", True, backend
    )
    torch.testing.assert_close(got1, expected1, atol=1e-12, rtol=1e-12)


def test_radius_is_correctly_rounded_in_float32():
    # The radius is sqrt of the float32 sum of squares, rounded once: no other float32 lies closer
    # to the exact square root (checked with exact rational arithmetic, not with the expression
    # the implementation uses).
    from fractions import Fraction

    c = coord_channels((37, 53), with_r=True, dtype=torch.float32)
    squares = (c[0] * c[0] + c[1] * c[1]).flatten().tolist()
    radius = c[2].flatten()
    below = torch.nextafter(radius, torch.tensor(-1.0)).tolist()
    above = torch.nextafter(radius, torch.tensor(2.0)).tolist()
    for s, r, lo, hi in zip(squares, radius.tolist(), below, above):
        err = abs(Fraction(r) ** 2 - Fraction(s))
        assert err <= abs(Fraction(lo) ** 2 - Fraction(s)) and err <= abs(Fraction(hi) ** 2 - Fraction(s)), (s, r)


# ---- padded coordinates and receptive-field centres, written out by hand ---------------------------
# An axis of 4 positions has coordinates [-1, -1/3, 1/3, 1]. Padded by (2, 1) with each mode:
T = 1 / 3
PADDED_4 = {
    "zeros": [0, 0, -1, -T, T, 1, 0],
    "reflect": [T, -T, -1, -T, T, 1, T],  # indices 2 1 | 0 1 2 3 | 2
    "replicate": [-1, -1, -1, -T, T, 1, 1],
    "circular": [T, 1, -1, -T, T, 1, -1],  # indices 2 3 | 0 1 2 3 | 0
}


@pytest.mark.parametrize("mode", list(PADDED_4))
def test_padded_coordinates_by_hand(mode):
    from coordconv_fused.coords import padded_coord_channels

    got = padded_coord_channels((4,), False, [(2, 1)], mode, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(got[0], torch.tensor(PADDED_4[mode], dtype=torch.float64), atol=1e-15, rtol=0)


def test_padded_radius_2d_reflect_by_hand():
    from coordconv_fused.coords import padded_coord_channels

    # rows [-1, 0, 1] reflect-padded by 1 -> [0, -1, 0, 1, 0]; columns [-1, 1] -> [1, -1, 1, -1]
    got = padded_coord_channels((3, 2), True, [(1, 1), (1, 1)], "reflect", dtype=torch.float64, device="cpu")
    rows, cols = [0, -1, 0, 1, 0], [1, -1, 1, -1]
    for y, a in enumerate(rows):
        for x, b in enumerate(cols):
            assert got[:, y, x].tolist() == pytest.approx([a, b, math.hypot(a, b)], abs=1e-15)


@pytest.mark.parametrize(
    "name,n,kwargs,expected",
    [
        # 'same' with an even kernel (k=4): padding (1, 2), centres at o + 0.5 -> (2o - 4) / 5, not clipped
        ("same-even", 6, dict(kernel=4, stride=1, pad_before=1, dilation=1, out=6), [-0.8, -0.4, 0, 0.4, 0.8, 1.2]),
        # k=3, stride 2, padding 1 (explicit, e.g. reflect): centres at 2o -> (4o - 6) / 6
        ("strided", 7, dict(kernel=3, stride=2, pad_before=1, dilation=1, out=4), [-1, -T, T, 1]),
        # dilation 2, k=3, no padding: centres at o + 2 -> (2o + 4 - 6) / 6
        ("dilated", 7, dict(kernel=3, stride=1, pad_before=0, dilation=2, out=3), [-T, 0, T]),
        # a one-position axis has coordinate 0 everywhere
        ("size-1", 1, dict(kernel=3, stride=1, pad_before=1, dilation=1, out=1), [0]),
    ],
)
def test_centres_by_hand(name, n, kwargs, expected):
    out = kwargs.pop("out")
    c = centre_coord_channels(
        (out,),
        (n,),
        False,
        stride=(kwargs["stride"],),
        pad_before=(kwargs["pad_before"],),
        dilation=(kwargs["dilation"],),
        kernel_size=(kwargs["kernel"],),
        dtype=torch.float64,
        device="cpu",
    )
    torch.testing.assert_close(c[0], torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)


def test_3d_with_r_by_hand():
    c = coord_channels((2, 3, 5), with_r=True, dtype=torch.float64)
    # D: [-1, 1]; H: [-1, 0, 1]; W: [-1, -0.5, 0, 0.5, 1]
    assert c[:, 0, 1, 3].tolist() == pytest.approx([-1, 0, 0.5, math.sqrt(1.25)], abs=1e-15)
    assert c[:, 1, 2, 0].tolist() == pytest.approx([1, 1, -1, math.sqrt(3)], abs=1e-15)


# ---- every backend, end to end, against the same hand-written values --------------------------------
# With weight = 0 and a one-hot coordinate filter, the layer's output is the coordinate that one tap
# (or, for the separate filter, the receptive-field centre) sees: no shared code in the expectation.

BACKENDS = ["reference", "torch", "cpp", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(PADDED_4))
def test_backend_sees_padded_coordinates(backend, mode):
    # 1-D, n = 4, k = 3, padding 2 on both sides -> padded axis of 8 positions, out = 6; tap 0 of
    # output o reads padded position o, tap 2 reads o + 2.
    padded = {  # PADDED_4 with a second position after the image
        "zeros": [0, 0, -1, -T, T, 1, 0, 0],
        "reflect": [T, -T, -1, -T, T, 1, T, -T],  # indices 2 1 | 0 1 2 3 | 2 1
        "replicate": [-1, -1, -1, -T, T, 1, 1, 1],
        "circular": [T, 1, -1, -T, T, 1, -1, -T],  # indices 2 3 | 0 1 2 3 | 0 1
    }[mode]
    x = torch.zeros(1, 1, 4, dtype=torch.float64)
    w = torch.zeros(1, 1, 3, dtype=torch.float64)
    for tap in (0, 2):
        cw = torch.zeros(1, 1, 3, dtype=torch.float64)
        cw[0, 0, tap] = 1
        y = coord_conv1d(x, w, cw, None, 1, 2, 1, 1, mode, False, backend)
        torch.testing.assert_close(
            y[0, 0],
            torch.tensor(padded[tap : tap + 6], dtype=torch.float64),
            atol=1e-15,
            rtol=0,
            msg=lambda m, t=tap: f"tap {t}: {m}",
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_sees_receptive_field_centres(backend):
    # 'same', even kernel 4 on 6 positions (the 'same-even' row above), and stride 2 with reflect.
    x = torch.zeros(1, 1, 6, dtype=torch.float64)
    y = coord_conv1d(
        x,
        torch.zeros(1, 1, 4, dtype=torch.float64),
        torch.ones(1, 1, 1, dtype=torch.float64),
        None,
        1,
        "same",
        1,
        1,
        "zeros",
        False,
        backend,
        coord_kernel_size=1,
    )
    torch.testing.assert_close(
        y[0, 0], torch.tensor([-0.8, -0.4, 0, 0.4, 0.8, 1.2], dtype=torch.float64), atol=1e-15, rtol=0
    )
    x = torch.zeros(1, 1, 7, dtype=torch.float64)
    y = coord_conv1d(
        x,
        torch.zeros(1, 1, 3, dtype=torch.float64),
        torch.ones(1, 1, 1, dtype=torch.float64),
        None,
        2,
        1,
        1,
        1,
        "reflect",
        False,
        backend,
        coord_kernel_size=1,
    )
    torch.testing.assert_close(y[0, 0], torch.tensor([-1, -T, T, 1], dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_sees_2d_radius_and_3d_axes(backend):
    # 2-D, 3x2 image, reflect padding 1, radius channel, kernel 3: the centre tap of output (y, x)
    # reads image position (y, x) -> radius hypot(row, col); tap (0, 0) reads padded (y, x).
    x = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    cw = torch.zeros(1, 3, 3, 3, dtype=torch.float64)
    cw[0, 2, 0, 0] = 1  # radius channel, tap (0, 0)
    y = coord_conv2d(x, w, cw, None, 1, 1, 1, 1, "reflect", True, backend)
    rows, cols = [0, -1, 0, 1, 0], [1, -1, 1, -1]
    expected = [[math.hypot(rows[i], cols[j]) for j in range(2)] for i in range(3)]
    torch.testing.assert_close(y[0, 0], torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)
    # 3-D: the W channel (index 2) through a 1x1x1 kernel is the W coordinate itself.
    from coordconv_fused import coord_conv3d

    y = coord_conv3d(
        torch.zeros(1, 1, 2, 3, 5, dtype=torch.float64),
        torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64),
        torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1, 1),
        None,
        backend=backend,
    )
    torch.testing.assert_close(
        y[0, 0, 1, 2], torch.tensor([-1, -0.5, 0, 0.5, 1], dtype=torch.float64), atol=1e-15, rtol=0
    )
