"""Property test: random CoordConv problems (rank, shapes, arguments, dtype), every backend against
the reference on the output and every gradient."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordconv_fused.testing import (
    BACKENDS_UNDER_TEST,
    Case,
    assert_as_accurate_as_aten,
    assert_matches_reference,
    supported,
    why_backend_may_be_missing,
)

# Every backend expected here (a missing one fails: assert_matches_reference raises); those that may
# legitimately be absent (tests/conftest.py reports them) are left out.
BACKENDS = [
    b for b in BACKENDS_UNDER_TEST["cpu"] if b not in ("reference", "auto") and why_backend_may_be_missing(b) is None
]


@st.composite
def cases(draw):
    nd = draw(st.integers(1, 3))
    max_size = {1: 12, 2: 9, 3: 5}[nd]
    transposed = draw(st.booleans()) and draw(st.booleans())  # about a quarter
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 5 if nd < 3 else 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    sizes = tuple(draw(st.integers(1, max_size)) for _ in range(nd))
    with_r, bias = draw(st.booleans()), draw(st.booleans())
    batch = draw(st.integers(0, 3))
    if transposed:
        padding = tuple(draw(st.integers(0, (d * (k - 1)) // 2)) for k, d in zip(kernel, dilation))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        return Case(
            sizes,
            batch,
            cin,
            cout,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            "zeros",
            with_r,
            False,
            bias,
            True,
            output_padding,
        )
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    padding_kind = draw(st.sampled_from(["int", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * nd
        padding = "same"
        pads = [(d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    elif padding_kind == "valid":
        padding, pads = "valid", [0] * nd
    else:
        padding = tuple(draw(st.integers(0, 3)) for _ in range(nd))
        pads = list(padding)
    if mode == "reflect":
        sizes = tuple(max(n, p + 1) for n, p in zip(sizes, pads))
    elif mode == "circular":
        sizes = tuple(max(n, p) for n, p in zip(sizes, pads))
    # Make the output non-empty.
    lo = [d * (k - 1) + 1 - 2 * p for k, d, p in zip(kernel, dilation, pads)]
    sizes = tuple(max(n, lower) for n, lower in zip(sizes, lo))
    separate = draw(st.booleans()) and draw(st.booleans())
    return Case(sizes, batch, cin, cout, kernel, stride, padding, dilation, groups, mode, with_r, separate, bias)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_problems_match_reference(case, dtype):
    for backend in BACKENDS + ["auto"]:
        if supported(backend, case):
            assert_matches_reference(backend, case, dtype)


# CUDA (where a GPU is visible; skipped, and listed at the end of the run, elsewhere). Not `triton`:
# each random case is a new specialisation of its kernels, seconds to compile (the parity grid of
# test_parity.py runs it on CUDA).
CUDA_BACKENDS = ("torch", "cuda", "auto")


@pytest.mark.parametrize("device", ["cuda"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_problems_match_reference_cuda(device, exact_cuda, case, dtype):
    for backend in CUDA_BACKENDS:
        if supported(backend, case):
            assert_matches_reference(backend, case, dtype, device=device)


@st.composite
def wide_cases(draw):
    """1-D/2-D layers with rows up to 160 wide and up to a few thousand output points: the widths
    where the CPU kernels tile their rows, and reductions long enough for float32 rounding to show."""
    nd = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 7)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(nd))
    sizes = [draw(st.integers(1, 20)) for _ in range(nd - 1)] + [draw(st.integers(1, 160))]
    if mode == "reflect":
        sizes = [max(n, p + 1) for n, p in zip(sizes, padding)]
    elif mode == "circular":
        sizes = [max(n, p) for n, p in zip(sizes, padding)]
    sizes = tuple(max(n, d * (k - 1) + 1 - 2 * p) for n, k, d, p in zip(sizes, kernel, dilation, padding))
    return Case(
        sizes,
        draw(st.integers(1, 3)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 9)),
        kernel,
        stride,
        padding,
        dilation,
        1,
        mode,
        draw(st.booleans()),
        draw(st.booleans()) and draw(st.booleans()),
        draw(st.booleans()),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=wide_cases())
def test_random_wide_layers_as_accurate_as_aten(case):
    """float32 against a float64 oracle: the `cpp` backend's output and its input, coordinate and
    bias gradients no less accurate than ATen's own float32 result (the data filter's gradient is
    ATen's in both; the `torch` backend is ATen's throughout)."""
    assert_as_accurate_as_aten("cpp", case)
