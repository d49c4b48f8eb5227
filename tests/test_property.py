"""Property test: random CoordConv problems (rank, shapes, arguments, dtype), every backend against
the reference on the output and every gradient."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordconv_fused.testing import (
    BACKENDS_UNDER_TEST,
    Case,
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
