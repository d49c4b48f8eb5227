"""Every backend against the reference: output and the gradients of input, weight, coord_weight
and bias, over a grid of shapes and arguments."""

import pytest
import torch

from coordconv_fused.testing import (
    Case,
    assert_gradients_keep_their_graph,
    assert_layer_matches_reference,
    assert_low_precision_matches_float64,
    assert_matches_reference,
    supported,
    warm_up,
)

# Named explicitly: a backend that should be here and is not fails its cases (tests/conftest.py).
BACKENDS = ["torch", "cpp", "triton", "auto"]

CASES = [
    # 2-D: odd sizes, H != W, stride, padding, dilation, groups, with_r, separate filter
    Case((7, 5)),
    Case((5, 8), padding=1),
    Case((9, 6), kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    Case((11, 7), kernel_size=5, stride=3, padding=2, dilation=2),
    Case((6, 6), padding="same"),
    Case((6, 7), kernel_size=4, padding="same", dilation=1),
    Case((8, 5), kernel_size=2, padding="same", dilation=3),
    Case((6, 5), padding="valid"),
    Case((7, 6), in_channels=4, out_channels=6, groups=2, padding=1),
    Case((7, 6), in_channels=6, out_channels=6, groups=6, padding=1),
    Case((7, 6), with_r=True, padding=1),
    Case((7, 6), with_r=True, groups=3, in_channels=3, out_channels=3, padding=1),
    Case((9, 7), separate=True, padding=1),
    Case((9, 7), separate=True, kernel_size=4, stride=2, padding=1, with_r=True),
    Case((9, 7), separate=True, kernel_size=(2, 3), padding="same", dilation=2),
    Case((6, 6), separate=True, kernel_size=1, padding=1),
    Case((1, 6), kernel_size=(1, 3), padding=(0, 1)),
    Case((6, 1), kernel_size=(3, 1), with_r=True),
    Case((1, 1), kernel_size=1),
    Case((1, 1), kernel_size=3, padding=1, with_r=True),
    Case((7, 5), batch=0, padding=1),
    Case((7, 5), batch=1, bias=False),
    Case((8, 7), padding=2, padding_mode="reflect"),
    Case((8, 7), padding=(1, 2), padding_mode="replicate", with_r=True),
    Case((8, 7), padding=2, padding_mode="circular", stride=2),
    Case((8, 7), kernel_size=4, padding="same", padding_mode="reflect"),
    Case((8, 7), padding=1, padding_mode="circular", separate=True, in_channels=4, groups=2),
    Case((6, 5), padding=1, padding_mode="reflect", groups=3, in_channels=3, out_channels=6),
    # 1-D and 3-D
    Case((9,)),
    Case((10,), kernel_size=4, stride=2, padding=1, with_r=True),
    Case((1,), kernel_size=1),
    Case((9,), padding=2, padding_mode="reflect", separate=True),
    Case((11,), kernel_size=3, padding="same", dilation=2, groups=3, in_channels=3, out_channels=3),
    Case((4, 5, 3), padding=1),
    Case((5, 4, 6), kernel_size=(3, 2, 1), stride=(1, 2, 1), with_r=True),
    Case((5, 4, 4), padding=1, padding_mode="replicate", separate=True),
    Case((3, 4, 5), kernel_size=2, padding="same", padding_mode="circular"),
    # Transposed
    Case((5, 4), transposed=True),
    Case((5, 4), transposed=True, stride=2, padding=1, output_padding=1, with_r=True),
    Case(
        (4, 6),
        transposed=True,
        kernel_size=(2, 3),
        stride=(2, 1),
        dilation=(1, 2),
        groups=2,
        in_channels=4,
        out_channels=6,
    ),
    Case((6,), transposed=True, stride=3, padding=1, output_padding=2, bias=False),
    Case((3, 4, 2), transposed=True, stride=2, with_r=True),
    Case((1, 5), transposed=True, batch=0),
]


def _id(case: Case) -> str:
    defaults = Case(case.sizes)
    parts = ["x".join(map(str, case.sizes))]
    for f in (
        "batch",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "with_r",
        "separate",
        "bias",
        "transposed",
        "output_padding",
    ):
        v = getattr(case, f)
        if v != getattr(defaults, f):
            parts.append(f"{f}={v}")
    return ",".join(parts)


@pytest.mark.parametrize(
    "backend,case",
    [(b, c) for c in CASES for b in BACKENDS if supported(b, c)],
    ids=[f"{b}-{_id(c)}" for c in CASES for b in BACKENDS if supported(b, c)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(backend, case, dtype):
    assert_matches_reference(backend, case, dtype)


LOW_PRECISION_CASES = [
    Case((9, 8), in_channels=8, out_channels=8, padding=1, with_r=True),
    Case((12, 10), batch=4, in_channels=16, out_channels=8, stride=2, padding=1, padding_mode="reflect", separate=True),
    Case((11,), in_channels=6, out_channels=6, groups=3, kernel_size=5, padding="same", with_r=True),
    Case((6, 5), transposed=True, stride=2, with_r=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    """Output and every gradient in bf16/fp16 against the float64 reference, element by element
    within a bound derived from the dtype's epsilon and the reduction length."""
    for case in LOW_PRECISION_CASES:
        if supported(backend, case):
            assert_low_precision_matches_float64(backend, case, dtype)


GRADCHECK_CASES = [
    Case((5, 4), padding=1, with_r=True),
    Case((5, 4), in_channels=4, groups=2, stride=2, padding=2, dilation=2),
    Case((6, 5), separate=True, kernel_size=2, padding="same", padding_mode="reflect"),
    Case((5,), padding=1, padding_mode="circular", with_r=True),
    Case((3, 3, 4), kernel_size=2, separate=True, with_r=True, padding=1),
    Case((4, 3), transposed=True, stride=2, output_padding=1, with_r=True),
]
# Triton's interpreter is too slow for full gradcheck here: tests/test_triton.py gradchecks the
# kernels on smaller problems.
GRADCHECK_PAIRS = [
    (b, c) for c in GRADCHECK_CASES for b in ["reference"] + BACKENDS if b != "triton" and supported(b, c)
]


@pytest.mark.parametrize("backend,case", GRADCHECK_PAIRS, ids=[f"{b}-{_id(c)}" for b, c in GRADCHECK_PAIRS])
def test_gradcheck(backend, case):
    tensors = case.make_tensors(torch.float64, "cpu", seed=3)
    names = [n for n, t in tensors.items() if t is not None]

    def fn(*args):
        return case.run(backend, dict(zip(names, args)))

    warm_up(fn, [tensors[n] for n in names])
    assert torch.autograd.gradcheck(fn, tuple(tensors[n] for n in names), eps=1e-6, atol=1e-7)


# ---- the torch backend's device path (bias inside the coordinate term) on CPU tensors --------------


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_device_path_matches_reference(device_path, case):
    """What the ``torch`` backend runs on a GPU, run here: output and every gradient."""
    assert_matches_reference(device_path, case, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_device_path_low_precision(device_path, dtype):
    for case in LOW_PRECISION_CASES:
        assert_low_precision_matches_float64(device_path, case, dtype)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[_id(c) for c in GRADCHECK_CASES])
def test_device_path_gradcheck(device_path, case):
    tensors = case.make_tensors(torch.float64, "cpu", seed=3)
    names = [n for n, t in tensors.items() if t is not None]
    fn = lambda *args: case.run(device_path, dict(zip(names, args)))  # noqa: E731
    warm_up(fn, [tensors[n] for n in names])
    assert torch.autograd.gradcheck(fn, tuple(tensors[n] for n in names), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, tuple(tensors[n] for n in names), eps=1e-6, atol=1e-7)
    assert_gradients_keep_their_graph(fn, [tensors[n] for n in names])


@pytest.mark.parametrize("bias", [True, False])
def test_device_path_channels_last(device_path, bias):
    """A channels-last input: the output is channels-last like nn.Conv2d's, values and gradients
    those of the reference (the coordinates are kept per memory format: a contiguous call after a
    channels-last one of the same shape gets contiguous ones)."""
    import coordconv_fused as cf

    layer = cf.CoordConv2d(4, 6, 3, padding=1, bias=bias, with_r=True).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    for xin in (x.to(memory_format=torch.channels_last), x, x.to(memory_format=torch.channels_last)):
        out = assert_layer_matches_reference(layer, xin, device_path)
        assert out.is_contiguous(memory_format=torch.channels_last) == (xin.stride(1) == 1)


@pytest.mark.parametrize("separate", [False, True])
def test_device_path_channels_last_module(device_path, separate):
    """A module converted to channels-last (its filters too): the coordinate filter is used as a
    view in its memory order, the im2col rows reordered to match; values and every gradient those of
    the reference, also when the same layer is called again on a contiguous input."""
    import coordconv_fused as cf

    layer = cf.CoordConv2d(4, 6, 3, padding=1, with_r=True, coord_kernel_size=1 if separate else None).double()
    layer = layer.to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64)
    for xin in (x.to(memory_format=torch.channels_last), x):
        assert_layer_matches_reference(layer, xin, device_path)


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((3, 4, 5, 6), torch.contiguous_format),
        ((3, 4, 5, 6), torch.channels_last),
        ((3, 4, 5, 6, 2), torch.channels_last_3d),
        ((3, 4, 5), torch.contiguous_format),
        ((1, 4, 1, 1), torch.channels_last),
        ((0, 4, 5, 6), torch.channels_last),
    ],
)
def test_batch_sum(shape, fmt):
    """The batch sum over contiguous per-sample blocks equals ATen's sum over dim 0, with its gradient
    (also for a strided view, which takes ATen's path)."""
    from coordconv_fused.ops.aten import batch_sum

    t = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    for x in (t, t[:, :, ::2]):
        got, want = batch_sum(x), x.sum(0, keepdim=True)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
        g = torch.randn(want.shape, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(got, t, g)[0], torch.autograd.grad(want, t, g)[0])
    assert batch_sum(t.detach().bfloat16(), dtype=torch.float32).dtype == torch.float32


# ---- CUDA (where a GPU is visible; skipped, and listed at the end of the run, elsewhere) ----------------

CUDA_BACKENDS = ["torch", "cuda", "triton", "auto"]
CUDA_PAIRS = [(b, c) for c in CASES for b in CUDA_BACKENDS if supported(b, c)]


@pytest.mark.parametrize("backend,case", CUDA_PAIRS, ids=[f"{b}-{_id(c)}" for b, c in CUDA_PAIRS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cuda"])
def test_backend_matches_reference_cuda(backend, case, dtype, device, exact_cuda):
    assert_matches_reference(backend, case, dtype, device=device)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cuda"])
def test_low_precision_cuda(backend, dtype, device):
    for case in LOW_PRECISION_CASES:
        if supported(backend, case):
            assert_low_precision_matches_float64(backend, case, dtype, device=device)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("device", ["cuda"])
def test_gradcheck_cuda(backend, device):
    for case in GRADCHECK_CASES:
        if not supported(backend, case):
            continue
        tensors = case.make_tensors(torch.float64, device, seed=3)
        names = [n for n, t in tensors.items() if t is not None]
        fn = lambda *a, c=case, n=names: c.run(backend, dict(zip(n, a)))  # noqa: E731
        warm_up(fn, [tensors[n] for n in names])
        assert torch.autograd.gradcheck(
            fn,
            tuple(tensors[n] for n in names),
            eps=1e-6,
            atol=1e-7,
        )


@pytest.mark.parametrize("backend", ["cuda", "triton"])  # (our kernels; cuDNN is not ours to test)
@pytest.mark.parametrize("device", ["cuda"])
def test_int64_indexing_past_2_31_elements(backend, device):
    """An output of more than 2**31 elements: the far end holds the right coordinates (a kernel
    indexing with 32-bit ints would wrap around)."""
    from coordconv_fused import coord_conv2d

    h, w = 2, 2**30 + 3  # 2**31 + 6 elements per channel
    x = torch.zeros(1, 1, h, w, device=device, dtype=torch.float16)
    weight = torch.zeros(1, 1, 1, 1, device=device, dtype=torch.float16)
    cw = torch.tensor([0.0, 1.0], device=device, dtype=torch.float16).view(1, 2, 1, 1)  # the column coordinate
    y = coord_conv2d(x, weight, cw, None, backend=backend)
    assert y.shape == (1, 1, h, w)
    last = torch.tensor([(2 * j - (w - 1)) / (w - 1) for j in range(w - 3, w)], dtype=torch.float16)
    torch.testing.assert_close(y[0, 0, 1, -3:].cpu(), last)
    torch.testing.assert_close(y[0, 0, 1, :2].cpu(), torch.tensor([-1.0, -1.0], dtype=torch.float16), atol=1e-3, rtol=0)
