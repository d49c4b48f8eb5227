"""The ``cpp`` backend's ``onednn_blocked`` forward (csrc/cpu/blocked_output.h): oneDNN convolves into
its blocked layout and one pass writes NCHW with the coordinate term. Forced on layers of every kind
it takes (affine coordinate rows and border rows, the radius channel, pre-padding, tails of 8 pixels
and 8 channels), it matches the reference on the output and every gradient; where it is no
candidate, or the output's format is not known, the layer is computed another way."""

import pytest
import torch

from coordconv_fused import CoordConv1d, CoordConv2d
from coordconv_fused.backends import native
from coordconv_fused.testing import Case, assert_matches_reference, kernel_events

pytestmark = pytest.mark.skipif(native.LOAD_ERROR is not None, reason="the C++ extension is not built")

EVENT = "coordconv_fused::onednn_blocked"


def _candidate_here() -> bool:
    """The implementation's conditions beside the layer's: oneDNN enabled, an x86 CPU with AVX2."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and native.avx2_direct_available()


needs_candidate = pytest.mark.skipif(not _candidate_here(), reason="no oneDNN or no AVX2 here: not a candidate")

CASES = [
    # a stem: affine coordinate rows between border rows, 64 channels (8 blocks of 8, or 4 of 16)
    Case((38, 42), batch=1, in_channels=3, out_channels=64, kernel_size=7, stride=2, padding=3),
    # 16 channels, an output width that leaves a tail of 8 pixels, no bias
    Case((20, 27), in_channels=3, out_channels=16, kernel_size=3, padding=1, bias=False),
    # the radius channel: P is read on every row
    Case((12, 13), in_channels=2, out_channels=8, kernel_size=3, padding=2, dilation=2, with_r=True),
    # pre-padding by reflection, 24 channels (3 blocks of 8, or NHWC)
    Case((11, 9), in_channels=3, out_channels=24, kernel_size=3, padding=1, padding_mode="reflect"),
    # 5 channels: no candidate (oneDNN pads a partial block), so the fixed rule's pick runs
    Case((10, 10), in_channels=1, out_channels=5, kernel_size=3, padding=1),
    # rectangular kernel and stride, separate coordinate kernel
    Case((9, 33), in_channels=4, out_channels=32, kernel_size=(1, 5), stride=(1, 2), padding=(0, 2), separate=True),
    # an input as large as the output, and one 4x larger (16 channels to 8, stride 2): the input is
    # handed to oneDNN as a view of its memory, whatever its size
    Case((6, 6), in_channels=8, out_channels=8, kernel_size=1),
    Case((13, 12), in_channels=16, out_channels=8, kernel_size=3, stride=2, padding=1),
]


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("COORDCONV_CPU_KERNEL", "onednn_blocked")
    monkeypatch.delenv("COORDCONV_NO_AVX512", raising=False)
    native.clear_kernel_choices()
    yield
    native.clear_kernel_choices()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forced_matches_reference(case, forced):
    assert_matches_reference("cpp", case, torch.float32)
    assert native.kernel_choices() == []  # forced: nothing measured


@needs_candidate
def test_forced_takes_the_fused_pass(forced):
    """On a stem the format is recognised on the first call and the fused pass runs on every call,
    the input gradient being computed as before."""
    torch.manual_seed(0)
    m = CoordConv2d(3, 64, 7, stride=2, padding=3, backend="cpp")
    x = torch.randn(1, 3, 38, 42, requires_grad=True)
    assert kernel_events(lambda: m(x).sum().backward(), EVENT)[0] == 1
    with torch.no_grad():
        assert kernel_events(lambda: m(x), EVENT)[0] == 1
        got = m(x)
        m.backend = "reference"
        torch.testing.assert_close(got, m(x), atol=2e-5, rtol=2e-5)


@needs_candidate
def test_the_fixed_rule_takes_it_where_onednn_would_run_the_layer(monkeypatch):
    """COORDCONV_CPU_KERNEL=heuristic: a layer no direct kernel takes (64 -> 64 channels, 3x3) runs
    `onednn_blocked`; one it is no candidate for (float64) runs oneDNN + epilogue."""
    monkeypatch.setenv("COORDCONV_CPU_KERNEL", "heuristic")
    native.clear_kernel_choices()
    torch.manual_seed(0)
    m = CoordConv2d(64, 64, 3, padding=1, backend="cpp")
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        assert kernel_events(lambda: m(x), EVENT)[0] == 1
        assert kernel_events(lambda: m.double()(x.double()), EVENT)[0] == 0
    assert native.kernel_choices() == []  # (the fixed rule measures nothing)


@needs_candidate
def test_the_input_is_not_copied(forced):
    """After a layer's first call (which checks the view once), oneDNN reads the input through a view
    of its memory: no `to_mkldnn` copy of it on any call."""
    torch.manual_seed(0)
    m = CoordConv2d(16, 32, 3, padding=1, backend="cpp")
    x = torch.randn(2, 16, 20, 24)
    with torch.no_grad():
        m(x)
        with torch.profiler.profile() as prof:
            got = m(x)
        names = [e.name for e in prof.events()]
        assert EVENT in names
        assert "aten::to_mkldnn" not in names
        m.backend = "reference"
        torch.testing.assert_close(got, m(x), atol=2e-5, rtol=2e-5)


@needs_candidate
def test_a_nan_in_the_first_input_does_not_cost_the_view(forced):
    """The view is checked against the input bit for bit on the layer's first call: a NaN there
    (unequal to itself) does not make the layer copy its input on every later call."""
    torch.manual_seed(0)
    m = CoordConv2d(8, 16, 3, padding=1, backend="cpp")
    x = torch.randn(2, 8, 10, 12)
    x[0, 3, 4, 5] = float("nan")
    with torch.no_grad():
        assert m(x).isnan().any()
        x = torch.randn(2, 8, 10, 12)
        with torch.profiler.profile() as prof:
            m(x)
        assert "aten::to_mkldnn" not in [e.name for e in prof.events()]


@needs_candidate
def test_an_input_inside_a_larger_tensor(forced):
    """The view starts at the input's first element: a contiguous input at an offset in its storage
    (a slice of a batch) gives what its copy gives, call after call with new data."""
    torch.manual_seed(0)
    m = CoordConv2d(8, 16, 3, padding=1, backend="cpp")
    with torch.no_grad():
        for _ in range(3):
            batch = torch.randn(5, 8, 14, 18)
            x = batch[2:4]
            assert x.is_contiguous() and x.storage_offset() > 0
            got = m(x)
            torch.testing.assert_close(got, m(x.clone()), atol=0, rtol=0)
            m.backend = "reference"
            torch.testing.assert_close(got, m(x), atol=2e-5, rtol=2e-5)
            m.backend = "cpp"


@needs_candidate
def test_data_that_cannot_tell_formats_apart_waits_for_data_that_can(forced):
    """All-zero data reads alike in every format: that call is computed by ATen (exactly), and the
    format is recognised on a later call whose data tells."""
    m = CoordConv2d(3, 16, 3, padding=1, backend="cpp")
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
        x = torch.zeros(2, 3, 12, 20)
        for _ in range(4):  # (more calls than a layer may miss: ambiguity is not a miss)
            n, _ = kernel_events(lambda: m(x), EVENT)
            assert n == 0
        m.backend = "reference"
        expected = m(x)
        m.backend = "cpp"
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        torch.nn.init.normal_(m.weight)
        x = torch.randn(2, 3, 12, 20)
        assert kernel_events(lambda: m(x), EVENT)[0] == 1


@needs_candidate
def test_measured_among_the_candidates_where_it_applies(monkeypatch):
    monkeypatch.setenv("COORDCONV_CPU_KERNEL", "measure")
    native.clear_kernel_choices()

    def candidates(layer, x) -> set[str]:
        native.clear_kernel_choices()
        layer.backend = "cpp"
        with torch.no_grad():
            layer(x)
        measured = [c for c in native.kernel_choices() if c["op"] == "forward"]
        return set(measured[0]["candidates_us"]) if measured else {"aten"}  # (ATen alone: nothing to measure)

    stem, image = CoordConv2d(3, 64, 7, stride=2, padding=3), torch.randn(1, 3, 40, 40)
    assert "onednn_blocked" in candidates(stem, image)
    # also where the input is larger than the output (it is not copied)
    assert "onednn_blocked" in candidates(CoordConv2d(16, 8, 3, padding=1, stride=2), torch.randn(1, 16, 12, 12))
    # not: float64, channels_last, groups, C_out not a multiple of 8, 1-D, oneDNN disabled
    assert "onednn_blocked" not in candidates(stem.double(), image.double())
    stem.float()
    assert "onednn_blocked" not in candidates(stem, image.to(memory_format=torch.channels_last))
    assert "onednn_blocked" not in candidates(CoordConv2d(4, 8, 3, groups=2), torch.randn(1, 4, 12, 12))
    assert "onednn_blocked" not in candidates(CoordConv2d(3, 12, 3), torch.randn(1, 3, 12, 12))
    assert "onednn_blocked" not in candidates(CoordConv1d(3, 8, 3), torch.randn(2, 3, 30))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert "onednn_blocked" not in candidates(stem, image)
    native.clear_kernel_choices()


def test_forced_where_it_is_no_candidate_runs_the_fixed_rule(forced):
    """Forced where it is no candidate (float64, groups), the layer runs as the fixed rule says."""
    assert_matches_reference("cpp", Case((9, 9), out_channels=8, padding=1), torch.float64)
    groups = Case((8, 8), in_channels=4, out_channels=8, groups=2)
    assert kernel_events(lambda: assert_matches_reference("cpp", groups, torch.float32), EVENT)[0] == 0


def _blocked_pass_op():
    from coordconv_fused.ops.schema import define_testing_ops

    define_testing_ops()
    from coordconv_fused import _C_testing  # type: ignore[attr-defined]  # noqa: F401  (registers the kernel)

    return torch.ops.coordconv_fused.blocked_output_pass


# (N, C, block, OH, OW): blocks of 8 and 16 (oneDNN's with AVX2 and AVX-512), 1 (NCHW), C (NHWC,
# with C a multiple of 8 or not); widths with and without a tail of 8 pixels
PASS_SHAPES = [
    (2, 16, 8, 5, 19),
    (1, 32, 16, 4, 8),
    (3, 48, 16, 3, 13),
    (2, 5, 1, 4, 7),
    (2, 24, 24, 3, 9),
    (1, 12, 12, 6, 17),
    (2, 3, 3, 2, 4),
]


@pytest.mark.skipif(not native.avx2_direct_available(), reason="the pass runs on x86 CPUs with AVX2")
@pytest.mark.parametrize("affine", [True, False], ids=["affine-rows", "P-only"])
@pytest.mark.parametrize("shape", PASS_SHAPES, ids=lambda s: "N{}C{}b{}_{}x{}".format(*s))
def test_pass_reads_every_block_size(shape, affine):
    """The pass alone, on channel-blocked buffers of every block size (oneDNN produces one per
    machine): NCHW + the coordinate term (its affine rows [lo, hi) from U + t V, the others from P)."""
    n, c, block, oh, ow = shape
    g = torch.Generator().manual_seed(sum(shape))
    blocked = torch.randn(n, c // block, oh, ow, block, generator=g)
    P = torch.randn(c, oh, ow, generator=g)
    lo, hi = (1, oh - 1) if affine else (0, 0)
    uv = torch.randn(2, c, ow, generator=g) if affine else None
    expected_P = P.clone()
    if affine:
        t = torch.arange(hi - lo, dtype=torch.float32).view(-1, 1, 1)  # [rows, 1, 1]
        expected_P[:, lo:hi] = (uv[0].unsqueeze(0) + t * uv[1].unsqueeze(0)).transpose(0, 1)
    expected = blocked.permute(0, 1, 4, 2, 3).reshape(n, c, oh, ow) + expected_P
    got = _blocked_pass_op()(blocked, P, uv, lo, hi)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
