"""torch.library.opcheck on the registered custom ops (schema, fake tensor, autograd registration,
AOT dispatch with dynamic shapes)."""

import pytest
import torch

import coordconv_fused  # noqa: F401  (registers the ops)

OP = torch.ops.coordconv_fused.coord_conv.default


def _args(
    n=2,
    c=3,
    cout=4,
    sizes=(6, 5),
    k=3,
    stride=1,
    padding=1,
    dilation=1,
    groups=1,
    transposed=False,
    output_padding=0,
    coord_pad=None,
    mode="zeros",
    with_r=False,
    separate=False,
    bias=True,
    dtype=torch.float32,
    channels_last=False,
):
    nd = len(sizes)
    d = nd + int(with_r)
    x = torch.randn(n, c, *sizes, dtype=dtype)
    if channels_last and nd == 2:
        x = x.to(memory_format=torch.channels_last)
    if transposed:
        w = torch.randn(c, cout // groups, *(k,) * nd, dtype=dtype)
        cw = torch.randn(d, cout, *(k,) * nd, dtype=dtype)
    else:
        w = torch.randn(cout, c // groups, *(k,) * nd, dtype=dtype)
        cw = torch.randn(cout, d, *((1,) * nd if separate else (k,) * nd), dtype=dtype)
    b = torch.randn(cout, dtype=dtype) if bias else None
    for t in (x, w, cw, b):
        if t is not None:
            t.requires_grad_()
    return (
        x,
        w,
        cw,
        b,
        [stride] * nd,
        [padding] * nd,
        [dilation] * nd,
        transposed,
        [output_padding] * nd,
        groups,
        coord_pad or [0] * (2 * nd),
        mode,
        with_r,
        separate,
    )


CONFIGS = {
    "basic": {},
    "with_r_stride": {"with_r": True, "stride": 2},
    "groups_dilation": {"c": 4, "cout": 6, "groups": 2, "dilation": 2, "padding": 2},
    "separate": {"separate": True, "k": 2, "stride": 2, "with_r": True},
    "reflect_prepadded": {"sizes": (8, 7), "padding": 0, "coord_pad": [1, 1, 1, 1], "mode": "reflect"},
    "asymmetric_same": {"k": 4, "padding": 1, "coord_pad": [0, 1, 0, 1]},
    "no_bias_1d": {"sizes": (9,), "bias": False},
    "3d": {"sizes": (3, 4, 3), "with_r": True},
    "transposed": {"transposed": True, "stride": 2, "output_padding": 1, "with_r": True},
    "transposed_groups": {"transposed": True, "c": 4, "cout": 6, "groups": 2},
    "channels_last": {"channels_last": True, "sizes": (7, 6)},
    "float64": {"dtype": torch.float64, "separate": True},
    "batch_one": {"n": 1},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_opcheck(name):
    torch.library.opcheck(OP, _args(**CONFIGS[name]))


def test_opcheck_empty_batch():
    args = _args(n=0)
    out = OP(*args)
    assert out.shape == (0, 4, 6, 5)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
