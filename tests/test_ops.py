"""torch.library.opcheck on every custom op of the library, per device (schema, fake tensor,
autograd registration, AOT dispatch with dynamic shapes): the one place for opcheck."""

import pytest
import torch

import coordconv_fused  # noqa: F401  (registers the ops)


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
    pre_pad=None,
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
        pre_pad or [0] * (2 * nd),
        mode,
        with_r,
        separate,
    )


CONFIGS = {
    "basic": {},
    "with_r_stride": {"with_r": True, "stride": 2},
    "groups_dilation": {"c": 4, "cout": 6, "groups": 2, "dilation": 2, "padding": 2},
    "separate": {"separate": True, "k": 2, "stride": 2, "with_r": True},
    "reflect_prepadded": {"sizes": (8, 7), "padding": 0, "pre_pad": [1, 1, 1, 1], "mode": "reflect"},
    "asymmetric_same": {"k": 4, "padding": 1, "pre_pad": [0, 1, 0, 1]},
    "no_bias_1d": {"sizes": (9,), "bias": False},
    "3d": {"sizes": (3, 4, 3), "with_r": True},
    "transposed": {"transposed": True, "stride": 2, "output_padding": 1, "with_r": True},
    "transposed_groups": {"transposed": True, "c": 4, "cout": 6, "groups": 2},
    "channels_last": {"channels_last": True, "sizes": (7, 6)},
    "float64": {"dtype": torch.float64, "separate": True},
    "batch_one": {"n": 1},
    "depth_one": {"c": 1, "k": 1, "with_r": True},
}
# Triton's interpreter is slow: a few configurations cover its kernels' variants.
FEW = ["basic", "separate", "reflect_prepadded", "asymmetric_same"]

# Every forward op: the backend that brings it, whether it has a transposed form, and the
# configurations it is checked on.
FORWARD_OPS = {
    "coord_conv": ("torch", True, list(CONFIGS)),
    "coord_conv_ext": ("cpp", False, list(CONFIGS)),
    "coord_conv_cuda_emulated": ("cpp", False, FEW + ["3d", "float64"]),
    "coord_conv_triton": ("triton", False, FEW),
}
# The CUDA backend runs coord_conv_ext; on CUDA tensors its backend is named "cuda".
ON_CUDA = {"coord_conv": "torch", "coord_conv_ext": "cuda", "coord_conv_triton": "triton"}


def _cases():
    for device in ("cpu", "cuda"):
        for op, (backend, transposed, configs) in FORWARD_OPS.items():
            if device == "cuda":
                if op not in ON_CUDA:
                    continue
                backend = ON_CUDA[op]
            for name in configs:
                if CONFIGS[name].get("transposed") and not transposed:
                    continue
                yield pytest.param(
                    op, name, device, marks=pytest.mark.backend(backend, device=device), id=f"{op}-{name}-{device}"
                )


def _to(args, device):
    return tuple(
        a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )


@pytest.mark.parametrize("op,config,device", list(_cases()))
def test_opcheck(op, config, device, request):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes included) of
    every forward op, per device."""
    if "emulated" in op:
        request.getfixturevalue("emulated_cuda")
    torch.library.opcheck(getattr(torch.ops.coordconv_fused, op).default, _to(_args(**CONFIGS[config]), device))


def test_opcheck_empty_batch():
    op = torch.ops.coordconv_fused.coord_conv.default
    args = _args(n=0)
    out = op(*args)
    assert out.shape == (0, 4, 6, 5)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


GRAD_OPS = {
    "coord_conv_ext_coord_weight_grad": "cpp",
    "coord_conv_cuda_emulated_coord_weight_grad": "cpp",
    "coord_conv_triton_coord_weight_grad": "triton",
}


@pytest.mark.parametrize("config", ["basic", "separate", "reflect_prepadded", "3d"])
@pytest.mark.parametrize("op", [pytest.param(op, marks=pytest.mark.backend(b)) for op, b in GRAD_OPS.items()])
def test_opcheck_coord_weight_grad_ops(op, config, request):
    if "emulated" in op:
        request.getfixturevalue("emulated_cuda")
    x, w, cw, _, *rest = _args(**CONFIGS[config])
    grad_sum = torch.randn(1, *op_output_shape(x, w, rest)[1:])
    args = (grad_sum, x.detach(), w.detach(), cw.detach(), *rest)
    torch.library.opcheck(getattr(torch.ops.coordconv_fused, op).default, args)


def op_output_shape(x, w, rest):
    return torch.ops.aten.convolution(x.detach(), w.detach(), None, *rest[:6]).shape


@pytest.mark.backend("cpp")
@pytest.mark.parametrize(
    "mask",
    [(True, True, True, True), (False, True, True, False), (True, False, False, True), (False, False, False, False)],
    ids=str,
)
@pytest.mark.parametrize("config", ["basic", "separate", "reflect_prepadded", "depth_one"])
def test_opcheck_backward_op(config, mask):
    x, w, cw, _, *rest = _args(**CONFIGS[config])
    grad = torch.randn(op_output_shape(x, w, rest))
    args = (grad, x.detach(), w.detach(), cw.detach(), *rest, list(mask))
    torch.library.opcheck(torch.ops.coordconv_fused.coord_conv_ext_backward.default, args)


@pytest.mark.backend("cpp")
@pytest.mark.parametrize("config", ["basic", "with_r_stride", "groups_dilation", "depth_one", "no_bias_1d"])
def test_opcheck_input_grad_op(config):
    x, w, _, _, *rest = _args(**CONFIGS[config])
    grad = torch.randn(op_output_shape(x, w, rest))
    torch.library.opcheck(
        torch.ops.coordconv_fused.coord_conv_ext_input_grad.default, (grad, x.detach(), w.detach(), *rest[:6])
    )
