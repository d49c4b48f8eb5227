"""Bad input: a ValueError that names the problem (never a crash or a silently wrong result)."""

import pytest
import torch

from coordconv_fused import CoordConv2d, CoordConvTranspose2d, coord_conv2d, coord_conv_transpose2d


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


X, W, CW, B = _t(2, 3, 8, 8), _t(4, 3, 3, 3), _t(4, 2, 3, 3), _t(4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input": _t(3, 8)}, r"expected a 4-D \(batched\) or 3-D \(unbatched\) input"),
        ({"input": _t(1, 2, 3, 8, 8)}, "expected a 4-D"),
        ({"input": _t(2, 5, 8, 8)}, "expects 3 input channels, but input of shape .* has 5"),
        ({"weight": _t(4, 3, 3)}, "expected a 4-D weight"),
        ({"coord_weight": _t(4, 3, 3, 3)}, r"coord_weight must have shape \[4, 2, 3, 3\]"),
        ({"coord_weight": _t(4, 2, 2, 2)}, "coord_weight must have shape"),
        ({"bias": _t(5)}, r"bias must have shape \[4\]"),
        ({"groups": 2}, "expects 6 input channels"),
        (
            {
                "input": _t(2, 6, 8, 8),
                "weight": _t(5, 3, 3, 3),
                "coord_weight": _t(5, 2, 3, 3),
                "bias": _t(5),
                "groups": 2,
            },
            "out_channels=5 is not divisible by groups=2",
        ),
        ({"groups": 0}, "groups must be a positive int"),
        ({"padding_mode": "mirror"}, "padding_mode must be one of"),
        ({"padding": "full"}, "padding must be 'same', 'valid'"),
        ({"padding": -1}, "padding must be non-negative"),
        ({"padding": "same", "stride": 2}, "padding='same' is not supported for strided"),
        ({"stride": 0}, "stride must be positive"),
        ({"dilation": (1, 0)}, "dilation must be positive"),
        ({"stride": (1, 2, 3)}, "stride must be an int or a tuple of 2 ints"),
        ({"backend": "nope"}, "unknown backend 'nope'"),
        ({"backend": 3}, "backend must be a string"),
        ({"input": _t(2, 3, 2, 8)}, "too small for kernel_size"),
        ({"input": _t(2, 3, 3, 8), "padding": 3, "padding_mode": "reflect"}, "too large for padding_mode='reflect'"),
        (
            {"input": _t(2, 3, 8, 8, dtype=torch.float64)},
            "weight has dtype torch.float32 but input has dtype torch.float64",
        ),
        ({"coord_weight": _t(4, 2, 3, 3, dtype=torch.float64)}, "coord_weight has dtype"),
        ({"bias": _t(4, dtype=torch.float64)}, "bias has dtype"),
        ({"input": torch.ones(2, 3, 8, 8, dtype=torch.int64)}, "must be a floating-point tensor"),
        ({"input": "x"}, "input must be a Tensor"),
        ({"coord_kernel_size": 3}, "coord_kernel_size must be None"),
        ({"with_r": True}, r"coord_weight must have shape \[4, 3, 3, 3\] \(3 coordinate channels, with_r"),
    ],
)
def test_functional_errors(kwargs, match):
    args = {"input": X, "weight": W, "coord_weight": CW, "bias": B}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        coord_conv2d(**args)


def test_meta_device_mismatch_is_named():
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        coord_conv2d(X, W.to("meta"), CW, B)


def test_unavailable_backend_is_actionable():
    from coordconv_fused import backends

    fake = backends.Backend(
        "fake_gpu",
        backends.coord_conv_decomposed,
        devices=frozenset({"cuda"}),
        unavailable_reason=lambda: "build the extension with FORCE_CUDA=1",
    )
    with backends.temporary_backend(fake):
        with pytest.raises(RuntimeError, match="backend 'fake_gpu' is not available: build the extension"):
            coord_conv2d(X, W, CW, B, backend="fake_gpu")
        assert "fake_gpu" not in backends.available_backends()
    assert "fake_gpu" not in backends.backend_names()
    with backends.temporary_backend(
        backends.Backend("fake_gpu", backends.coord_conv_decomposed, devices=frozenset({"cuda"}))
    ):
        with pytest.raises(RuntimeError, match=r"runs on \['cuda'\] tensors, but the input is on cpu"):
            coord_conv2d(X, W, CW, B, backend="fake_gpu")


def test_transposed_errors():
    x, w, cw = _t(2, 3, 5, 5), _t(3, 4, 3, 3), _t(2, 4, 3, 3)
    with pytest.raises(ValueError, match="output_padding must be non-negative and smaller"):
        coord_conv_transpose2d(x, w, cw, None, 1, 0, 1)
    with pytest.raises(ValueError, match=r"coord_weight must have shape \[2, 4, 3, 3\]"):
        coord_conv_transpose2d(x, w, _t(4, 2, 3, 3))
    with pytest.raises(ValueError, match="only padding_mode='zeros' is supported for transposed"):
        CoordConvTranspose2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="weight of shape .* expects 3 input channels"):
        coord_conv_transpose2d(_t(2, 5, 5, 5), w, cw)


def test_module_errors():
    m = CoordConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="expects 3 input channels, but input of shape"):
        m(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="coord_conv2d: expected a 4-D"):
        m(torch.randn(8, 8))


def test_edge_shapes_work():
    # Batch 0 returns an empty result; a size-1 axis has coordinate 0.
    out = coord_conv2d(_t(0, 3, 8, 8), W, CW, B)
    assert out.shape == (0, 4, 6, 6)
    x = _t(2, 3, 1, 9)
    out = coord_conv2d(x, W, CW, B, padding=1)
    assert out.shape == (2, 4, 1, 9)


@pytest.mark.parametrize("value", ["yes", None, 2, "1", 0])
@pytest.mark.parametrize(
    "make",
    [
        lambda v: CoordConv2d(3, 4, 3, with_r=v),
        lambda v: CoordConvTranspose2d(3, 4, 3, with_r=v),
        lambda v: coord_conv2d(X, W, CW, B, with_r=v),
    ],
    ids=["CoordConv2d", "CoordConvTranspose2d", "coord_conv2d"],
)
def test_with_r_must_be_a_bool(make, value):
    with pytest.raises(ValueError, match=f"with_r must be True or False, got {value!r}"):
        make(value)


@pytest.mark.parametrize("kernel_size", [0, (3, 0)])
@pytest.mark.parametrize("cls", [CoordConv2d, CoordConvTranspose2d])
def test_zero_kernel_size_is_named(cls, kernel_size):
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        cls(3, 4, kernel_size)
