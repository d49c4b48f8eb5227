"""The Triton kernels, run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set in
conftest.py before anything imports them), and compiled ahead of time for sm_80 and sm_90.

The general parity grid (tests/test_parity.py) and the property test also run the `triton` backend;
this file adds the kernel-specific cases: several tiles in every GEMM dimension (masking at tile
edges), 16-bit dtypes, strided/channels_last inputs, bit-exact coordinates, gradcheck (opcheck:
tests/test_ops.py)."""

import os
import subprocess
import sys

import pytest
import torch

from coordconv_fused import coord_channels, coord_conv1d, coord_conv2d, coord_conv3d
from coordconv_fused.testing import Case, assert_matches_reference

# Fails where torch ships Triton and it does not run; skips, saying why, elsewhere (tests/conftest.py).
pytestmark = pytest.mark.backend("triton")

CASES = [
    # Several tiles along M (N*Ho*Wo > 128), N (C_out > 64) and K (C_in*k*k > 64).
    Case((20, 17), batch=1, in_channels=8, out_channels=70, padding=1),
    Case((13, 11), batch=3, in_channels=9, out_channels=20, kernel_size=3, stride=1, padding=1),
    Case((12, 12), batch=2, in_channels=16, out_channels=17, kernel_size=3, padding=1, with_r=True),
    Case((15, 9), batch=2, in_channels=3, out_channels=65, kernel_size=2, stride=2, separate=True),
    Case((11, 10), batch=2, in_channels=12, out_channels=24, groups=3, padding=1, with_r=True),
    Case((11, 10), batch=1, in_channels=4, out_channels=130, groups=2, kernel_size=1),
    # Edges: H or W == 1, 1x1 images, odd sizes, stride 2, dilation 2.
    Case((1, 9), kernel_size=(1, 3), padding=(0, 1), with_r=True),
    Case((9, 1), kernel_size=(3, 1), stride=2, separate=True),
    Case((1, 1), kernel_size=3, padding=1, with_r=True),
    Case((7, 5), stride=2, padding=1),
    Case((9, 8), dilation=2, padding=2, with_r=True),
    Case((10, 7), kernel_size=4, stride=3, dilation=2, padding=3, separate=True, with_r=True),
    Case((8, 6), kernel_size=5, padding="same", with_r=True),
    Case((8, 6), kernel_size=4, padding="same", separate=True),
    Case((6, 6), kernel_size=1, padding=1, separate=True),
    Case((6, 7), padding="valid", bias=False),
    Case((5, 4), batch=0, padding=1),
    # Padding modes (input pre-padded, coordinate rule applied in-kernel).
    Case((8, 7), padding=2, padding_mode="reflect", with_r=True),
    Case((8, 7), padding=(1, 3), padding_mode="replicate", stride=2),
    Case((8, 7), padding=2, padding_mode="circular", with_r=True, separate=True),
    Case((8, 7), kernel_size=4, padding="same", padding_mode="reflect", groups=3, in_channels=3, out_channels=6),
    # 1-D and 3-D.
    Case((17,), in_channels=5, out_channels=9, kernel_size=5, padding=2, with_r=True),
    Case((16,), stride=3, padding=1, padding_mode="circular", separate=True),
    Case((1,), kernel_size=1, with_r=True),
    Case((5, 4, 6), padding=1, with_r=True),
    Case((4, 5, 3), kernel_size=(2, 3, 1), stride=(2, 1, 1), separate=True, with_r=True),
    Case((4, 4, 4), padding=1, padding_mode="replicate", groups=2, in_channels=4, out_channels=4),
    Case((3, 1, 5), kernel_size=(1, 1, 3), padding=(0, 0, 1), padding_mode="reflect"),
    Case((6, 5, 2), batch=1, in_channels=6, out_channels=66, kernel_size=(3, 3, 1), padding=(1, 1, 0)),
    Case((3, 3, 3), kernel_size=3, padding="same", dilation=2, with_r=True, bias=False),
]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in vars(c).items() if v != getattr(Case(c.sizes), k) or k == "sizes")


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matches_reference(case, dtype):
    assert_matches_reference("triton", case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[17], CASES[21], CASES[24]], ids=_id)
def test_triton_low_precision(case, dtype):
    assert_matches_reference("triton", case, dtype)


@pytest.mark.parametrize(
    "nd,sizes",
    [(1, (1,)), (1, (9,)), (2, (1, 1)), (2, (7, 1)), (2, (5, 8)), (2, (64, 33)), (3, (3, 1, 4)), (3, (4, 5, 6))],
)
@pytest.mark.parametrize("with_r", [False, True])
def test_in_kernel_coordinates_are_bit_exact(nd, sizes, with_r):
    # Zero data, 1x1 one-hot coordinate filters: the output *is* the coordinate channels, and the
    # kernel's coordinate generator must reproduce coordconv_fused.coords bit for bit (float32).
    coords = coord_channels(sizes, with_r)
    d = coords.shape[0]
    x = torch.zeros(1, 1, *sizes)
    w = torch.zeros(d, 1, *(1,) * nd)
    cw = torch.eye(d).reshape(d, d, *(1,) * nd)
    fn = {1: coord_conv1d, 2: coord_conv2d, 3: coord_conv3d}[nd]
    out = fn(x, w, cw, None, 1, 0, 1, 1, "zeros", with_r, "triton")
    assert torch.equal(out[0], coords)


def test_channels_last_and_strided_input():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 8).to(memory_format=torch.channels_last)
    w, cw, b = torch.randn(5, 6, 3, 3), torch.randn(5, 3, 3, 3), torch.randn(5)
    out = coord_conv2d(x, w, cw, b, 1, 1, 1, 1, "zeros", True, "triton")
    ref = coord_conv2d(x, w, cw, b, 1, 1, 1, 1, "zeros", True, "reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    xs = torch.randn(2, 6, 18, 8)[:, :, ::2]  # non-contiguous view
    torch.testing.assert_close(
        coord_conv2d(xs, w, cw, b, with_r=True, backend="triton"),
        coord_conv2d(xs, w, cw, b, with_r=True, backend="reference"),
        atol=2e-5,
        rtol=2e-5,
    )


@pytest.mark.parametrize(
    "case",
    [
        Case((4, 3), batch=1, in_channels=2, out_channels=2, padding=1, with_r=True),
        Case(
            (5, 4),
            batch=2,
            in_channels=2,
            out_channels=2,
            kernel_size=2,
            stride=2,
            separate=True,
            padding_mode="reflect",
            padding=1,
        ),
        Case(
            (6,),
            batch=1,
            in_channels=2,
            out_channels=2,
            groups=2,
            dilation=2,
            padding=2,
            padding_mode="circular",
            with_r=True,
        ),
        Case((3, 2, 3), batch=1, in_channels=1, out_channels=2, kernel_size=2, padding=1, with_r=True),
    ],
    ids=_id,
)
def test_triton_gradcheck_float64(case):
    tensors = case.make_tensors(torch.float64, "cpu", seed=5)
    names = [n for n, t in tensors.items() if t is not None]

    def fn(*args):
        return case.run("triton", dict(zip(names, args)))

    assert torch.autograd.gradcheck(fn, tuple(tensors[n] for n in names), eps=1e-6, atol=1e-7)


def test_transposed_is_refused_with_a_clear_error():
    from coordconv_fused import coord_conv_transpose2d

    with pytest.raises(ValueError, match="transposed CoordConv is not implemented in the Triton kernels"):
        coord_conv_transpose2d(
            torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3), backend="triton"
        )


def test_auto_on_cpu_does_not_pick_the_interpreter():
    from coordconv_fused.backends import resolve_backend
    from coordconv_fused.spec import make_spec

    spec = make_spec(2, (3, 3))
    assert resolve_backend("auto", torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), spec).name != "triton"


def test_aot_compile_every_variant_for_sm80_and_sm90():
    """Every kernel variant (each dtype, with_r, separate filter, bias, padding rule, rank, and every
    autotune configuration of one variant) compiles to a cubin for sm_80 and sm_90, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "coordconv_fused.kernels.aot", "--arch", "80", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].endswith("compiled, 0 failed")
    from coordconv_fused.kernels.aot import variants

    assert int(lines[-1].split()[0]) == 2 * len(variants())
    assert sum(line.startswith("ok   sm_80") for line in lines) == len(variants())
    assert sum(line.startswith("ok   sm_90") for line in lines) == len(variants())


def test_triton_compiles_fullgraph():
    from coordconv_fused import CoordConv2d

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = CoordConv2d(3, 4, 3, padding=1, with_r=True, backend="triton")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 5)
    out = compiled(x)
    torch.testing.assert_close(out, m(x))
    g = torch.randn_like(out)
    out.backward(g)
    compiled_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).backward(g)
    for got, want in zip(compiled_grads, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
