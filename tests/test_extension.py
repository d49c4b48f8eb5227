"""The C++/CUDA extension: the `cpp` backend (CPU), and the CUDA backend's host code and kernel
bodies run by the CPU emulation harness (coord_conv_cuda_emulated), against the reference."""

import pytest
import torch

from coordconv_fused import CoordConv2d, available_backends, coord_conv2d
from coordconv_fused.backends import native as extension
from coordconv_fused.testing import (
    Case,
    assert_as_accurate_as_aten,
    assert_layer_matches_reference,
    assert_matches_reference,
    emulated_epilogue_policy,
    kernel_events,
)

# A build without the extension fails these tests unless it was asked for (COORDCONV_NO_EXTENSION=1):
# tests/conftest.py.
pytestmark = pytest.mark.backend("cpp")


@pytest.fixture
def emulated_backend(emulated_cuda):
    """The emulated CUDA backend, exposed to the functional API for the duration of a test."""
    return emulated_cuda


EMULATED_CASES = [
    # cuDNN (here: ATen) for the data + the coordinate term [k_coord x points GEMM] + one epilogue pass:
    # shallow layers ...
    Case((7, 5)),
    Case((7, 5), with_r=True, padding=1),
    Case((9, 8), stride=2, padding=1, dilation=2),
    Case((9, 7), separate=True, kernel_size=4, stride=2, padding=1, with_r=True),
    Case((8, 6), kernel_size=4, padding="same", separate=True),
    Case((8, 7), padding=2, padding_mode="reflect", with_r=True),
    Case((8, 7), padding=(1, 2), padding_mode="replicate", groups=3, in_channels=3, out_channels=6),
    Case((8, 7), padding=2, padding_mode="circular", separate=True),
    Case((1, 9), kernel_size=(1, 3), padding=(0, 1), with_r=True),
    Case((9, 1), kernel_size=(3, 1), stride=2),
    Case((1, 1), kernel_size=3, padding=1, with_r=True),
    Case((5, 4), batch=0, padding=1),
    Case((6, 7), padding="valid", bias=False, batch=1),
    Case((17,), in_channels=2, out_channels=5, kernel_size=5, padding=2, with_r=True),
    Case((16,), stride=3, padding=1, padding_mode="circular", separate=True),
    Case((4, 5, 3), padding=1, with_r=True, in_channels=1),
    Case((4, 5, 3), kernel_size=(2, 3, 1), stride=(2, 1, 1), separate=True, with_r=True),
    # ... and deeper ones (an output size that is not a multiple of the epilogue's 4 elements per thread).
    Case((5, 3), in_channels=8, out_channels=3, batch=3, padding=0, with_r=True),
    Case((9, 8), in_channels=8, out_channels=6, padding=1, with_r=True),
    Case((9, 8), in_channels=8, out_channels=6, padding=2, padding_mode="reflect", separate=True),
    Case((10, 7), in_channels=12, out_channels=8, groups=2, stride=2, padding=1, dilation=2),
    Case((5, 4, 4), in_channels=4, out_channels=3, padding=1, padding_mode="replicate", with_r=True),
    Case((12,), in_channels=16, out_channels=4, kernel_size=3, padding="same", with_r=True),
    # a batch whose samples share each thread's term (the emulation aims for 64 threads), and a filter
    # beyond the epilogue's per-axis tables (the GEMM path)
    Case((3, 5), out_channels=3, batch=7, padding=1, with_r=True),
    Case((3, 4, 2), out_channels=2, batch=5, padding=1, separate=True),
    Case((21,), kernel_size=17, padding=8, with_r=True),
    Case((6, 20), kernel_size=(3, 17), padding=(1, 8)),
]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_cuda_matches_reference(emulated_backend, case, dtype):
    assert_matches_reference(emulated_backend, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_cuda_low_precision(emulated_backend, dtype):
    assert_matches_reference(emulated_backend, Case((7, 6), padding=1, with_r=True), dtype)
    assert_matches_reference(emulated_backend, Case((7, 6), in_channels=8, padding=1, separate=True), dtype)


@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (2, 3, 4, 5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_emulated_cuda_channels_last(emulated_backend, shape, bias):
    """A channels-last input: the epilogue adds the term laid out like one sample of the output (the
    flat index of the output's own memory order); output format, values and every gradient."""
    import coordconv_fused as cf

    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    cls = cf.CoordConv2d if len(shape) == 4 else cf.CoordConv3d
    layer = cls(shape[1], 5, 3, padding=1, bias=bias, with_r=True).double()
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt)
    out = assert_layer_matches_reference(layer, x, emulated_backend)
    conv = torch.nn.functional.conv2d if len(shape) == 4 else torch.nn.functional.conv3d
    # (the data convolution's format: ATen's CPU 3-D convolution keeps NCDHW)
    assert out.stride() == conv(x, layer.weight, padding=1).stride()


@pytest.mark.parametrize("out_channels,size", [(8, (8, 9)), (5, (7, 9)), (8, (6, 5))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last input", "channels_last module"])
@pytest.mark.parametrize("separate", [False, True], ids=["full", "separate"])
@pytest.mark.parametrize("policy", ["rule", "vectors", "scalars", "split"])
def test_emulated_cuda_epilogue_policies(emulated_backend, out_channels, size, dtype, layout, separate, policy):
    """The epilogue's paths (the emulation aims for 64 threads): one kernel with 16-byte accesses (2,
    4 or 8 elements by dtype; in channels-last, 8 channels of one point whose coordinates are
    evaluated once), by rule in channels-last where a sample's vectors give a quarter of the grid
    (8 x 8 x 9 elements), under "vectors" wherever the output allows them (5 x 7 x 9 is a multiple of
    no vector width), else one element per thread, its term shared by several samples; "split", one
    sample's terms into a buffer, then a pass over the batch; NCHW and channels-last outputs; a
    module converted to channels-last, whose coordinate filter the epilogue reads in that layout (no
    copy); the full and the separate coordinate filter."""
    import coordconv_fused as cf

    layer = cf.CoordConv2d(3, out_channels, 3, padding=1, with_r=True, coord_kernel_size=1 if separate else None)
    layer = layer.to(dtype)
    x = torch.randn(9, 3, *size, dtype=dtype)
    if layout != "contiguous":
        x = x.to(memory_format=torch.channels_last)
    if layout == "channels_last module":
        layer = layer.to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]
        assert separate or not layer.coord_weight.is_contiguous()  # (a [C, d, 1, 1] filter is both)
    with torch.no_grad(), emulated_epilogue_policy(policy):
        layer.backend = emulated_backend
        out = layer(x)
        layer.backend = "reference"
        ref = layer(x.contiguous())
    tol = {"atol": 5e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}  # (a wrong term is off by ~1)
    torch.testing.assert_close(out, ref, **tol)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout != "contiguous")


def test_emulated_cuda_gradcheck(emulated_backend):
    case = Case((4, 3), batch=1, in_channels=2, out_channels=2, padding=1, with_r=True, padding_mode="reflect")
    tensors = case.make_tensors(torch.float64, seed=2)
    names = [n for n, t in tensors.items() if t is not None]
    assert torch.autograd.gradcheck(
        lambda *a: case.run(emulated_backend, dict(zip(names, a))), tuple(tensors[n] for n in names)
    )


CPP_CASES = [
    Case((64, 64), batch=4, in_channels=1, out_channels=8, kernel_size=1),  # the paper's 1x1 layer
    Case((9, 8), in_channels=1, out_channels=3, kernel_size=1, padding=2, with_r=True),
    Case(
        (9, 8), in_channels=1, out_channels=3, kernel_size=1, stride=2, separate=True, padding_mode="reflect", padding=1
    ),
    Case((30, 31), batch=2, in_channels=3, out_channels=7, kernel_size=7, stride=2, padding=3, with_r=True),
    Case((12, 11), in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="circular", with_r=True),
]


@pytest.mark.parametrize("case", CPP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_matches_reference(case, dtype):
    assert_matches_reference("cpp", case, dtype)


# Gradients that sum over every output point (the bias's; the separate filter's and the radius
# channel's coordinate gradients), in float32: as accurate as ATen's own reductions against a
# float64 oracle. (One running float32 sum over the points erred 3-8x more than ATen's on these
# layers: a random search against float64 found it.)
@pytest.mark.parametrize(
    "case",
    [
        Case((13, 125), batch=2, in_channels=1, out_channels=1, kernel_size=(1, 6), stride=(1, 3), padding="valid",
             dilation=(1, 2), padding_mode="circular", with_r=True),
        Case((10, 33), batch=3, in_channels=2, out_channels=1, kernel_size=(5, 4), padding="same", dilation=(1, 2)),
        Case((40, 90), batch=2, in_channels=2, out_channels=3, kernel_size=3, padding=1, separate=True, with_r=True),
    ],
    ids=str,
)  # fmt: skip
def test_cpp_long_reductions_as_accurate_as_aten(case):
    assert_as_accurate_as_aten("cpp", case, names=("bias", "coord_weight"), factor=3.0)


# The coordinate gradient's contraction over the output rows (csrc/cpu/backward.cpp) runs as ATen's
# batched matrix products from C_out * OD * OH * KH * KW = 32768 multiply-adds on, as a loop per
# channel below: layers on both sides of that size, in 1-D, 2-D and 3-D, with the radius channel
# and pre-padding; every gradient against the reference, and float32's within a few times ATen's
# own error against float64.
BACKWARD_SIZE_CASES = [
    Case((64, 48), batch=2, in_channels=2, out_channels=32, kernel_size=5, padding=2),  # 51,200: batched
    Case((40, 30), batch=3, in_channels=2, out_channels=20, kernel_size=(3, 7), stride=(1, 2), padding=(1, 3),
         padding_mode="reflect", with_r=True),  # 16,800: loop
    Case((41, 30), batch=1, in_channels=3, out_channels=64, kernel_size=(5, 3), dilation=(2, 1), padding=4,
         with_r=True),  # 39,360: batched, with the radius
    Case((6, 20, 20), batch=2, in_channels=1, out_channels=40, kernel_size=3, padding=1),  # 43,200: batched, 3-D
    Case((500,), batch=2, in_channels=2, out_channels=8, kernel_size=9, padding=4),  # 72: loop, 1-D
]  # fmt: skip


@pytest.mark.parametrize("case", BACKWARD_SIZE_CASES, ids=str)
def test_cpp_coordinate_gradient_on_both_paths(case):
    assert_matches_reference("cpp", case, torch.float64)
    assert_as_accurate_as_aten("cpp", case, names=("bias", "coord_weight"), factor=3.0)


# The coordinate and bias gradients' first pass (csrc/cpu/backward.cpp): each channel's batch sum,
# four samples at a time (batches of 4, 5, 8 and 9: the groups and the rest), then its rows against
# the row tables, four columns at a time (tables of 1, 3, 7 and 11 columns, rows no multiple of a
# vector's length); float32 runs the AVX2 build of the row products where the CPU has AVX2.
BATCH_SUM_CASES = [
    Case((9, 13), batch=4, out_channels=3, kernel_size=1),
    Case((9, 13), batch=5, out_channels=3, padding=1, with_r=True),
    Case((7, 23), batch=8, out_channels=2, kernel_size=5, stride=2, padding=2),
    Case((6, 17), batch=9, out_channels=3, padding=1, separate=True),
]


@pytest.mark.parametrize("case", BATCH_SUM_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_batch_sums_and_row_products(case, dtype):
    assert_matches_reference("cpp", case, dtype)


# The SIMD direct kernel (float32, 1-D/2-D, groups 1, shallow: csrc/cpu/direct_simd.h): register
# tiles of 4 or 6 output channels x 4 vectors of 16 columns (AVX-512) or 4 x 3 vectors of 8 (AVX2) over a
# zero-margined, stride-phase-split copy of the input. So: rows of one ragged vector, of several
# vectors, of a full tile plus a ragged rest; channel counts around multiples of 4; zero padding
# wider than the kernel; strides 2, 3 and 4 (phase split) with dilation; depth 1 and depth 144.
AVX512_EVENT = "coordconv_fused::avx512_direct"  # the profiler event the kernel records
AVX2_EVENT = "coordconv_fused::avx2_direct"  # ...and its AVX2 build
AVX512_CASES = [
    Case((5, 7)),
    Case((9, 33), out_channels=17, padding=1, with_r=True),
    Case((6, 70), in_channels=3, out_channels=33, kernel_size=3, padding=1, dilation=2),
    Case((11, 140), in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3, with_r=True),
    Case((8, 50), in_channels=2, out_channels=5, kernel_size=5, stride=3, padding=4, bias=False),
    Case((5, 200), in_channels=3, out_channels=6, kernel_size=3, stride=4, padding=1, dilation=3),
    Case((7, 45), in_channels=3, out_channels=8, kernel_size=(3, 5), stride=(1, 2), padding=(2, 6), separate=True),
    Case((1, 19), in_channels=3, out_channels=4, kernel_size=(1, 3), padding=(0, 1)),
    Case((10, 3), in_channels=4, out_channels=9, kernel_size=3, padding=2, padding_mode="reflect", with_r=True),
    Case((37,), in_channels=3, out_channels=18, kernel_size=5, stride=2, padding=2, with_r=True),
    Case((12, 60), batch=1, in_channels=16, out_channels=20, kernel_size=3, padding="same"),
    Case((9, 130), batch=3, in_channels=1, out_channels=7, kernel_size=1),
    # output rows in bands of 16 (the last one partial) over two samples; odd width split in 2 phases
    Case((37, 41), batch=2, in_channels=3, out_channels=13, kernel_size=3, stride=(1, 2), padding=1),
    # pre-padding that maps positions (the coordinate term not affine in the rows: P read everywhere)
    Case((20, 24), in_channels=2, out_channels=7, kernel_size=3, padding=1, padding_mode="replicate"),
    Case((19, 18), in_channels=2, out_channels=6, kernel_size=5, padding=2, padding_mode="circular"),
    # at most 3 output channels (the 3-channel tile's forward), a row of 6 vectors and a rest of 2
    Case((18, 131), batch=2, in_channels=5, out_channels=3, kernel_size=3, padding=1),
    Case((13, 40), in_channels=2, out_channels=2, kernel_size=5, stride=2, padding=2, with_r=True),
]


# (avx512_6x4: the AVX-512 kernel's second tile shape, 6 output channels per tile, forced by name
# on the cases with more than one tile of 4 channels, where it is a candidate; avx512_3x6 and
# avx2_3x4: the 3-channel tiles, 3 channels x 6 or 4 vectors, forced on the cases where the forward
# (C_out <= 3) or the input gradient (C_in <= 3) has at most 3 channels)
@pytest.mark.parametrize("isa", ["avx512", "avx512_6x4", "avx512_3x6", "avx2", "avx2_3x4"])
@pytest.mark.parametrize("case", AVX512_CASES, ids=str)
def test_cpp_direct_simd_kernel(case, isa, monkeypatch):
    base, _, tile = isa.partition("_")
    if not getattr(extension, f"{base}_direct_available")():
        pytest.skip(f"the CPU has no {base.upper()} (the kernel is not used there)")
    if tile == "6x4" and case.out_channels <= 4:
        pytest.skip("one tile of 4 channels: the second tile shape is no candidate")
    if tile in ("3x6", "3x4") and min(case.in_channels, case.out_channels) > 3:
        pytest.skip("more than 3 channels each way: the 3-channel tile is no candidate")
    if base == "avx512":
        monkeypatch.delenv("COORDCONV_NO_AVX512", raising=False)
    else:
        monkeypatch.setenv("COORDCONV_NO_AVX512", "1")
    # this kernel whatever the measurement would choose
    monkeypatch.setenv("COORDCONV_CPU_KERNEL", f"{base}_direct_{tile}" if tile else "direct")
    event = f"coordconv_fused::{base}_direct"
    calls, _ = kernel_events(lambda: assert_matches_reference("cpp", case, torch.float32), event)
    assert calls > 0, f"the case did not take the {isa} kernel"


# The SIMD kernel, and the epilogue after oneDNN ("aten"), add the coordinate term from two [C_out, OW]
# tables on the rows where it is affine (every tap row inside the input) and read P on the others; not
# with the radius, the separate filter, or a pre-padding mode that maps positions (the values checked
# against the reference, and which path ran).
@pytest.mark.parametrize(
    "case,affine",
    [
        (Case((40, 45), in_channels=3, out_channels=10, kernel_size=7, stride=2, padding=3), True),
        (Case((37, 41), batch=2, in_channels=3, out_channels=13, kernel_size=3, stride=(1, 2), padding=1), True),
        (Case((20, 24), in_channels=2, out_channels=5, kernel_size=3), True),
        (Case((20, 24), in_channels=2, out_channels=5, kernel_size=3, padding=1, with_r=True), False),
        (Case((20, 24), in_channels=2, out_channels=5, kernel_size=3, padding=1, separate=True), False),
        (AVX512_CASES[-1], False),
        (Case((2, 24), in_channels=2, out_channels=5, kernel_size=3, padding=1), False),  # < 3 inner rows
    ],
    ids=str,
)
@pytest.mark.parametrize("kernel", ["direct", "aten"])
def test_cpp_affine_coordinate_rows(case, affine, kernel, monkeypatch):
    simd = any(getattr(extension, f"{i}_direct_available")() for i in ("avx512", "avx2"))
    if kernel == "direct" and not simd:
        pytest.skip("the CPU has neither AVX-512 nor AVX2 (no SIMD kernel)")
    monkeypatch.setenv("COORDCONV_CPU_KERNEL", kernel)
    event = "coordconv_fused::affine_coord_rows"
    calls, _ = kernel_events(lambda: assert_matches_reference("cpp", case, torch.float32), event)
    assert (calls > 0) == affine


@pytest.mark.parametrize(
    "case",
    AVX512_CASES[:4] + [Case((9, 130), batch=3, in_channels=1, out_channels=7, kernel_size=1, padding=1, with_r=True)],
    ids=str,
)
def test_cpp_without_avx512_kernel(case, monkeypatch):
    """The same layers through the paths other CPUs take: oneDNN + epilogue, or the row kernel at depth 1."""
    monkeypatch.setenv("COORDCONV_NO_AVX512", "1")
    calls, _ = kernel_events(lambda: assert_matches_reference("cpp", case, torch.float32), AVX512_EVENT)
    assert calls == 0


def test_cpp_parallel_loops_use_threads():
    """ATen's parallel_for is inlined into the extension: without OpenMP at build time it runs serially.
    (Checked in the test extension, built with the same flags as coordconv_fused._C.)"""
    from coordconv_fused import _C_testing  # built wherever the extension is

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _C_testing.parallel_for_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "case",
    [
        Case((5, 4), padding=1, with_r=True),
        Case((5, 4), in_channels=1, kernel_size=1, padding=1, with_r=True),
        Case((6, 5), separate=True, kernel_size=2, padding="same", padding_mode="reflect", with_r=True),
        Case((3, 3, 4), kernel_size=2, with_r=True, padding=1, padding_mode="replicate"),
    ],
    ids=str,
)
def test_cpp_gradcheck(case):
    tensors = case.make_tensors(torch.float64, seed=4)
    names = [n for n, t in tensors.items() if t is not None]
    assert torch.autograd.gradcheck(lambda *a: case.run("cpp", dict(zip(names, a))), tuple(tensors[n] for n in names))


def _op_args(separate=False, mode="zeros", c_in=3, k=3):
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 7, 6, requires_grad=True)
    w = torch.randn(4, c_in, k, k, requires_grad=True)
    cw = torch.randn(4, 3, *((1, 1) if separate else (k, k)), requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    pad, pre_pad = (0, [1, 1, 1, 1]) if mode != "zeros" else (1, [0, 0, 0, 0])
    return (x, w, cw, b, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, pre_pad, mode, True, separate)


@pytest.mark.parametrize(
    "mask",
    [
        (True, True, True, True),
        (False, True, True, False),
        (True, False, False, True),
        (False, False, True, False),
        (False, False, False, False),
    ],
    ids=str,
)
@pytest.mark.parametrize("kwargs", [{}, {"separate": True}, {"mode": "reflect"}, {"c_in": 1, "k": 1}], ids=str)
def test_backward_op(kwargs, mask, emulated_cuda):
    """coord_conv_ext_backward (the cpp backend's whole backward in one call) against autograd through the
    emulated CUDA op (whose backward is the generic one: convolution_backward + the coordinate-gradient op):
    each gradient where the mask asks, None elsewhere; (opcheck: tests/test_ops.py)."""
    x, w, cw, b, *rest = _op_args(**kwargs)
    y = torch.ops.coordconv_fused.coord_conv_cuda_emulated(x, w, cw, b, *rest)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w, cw, b), g)
    args = (g, x.detach(), w.detach(), cw.detach(), *rest, list(mask))
    got = torch.ops.coordconv_fused.coord_conv_ext_backward(*args)
    for name, want, e, r in zip(("input", "weight", "coord_weight", "bias"), mask, expected, got):
        if want:
            torch.testing.assert_close(r, e, atol=1e-4, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert r is None, name


@pytest.mark.parametrize("kernel", ["aten", "measure"])
@pytest.mark.parametrize("size", [(2, 3, 7, 6), (2, 16, 64, 64)], ids=["small", "large"])
@pytest.mark.parametrize("need_in", [True, False], ids=["input_grad", "no_input_grad"])
def test_backward_op_calls_nn_conv2ds_convolution_backward(size, need_in, kernel, monkeypatch, emulated_cuda):
    """Where ATen computes the input gradient (or none is asked for), the input, weight and bias
    gradients are one convolution_backward call with nn.Conv2d's arguments (the bias gradient
    included); where the direct kernel computes the input gradient, that call computes the weight
    gradient alone. Both against the generic backward, and the calls and their output masks
    recorded. (Measured: a kernel may take the input gradient.)"""
    monkeypatch.setenv("COORDCONV_CPU_KERNEL", kernel)
    n, c_in, h, w_ = size
    x, w, cw, b, *rest = _op_args(c_in=c_in)
    x = torch.randn(n, c_in, h, w_, requires_grad=True)
    y = torch.ops.coordconv_fused.coord_conv_cuda_emulated(x, w, cw, b, *rest)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w, cw, b), g)
    mask = [need_in, True, True, True]
    args = (g, x.detach(), w.detach(), cw.detach(), *rest, mask)
    extension.clear_kernel_choices()
    torch.ops.coordconv_fused.coord_conv_ext_backward(*args)  # (a measured choice is made on this first call)
    # (with the weight gradient wanted, the choice is timed on the whole: op "backward")
    chosen = [c["chosen"] for c in extension.kernel_choices() if c["op"] == "backward"]
    aten_input_grad = kernel == "aten" or not chosen or chosen[0] == "aten"
    got = []
    with torch.profiler.profile(record_shapes=True) as prof:
        got.extend(torch.ops.coordconv_fused.coord_conv_ext_backward(*args))
    masks = [
        e.concrete_inputs[-1] for e in prof.events() if e.name == "aten::convolution_backward" and e.concrete_inputs
    ]
    for name, e, r, asked in zip(("input", "weight", "coord_weight", "bias"), expected, got, mask):
        if not asked:
            assert r is None, name
            continue
        torch.testing.assert_close(r, e, atol=2e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    if not need_in or aten_input_grad:
        assert masks == [[need_in, True, True]]
    else:  # (the input gradient by the kernel)
        assert masks == [[False, True, False]]


def test_backward_op_grad_layouts():
    """A channels_last or expanded (y.sum().backward()) grad gives the gradients a contiguous one gives."""
    x, w, cw, b, *rest = _op_args()
    x = torch.randn(3, *x.shape[1:])
    args = [t.detach() for t in (x, w, cw)]
    g = torch.randn(3, 4, 7, 6)
    mask = [True, True, True, True]
    want = torch.ops.coordconv_fused.coord_conv_ext_backward(g, *args, *rest, mask)
    got = torch.ops.coordconv_fused.coord_conv_ext_backward(g.to(memory_format=torch.channels_last), *args, *rest, mask)
    for r, e in zip(got, want):
        torch.testing.assert_close(r, e, atol=1e-5, rtol=1e-5)
    ones = torch.ones(()).expand(3, 4, 7, 6)
    got = torch.ops.coordconv_fused.coord_conv_ext_backward(ones, *args, *rest, mask)
    want = torch.ops.coordconv_fused.coord_conv_ext_backward(ones.contiguous(), *args, *rest, mask)
    for r, e in zip(got, want):
        torch.testing.assert_close(r, e, atol=1e-5, rtol=1e-5)


def test_backward_op_half_and_batch(emulated_cuda):
    """bfloat16 and a batch of 5: the coordinate and bias gradients sum the batch in float32."""
    x, w, cw, b, *rest = _op_args()
    x = torch.randn(5, *x.shape[1:])
    g = torch.randn(5, 4, 7, 6)
    args = [t.detach().to(torch.bfloat16) for t in (g, x, w, cw)]
    got = torch.ops.coordconv_fused.coord_conv_ext_backward(*args, *rest, [False, False, True, True])
    gs = g.to(torch.bfloat16).float().sum(0, keepdim=True)
    expected_cw = torch.ops.coordconv_fused.coord_conv_cuda_emulated_coord_weight_grad(
        gs, x.float(), w.detach().float(), cw.detach().float(), *rest
    )
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[2].float(), expected_cw, atol=0.1, rtol=0.01)
    torch.testing.assert_close(got[3].float(), gs.sum((0, 2, 3)), atol=0.1, rtol=0.01)


@pytest.mark.parametrize("no_avx512", [False, True], ids=["kernel", "aten"])
@pytest.mark.parametrize(
    "shape",
    [
        # (N, C_in, spatial, C_out, kernel, padding, dilation, stride)
        (2, 3, (9, 21), 5, 3, 1, 1, 1),
        (1, 2, (8, 70), 8, (3, 5), (0, 2), (2, 1), 1),
        (3, 1, (37,), 6, 5, 4, 1, 1),  # 1-D, padding = dil * (k - 1): the transposed pad is 0
        (2, 3, (10, 10), 4, 3, 1, 1, 2),  # stride 2: four phases
        (1, 3, (23, 30), 8, 7, 3, 1, 2),  # a ResNet stem, odd height
        (2, 2, (11, 20), 5, 3, (2, 1), 2, 3),  # stride 3 with dilation 2
        (2, 3, (9, 12), 4, 1, 0, 1, 2),  # 1x1 stride 2: the odd positions get no tap (zero)
        (2, 3, (21,), 4, 4, 1, 1, 2),  # 1-D, even kernel
        (2, 16, (6, 50), 40, 3, 1, 1, 1),  # 16 channels, deep transposed problem: convolution_backward
        (2, 8, (10, 40), 6, 3, 1, 1, 2),  # strided on 8 channels: convolution_backward
    ],
    ids=str,
)
def test_input_grad_op(shape, no_avx512, monkeypatch):
    """The cpp backend's input gradient (a direct kernel per stride phase for layers on few channels) against
    ATen's convolution_backward, (opcheck: tests/test_ops.py); the kernel, AVX-512 or (capped) AVX2, runs
    exactly where input_grad_kernel_pays."""
    monkeypatch.setenv(
        "COORDCONV_CPU_KERNEL", "heuristic"
    )  # the fixed rule (no measurement: tests/test_kernel_choice.py)
    if no_avx512:
        monkeypatch.setenv("COORDCONV_NO_AVX512", "1")
    else:
        monkeypatch.delenv("COORDCONV_NO_AVX512", raising=False)
    n, c_in, spatial, c_out, k, pad, dil, stride = shape
    nd = len(spatial)
    k, pad, dil = ((v,) * nd if isinstance(v, int) else v for v in (k, pad, dil))
    torch.manual_seed(0)
    x, w = torch.randn(n, c_in, *spatial), torch.randn(c_out, c_in, *k)
    args = [[stride] * nd, list(pad), list(dil), False, [0] * nd, 1]
    out_sizes = [(s + 2 * p - d * (kk - 1) - 1) // stride + 1 for s, p, d, kk in zip(spatial, pad, dil, k)]
    g = torch.randn(n, c_out, *out_sizes)
    got = []
    with_avx512 = extension.avx512_direct_available() and not no_avx512
    event = AVX512_EVENT if with_avx512 else AVX2_EVENT
    calls, _ = kernel_events(
        lambda: got.append(torch.ops.coordconv_fused.coord_conv_ext_input_grad(g, x, w, *args)), event
    )
    expected = torch.ops.aten.convolution_backward(g, x, w, None, *args, [True, False, False])[0]
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=1e-5)
    kernel = with_avx512 or extension.avx2_direct_available()
    assert (calls > 0) == (kernel and c_in <= (8 if stride == 1 else 4))


def test_cached_coordinate_term_follows_coord_weight():
    torch.manual_seed(0)
    m = CoordConv2d(3, 4, 3, padding=1, with_r=True, backend="cpp").eval()
    x = torch.randn(2, 3, 8, 7)
    with torch.no_grad():
        first = m(x)
        assert torch.equal(m(x), first)  # served from the cache
        for update in (
            lambda: m.coord_weight.mul_(2),  # in place: the version counter changes
            lambda: m.coord_weight.data.add_(1),
        ):  # through .data: it does not
            update()
            got = m(x)
            m.backend = "reference"
            torch.testing.assert_close(got, m(x))
            m.backend = "cpp"
        m.coord_weight = torch.nn.Parameter(torch.randn_like(m.coord_weight))  # a new tensor
        got = m(x)
        m.backend = "reference"
        torch.testing.assert_close(got, m(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_last_term_follows_coord_weight(ndim, dtype):
    """A channels-last output gets the coordinate term from a channels-last copy of the cached term
    (csrc/cpu/coord_term.h, P_last): made for a cached term that had none (the layer first run on an
    NCHW input), made again with a new term (coord_weight changed in place, through ``.data``, or a
    new tensor); every output equals the reference backend's on the same values, in the layout
    ``nn.Conv`` gives it."""
    from coordconv_fused import CoordConv3d

    torch.manual_seed(0)
    layer, fmt, sizes = (CoordConv2d, torch.channels_last, (9, 7)) if ndim == 2 else (
        CoordConv3d, torch.channels_last_3d, (5, 6, 4))  # fmt: skip
    m = layer(3, 5, 3, padding=1, with_r=True, backend="cpp", dtype=dtype).eval()
    x = torch.randn(2, 3, *sizes, dtype=dtype)
    tol = {"atol": 5e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}  # (a wrong term is off by ~1)

    conv = torch.nn.functional.conv2d if ndim == 2 else torch.nn.functional.conv3d

    def check(xin):
        got = m(xin)
        plain = conv(xin, m.weight, padding=1)
        assert got.is_contiguous(memory_format=fmt) == plain.is_contiguous(memory_format=fmt)
        m.backend = "reference"
        expected = m.double()(xin.double())
        m.to(dtype).backend = "cpp"
        torch.testing.assert_close(got, expected.to(dtype), **tol)

    with torch.no_grad():
        check(x)  # NCHW first: the cached term has no channels-last copy yet
        check(x.contiguous(memory_format=fmt))
        check(x.contiguous(memory_format=fmt))  # the copy reused
        for update in (
            lambda: m.coord_weight.mul_(-2),
            lambda: m.coord_weight.data.add_(0.5),
            lambda: setattr(m, "coord_weight", torch.nn.Parameter(torch.randn_like(m.coord_weight))),
        ):
            update()
            check(x.contiguous(memory_format=fmt))
            check(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("variant", [{"with_r": True}, {"coord_kernel_size": 1}], ids=str)
def test_channels_last_backward_matches_reference(ndim, dtype, variant):
    """A channels-last grad (what a channels-last model's backward hands the op) is summed over the
    batch in its own memory order (csrc/batch_sum.h): every gradient equals the reference backend's,
    also with a batch of one and with an expanded grad (``y.sum().backward()``)."""
    from coordconv_fused import CoordConv3d

    torch.manual_seed(0)
    layer, fmt, sizes = (CoordConv2d, torch.channels_last, (9, 7)) if ndim == 2 else (
        CoordConv3d, torch.channels_last_3d, (5, 6, 4))  # fmt: skip
    m = layer(3, 5, 3, padding=1, backend="cpp", dtype=dtype, **variant)
    ref = layer(3, 5, 3, padding=1, backend="reference", dtype=dtype, **variant)
    ref.load_state_dict(m.state_dict())
    for n in (3, 1):
        for expanded in (False, True):
            x = torch.randn(n, 3, *sizes, dtype=dtype).contiguous(memory_format=fmt)
            g = torch.randn(n, 5, *sizes, dtype=dtype).contiguous(memory_format=fmt)
            grads = []
            for model in (m, ref):
                model.zero_grad()
                xin = x.detach().clone().requires_grad_()
                out = model(xin)
                if expanded:
                    out.sum().backward()
                else:
                    out.backward(g)
                grads.append([xin.grad, *(p.grad for p in model.parameters())])
            torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("variant", [{"with_r": True}, {"separate": True, "kernel_size": 3}], ids=str)
def test_cached_backward_tables_follow_geometry_and_dtype(variant):
    """The coordinate gradient's tables are built once per geometry and dtype (csrc/cpu/coord_term.h):
    layers that differ only in dtype, padding mode, stride or channel count must not share them."""
    layers = [
        Case((9, 8), in_channels=2, out_channels=3, padding=1, **{"kernel_size": 3, **variant}),
        Case((9, 8), in_channels=2, out_channels=3, padding=1, padding_mode="reflect", **{"kernel_size": 3, **variant}),
        Case((9, 8), in_channels=2, out_channels=3, padding=1, stride=2, **{"kernel_size": 3, **variant}),
        Case((9, 8), in_channels=2, out_channels=5, padding=1, **{"kernel_size": 3, **variant}),
    ]
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float64):
        for case in layers:
            assert_matches_reference("cpp", case, dtype, check=("coord_weight", "bias"))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_prepared_call_is_the_op_and_defers_to_torch_function(padding_mode):
    """The cpp backend's per-call path (csrc/prepared_call.cpp: the op's arguments converted once) gives
    torch.ops' bits, with the gradients; a tensor subclass with __torch_function__, or a torch function mode,
    sees the op as through torch.ops (the prepared call declines, torch.ops takes it)."""
    from torch.overrides import TorchFunctionMode

    torch.manual_seed(0)
    layer = CoordConv2d(3, 8, 3, padding=1, padding_mode=padding_mode, with_r=True, backend="cpp")
    x = torch.randn(2, 3, 9, 7, requires_grad=True)
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    y = layer(x)  # the first call of this signature validates and prepares
    calls, _ = kernel_events(lambda: layer(x), "coordconv_fused::coord_conv_ext")
    assert calls == 1
    expected = coord_conv2d(
        x, layer.weight, layer.coord_weight, layer.bias, padding=1, padding_mode=padding_mode, with_r=True,
        backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(layer(x), y, atol=0, rtol=0)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(layer(x), (x, layer.weight, layer.coord_weight, layer.bias), g)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.coord_weight, layer.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    out = layer(x.detach().as_subclass(Logged))
    assert type(out) is Logged and "coordconv_fused.coord_conv_ext.default" in seen
    seen.clear()
    with Mode():
        torch.testing.assert_close(layer(x), y, atol=0, rtol=0)
    assert "coordconv_fused.coord_conv_ext.default" in seen


def test_prepared_call_errors_are_python_exceptions():
    """The prepared call raises what the op raises (a C++ check becomes a RuntimeError), and refuses what is
    not its handle or not its arguments."""
    from coordconv_fused import _C

    handle = _C.prepare_call("coordconv_fused::coord_conv_ext", [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                             [0, 0, 0, 0], "zeros", False, False)  # fmt: skip
    w, cw = torch.randn(4, 3, 3, 3), torch.randn(4, 2, 3, 3)
    assert _C.call_prepared(handle, torch.randn(1, 3, 5, 5), w, cw, None).shape == (1, 4, 5, 5)
    with pytest.raises(RuntimeError):
        _C.call_prepared(handle, torch.randn(1, 5, 5, 5), w, cw, None)  # 5 input channels for a 3-channel weight
    with pytest.raises(TypeError, match="call_prepared"):
        _C.call_prepared(handle, torch.randn(1, 3, 5, 5), w, cw)
    with pytest.raises(ValueError):
        _C.call_prepared(object(), torch.randn(1, 3, 5, 5), w, cw, None)
    with pytest.raises(RuntimeError, match="coord_conv_nonexistent"):
        _C.prepare_call("coordconv_fused::coord_conv_nonexistent", [1], [1], [1], False, [0], 1, [0, 0], "zeros",
                        False, False)  # fmt: skip
    with pytest.raises(TypeError):
        _C.prepare_call("coordconv_fused::coord_conv_ext", [1, "a"], [1, 1], [1, 1], False, [0, 0], 1, [0, 0, 0, 0],
                        "zeros", False, False)  # fmt: skip


def test_auto_prefers_cpp_on_cpu():
    from coordconv_fused.backends import resolve_backend
    from coordconv_fused.spec import make_spec

    assert "cpp" in available_backends("cpu")
    assert resolve_backend("auto", torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), make_spec(2, (3, 3))).name == "cpp"


def test_transposed_refused_and_cuda_unavailable_is_actionable():
    from coordconv_fused import coord_conv_transpose2d

    with pytest.raises(ValueError, match="not implemented in the C\\+\\+/CUDA kernels"):
        coord_conv_transpose2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3), backend="cpp")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            coord_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4, 2, 3, 3), backend="cuda")


def test_missing_extension_message(monkeypatch):
    from coordconv_fused.functional import clear_plan_cache

    monkeypatch.setattr(extension, "LOAD_ERROR", "No module named 'coordconv_fused._C'")
    clear_plan_cache()  # calls resolved while the extension was there would keep it
    with pytest.raises(RuntimeError, match="not built .* `pip install --no-build-isolation -e .`"):
        coord_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4, 2, 3, 3), backend="cpp")
    assert "cpp" not in available_backends()


def test_native_ops_have_their_cpu_kernels():
    """The schemas are declared once (coordconv_fused/ops/schema.py); the extension registers a CPU
    kernel for every one of them, and the forward's autograd (C++, csrc/autograd/); the composite
    op of the differentiable backward has its ATen decomposition."""
    from coordconv_fused.ops.schema import COMPOSITE_OPS, NATIVE_OPS

    for name, schema in {**NATIVE_OPS, **COMPOSITE_OPS}.items():
        assert str(getattr(torch.ops.coordconv_fused, name).default._schema) == f"coordconv_fused::{name}{schema}"
    for name in NATIVE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"coordconv_fused::{name}", "CPU"), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key("coordconv_fused::coord_conv_ext", "Autograd")
    # (inductor hands the forward its input in the graph's layout: coordconv_fused/ops/schema.py)
    assert torch.Tag.flexible_layout in torch.ops.coordconv_fused.coord_conv_ext.default.tags
    for name in COMPOSITE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"coordconv_fused::{name}", "CompositeImplicitAutograd")


def test_cuda_epilogue_policy_switch():
    """The cuda backend's epilogue policy: get, set, restore, and a clear error for an unknown one
    (the switch is in coordconv_fused._C, CUDA build or not)."""
    previous = extension.cuda_epilogue_policy()
    assert previous == "rule"
    try:
        assert extension.cuda_epilogue_policy("split") == "rule"
        assert extension.cuda_epilogue_policy("vectors") == "split"
        assert extension.cuda_epilogue_policy() == "vectors"
        with pytest.raises(ValueError, match="policy must be one of"):
            extension.cuda_epilogue_policy("always")
    finally:
        extension.cuda_epilogue_policy(previous)
    assert extension.cuda_epilogue_policy() == "rule"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_epilogue_policies_same_bits(dtype, channels_last, monkeypatch):
    """On the GPU, the epilogue's 16-byte and one-element kernels give the same bits (each element's
    term is the same sum in the same order), and match the reference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (float32 at float32's precision)
    layer = CoordConv2d(16, 32, 3, padding=1, with_r=True, backend="cuda").to("cuda", dtype)
    for size in (8, 33, 96):  # (33: a sample that is a multiple of no vector width)
        x = torch.randn(4, 16, size, size, device="cuda", dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        outs = {}
        previous = extension.cuda_epilogue_policy()
        try:
            for policy in extension.EPILOGUE_POLICIES:
                extension.cuda_epilogue_policy(policy)
                with torch.no_grad():
                    outs[policy] = layer(x)
        finally:
            extension.cuda_epilogue_policy(previous)
        for policy in extension.EPILOGUE_POLICIES:
            assert torch.equal(outs[policy], outs["scalars"]), policy
        layer.backend = "reference"
        with torch.no_grad():
            ref = layer(x)
        layer.backend = "cuda"
        tol = {"atol": 5e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}  # (a wrong term is off by ~1)
        torch.testing.assert_close(outs["rule"], ref, **tol)


@pytest.mark.skipif(
    __import__("os").environ.get("COORDCONV_EXPECT_CUDA") != "1",
    reason="only where the build was asked for CUDA (CI sets COORDCONV_EXPECT_CUDA=1)",
)
def test_cuda_kernels_were_compiled():
    # CI builds with FORCE_CUDA=1: the CUDA sources compiled and their kernels are registered.
    assert extension.has_cuda_kernels()


# ---- the `torch` backend's CPU path from C++ (_C.call_aten) --------------------------------------

ATEN_CALL_CASES = [
    Case((7, 5), with_r=True, padding=1),
    Case((9, 8), stride=2, padding=1, dilation=2, groups=3, in_channels=3, out_channels=6),
    Case((8, 7), padding=2, padding_mode="reflect", separate=True, kernel_size=3),
    Case((8, 7), padding=(1, 2), padding_mode="circular"),
    Case((11,), padding=1, with_r=True),
    Case((4, 5, 3), kernel_size=2, padding=1),
    Case((4, 3), transposed=True, stride=2, with_r=True),
    Case((6, 5), batch=0, padding=1),
]


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("case", ATEN_CALL_CASES, ids=str)
def test_torch_backend_steady_state_from_cpp(case, path):
    """After the first call of an input signature (the Python path, which makes the coordinates, off
    the CPU their im2col matrix, and hands them to C++), the ``torch`` backend's calls are C++'s
    ATen calls: the same output and every gradient as the reference, call after call, with and
    without gradients, after ``coord_weight`` is changed through ``.data`` (by value, no version
    bump), for a channels-last input and filter, and on a new input signature. ``device``: the path
    that runs off the CPU (the bias in the term's GEMM, nothing kept by value), on CPU tensors."""
    _check_steady_state_from_cpp(case, "cpu", path == "cpu")


@pytest.mark.backend("torch", device="cuda")
@pytest.mark.parametrize("case", ATEN_CALL_CASES, ids=str)
def test_torch_backend_steady_state_from_cpp_cuda(case):
    """The same on CUDA tensors, where the device path runs."""
    _check_steady_state_from_cpp(case, "cuda", True)


def _check_steady_state_from_cpp(case, device: str, cpu_path: bool) -> None:
    from coordconv_fused.testing import torch_backend_counting_python

    fn, python_calls = torch_backend_counting_python(case.spec(), cpu_path)
    tensors = case.make_tensors(torch.float64, device, seed=1)
    names = [n for n, t in tensors.items() if t is not None]

    def check(x, **changes):
        ts = {**tensors, **changes, "input": x}
        ref = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in ts.items()}
        got = fn(*(ts[n] for n in ("input", "weight", "coord_weight", "bias")))
        want = case.run("reference", ref)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(want)
        leaves = [n for n in names if ts[n] is not None and ts[n].requires_grad]
        got_grads = torch.autograd.grad(got, [ts[n] for n in leaves], g, allow_unused=True)
        want_grads = torch.autograd.grad(want, [ref[n] for n in leaves], g, allow_unused=True)
        for n, a, b in zip(leaves, got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(fn(*(ts[n] for n in ("input", "weight", "coord_weight", "bias"))), want)

    x = tensors["input"]
    for _ in range(3):
        check(x)
    assert len(python_calls) == 1  # (the first call only)
    with torch.no_grad():
        tensors["coord_weight"].data.mul_(-2.0)  # (no version bump: P is kept by value)
    check(x)

    def steady(x, **changes):  # a call of a signature made before takes no Python
        check(x, **changes)
        before = len(python_calls)
        check(x, **changes)
        assert len(python_calls) == before, "a signature's second call ran the Python path"

    if x.dim() == 4 and x.shape[0] > 0:
        steady(x.contiguous(memory_format=torch.channels_last))
        if not case.transposed:  # (a channels-last coordinate filter: its matrix is a view in that order)
            cw = tensors["coord_weight"].detach().contiguous(memory_format=torch.channels_last)
            steady(x, coord_weight=cw.requires_grad_())
            steady(x, coord_weight=cw.detach())
            steady(x.contiguous(memory_format=torch.channels_last), coord_weight=cw.requires_grad_())
    steady(torch.cat([x, x]) if x.shape[0] else x)
    assert len(python_calls) <= 5  # (at most one per new signature)


def _grad_layouts(like: torch.Tensor) -> dict:
    """Output gradients of ``like``'s shape in the layouts autograd may hand a node: dense, the
    other memory format, the stride-0 expansion of ``.sum().backward()``, a strided slice."""
    g = torch.randn_like(like, memory_format=torch.contiguous_format)
    out = {
        "dense": g,
        "expanded": torch.ones((), dtype=g.dtype).expand_as(g),
        "sliced": torch.cat([g, g], -1)[..., ::2],
    }
    if g.dim() == 4:
        out["channels_last"] = g.contiguous(memory_format=torch.channels_last)
    return out


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("case", ATEN_CALL_CASES, ids=str)
def test_torch_backend_gradients_from_cpp(case, path):
    """The gradients of the ``torch`` backend's calls from C++ are the reference's for every subset
    of tensors that require grad, every layout of the output and of the output's gradient, and
    (create_graph) to second order, with respect to the tensors and to the output's gradient. On the
    device path (run here on CPU tensors) the coordinate term and the bias are one autograd node over
    the data convolution (csrc/autograd/device_term.h; five nodes before)."""
    _check_term_node(case, "cpu", path == "cpu")


@pytest.mark.backend("torch", device="cuda")
@pytest.mark.parametrize("case", ATEN_CALL_CASES, ids=str)
def test_torch_backend_gradients_from_cpp_cuda(case):
    """The same on CUDA tensors, where the device path runs."""
    _check_term_node(case, "cuda", False)


def _check_term_node(case, device: str, cpu_path: bool) -> None:
    from coordconv_fused.testing import torch_backend_counting_python

    fn, python_calls = torch_backend_counting_python(case.spec(), cpu_path)
    tensors = case.make_tensors(torch.float64, device, seed=2)
    names = [n for n, t in tensors.items() if t is not None]
    order = ("input", "weight", "coord_weight", "bias")
    x = tensors["input"]
    cw = tensors["coord_weight"]
    layouts = [(x, cw)]
    if x.dim() == 4:  # a channels-last input, filter, and both
        x_last, cw_last = (t.contiguous(memory_format=torch.channels_last) for t in (x, cw))
        layouts += [(x_last, cw)] + ([(x, cw_last), (x_last, cw_last)] if not case.transposed else [])
    for xin, cwin in layouts:
        for grad_of in [names] + [[n] for n in names]:
            ts = {n: (None if t is None else t.detach().requires_grad_(n in grad_of)) for n, t in tensors.items()}
            ts["input"] = xin.detach().requires_grad_("input" in grad_of)
            ts["coord_weight"] = cwin.detach().requires_grad_("coord_weight" in grad_of)
            ref = {
                n: (None if t is None else t.detach().clone().requires_grad_(t.requires_grad)) for n, t in ts.items()
            }
            want = case.run("reference", ref)
            for _ in range(2):  # (a signature's first call runs the Python path)
                got = fn(*(ts[n] for n in order))
            if not cpu_path:
                assert "DeviceTermFunction" in got.grad_fn.name(), got.grad_fn.name()
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            leaves = [n for n in grad_of if ts[n] is not None]
            for kind, g in _grad_layouts(want).items():
                got_grads = torch.autograd.grad(got, [ts[n] for n in leaves], g, retain_graph=True)
                want_grads = torch.autograd.grad(want, [ref[n] for n in leaves], g, retain_graph=True)
                for n, a, b in zip(leaves, got_grads, want_grads):
                    torch.testing.assert_close(
                        a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=n, k=kind: f"{n}, {k}: {m}"
                    )
            # Second order, through the node's backward: the derivatives of <grads, v> with respect
            # to the tensors and to the output's gradient g. (gradgradcheck cannot see a gradient
            # that lost its graph: it checks only first-order gradients that require grad.)
            g = torch.randn_like(want).requires_grad_()
            got_grads = torch.autograd.grad(got, [ts[n] for n in leaves], g, create_graph=True)
            want_grads = torch.autograd.grad(want, [ref[n] for n in leaves], g, create_graph=True)
            vs = [torch.randn_like(a) for a in want_grads]
            got_sum = sum((a * v).sum() for a, v in zip(got_grads, vs))
            want_sum = sum((a * v).sum() for a, v in zip(want_grads, vs))
            a2 = torch.autograd.grad(got_sum, [ts[n] for n in leaves] + [g], allow_unused=True, materialize_grads=True)
            b2 = torch.autograd.grad(
                want_sum, [ref[n] for n in leaves] + [g], allow_unused=True, materialize_grads=True
            )
            for n, a, b in zip(leaves + ["the output's gradient"], a2, b2):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=n: f"second order, {n}: {m}")
    assert len(python_calls) <= len(layouts)  # (at most one per input signature; the rest from C++)


_THREADS_SCRIPT = """
import sys, threading, torch
from contextlib import nullcontext
from coordconv_fused import CoordConv2d, backends
from coordconv_fused.testing import device_path_torch_backend

torch.manual_seed(0)
device_path = sys.argv[1] == "torch_device_path"
with backends.temporary_backend(device_path_torch_backend()) if device_path else nullcontext(sys.argv[1]) as name:
    layer = CoordConv2d(3, 8, 3, padding=1, with_r=True, backend=name).double()
    ref = CoordConv2d(3, 8, 3, padding=1, with_r=True, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    xs = [torch.randn(n, 3, h, w, dtype=torch.float64) for n, h, w in [(1, 8, 8), (2, 9, 7), (3, 8, 8), (1, 5, 11)]]
    xs += [x.contiguous(memory_format=torch.channels_last) for x in xs]
    want = [ref(x).detach() for x in xs]
    wrong = []

    def work(i):
        for r in range(300):
            j = (i + r) % len(xs)
            with torch.set_grad_enabled(r % 2 == 0):
                y = layer(xs[j])
            if not torch.allclose(y, want[j], atol=1e-12, rtol=1e-12):
                wrong.append((i, r, j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("wrong", len(wrong))
"""


@pytest.mark.parametrize("backend", ["torch", "torch_device_path", "cpp", "auto"])
def test_a_layer_shared_by_threads(backend):
    """Four threads share a layer, calling it on eight input signatures in turn (each call may
    replace the state a backend keeps per signature, in C++ for ``torch``), with and without
    gradients: every output is the reference's, and nothing deadlocks. (Until 2026-12-03 the
    ``torch`` backend did, every time: its state's old tensors were released while its mutex was
    held, and releasing a tensor can release the GIL, which another thread, waiting for that mutex,
    could then hold.) In a subprocess, with a time limit: a deadlock holds the GIL."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT, backend], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("four threads sharing the layer did not finish in 120 s (they take a few): a deadlock")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["wrong", "0"], done.stdout
