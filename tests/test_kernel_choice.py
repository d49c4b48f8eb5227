"""The ``cpp`` backend chooses its implementation per layer by measurement (csrc/cpu/kernel_choice.h):
every candidate computes the layer exactly (forced one at a time against the reference), and the
choice is cached per layer shape, dtype and thread count."""

import json
import os
import subprocess
import sys

import pytest
import torch

from coordconv_fused import CoordConv1d, CoordConv2d, CoordConv3d
from coordconv_fused.backends import choice_file, native
from coordconv_fused.testing import Case, assert_matches_reference, kernel_events

pytestmark = pytest.mark.skipif(native.LOAD_ERROR is not None, reason="the C++ extension is not built")

# Shallow layers (where the direct kernels are candidates) and others, in every rank and dtype the
# kernels take: the row kernel runs any contiguous layer up to depth 32, the AVX-512 kernel float32
# 1-D/2-D groups-1 layers on up to 64 input channels.
CASES = [
    Case((9, 8), in_channels=1, out_channels=3, kernel_size=1, padding=2, with_r=True),
    Case((12, 11), in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    Case((11, 30), in_channels=3, out_channels=6, kernel_size=7, stride=2, padding=3, with_r=True),
    Case((10, 9), in_channels=4, out_channels=6, kernel_size=2, padding="same", separate=True),
    Case((8, 8), in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2, dilation=2),
    Case((7, 20), in_channels=40, out_channels=8, kernel_size=1, bias=False),
    Case((33,), in_channels=2, out_channels=5, kernel_size=5, stride=2, padding=2, padding_mode="circular"),
    Case((5, 4, 6), in_channels=1, out_channels=3, kernel_size=3, padding=1, with_r=True),
]


@pytest.fixture
def kernel_mode(monkeypatch):
    def set_mode(mode: str, avx512: bool = True) -> None:
        monkeypatch.setenv("COORDCONV_CPU_KERNEL", mode)
        if avx512:
            monkeypatch.delenv("COORDCONV_NO_AVX512", raising=False)
        else:
            monkeypatch.setenv("COORDCONV_NO_AVX512", "1")
        native.clear_kernel_choices()

    yield set_mode
    native.clear_kernel_choices()


# (forced by name: "avx512_direct_6x4" is the AVX-512 kernel's second tile shape, 6 output channels
# per tile: C_out = 5, 6 and 8 above end in a partial tile; "avx512_direct_3x6" its third, 3 channels
# x 6 vectors, for a forward of C_out <= 3 or an input gradient of C_in <= 3, and "avx2_direct_3x4"
# the AVX2 kernel's 3-channel tile (4 vectors) there; "onednn_blocked" oneDNN's blocked output
# read back in one pass (tests/test_blocked_output.py); where the one named is no candidate, e.g.
# without AVX-512, the fixed rule's pick runs)
@pytest.mark.parametrize(
    "mode",
    [
        "aten",
        "direct",
        "avx512_direct_6x4",
        "avx512_direct_3x6",
        "avx2_direct_3x4",
        "onednn_blocked",
        "heuristic",
        "measure",
    ],
)
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "no-avx512"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_candidate_matches_reference(case, mode, avx512, kernel_mode):
    kernel_mode(mode, avx512)
    assert_matches_reference("cpp", case, torch.float32)
    if case.ndim == 2 and mode not in ("heuristic", "measure"):
        assert_matches_reference("cpp", case, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_kernel_in_half_types(dtype, kernel_mode):
    kernel_mode("direct")
    assert_matches_reference("cpp", CASES[1], dtype)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_forced_modes_take_their_kernel(isa, kernel_mode):
    """The SIMD kernel in each instruction set (AVX2: what CPUs without AVX-512 run)."""
    if not getattr(native, f"{isa}_direct_available")():
        pytest.skip(f"the CPU has no {isa.upper()} (the kernel is not used there)")
    m = CoordConv2d(3, 8, 3, padding=1, backend="cpp")
    x = torch.randn(2, 3, 16, 40, requires_grad=True)
    event = f"coordconv_fused::{isa}_direct"
    kernel_mode("direct", avx512=isa == "avx512")
    assert kernel_events(lambda: m(x).sum().backward(), event)[0] == 2  # forward and input gradient
    kernel_mode("aten", avx512=isa == "avx512")
    assert kernel_events(lambda: m(x).sum().backward(), event)[0] == 0
    assert native.kernel_choices() == []  # forced modes measure nothing


def test_both_avx512_tile_shapes_are_measured_and_forceable(kernel_mode):
    """The AVX-512 kernel's two tile shapes (4 or 6 output channels per tile) are both candidates of
    the measured forward where C_out exceeds one tile of 4; each can be forced by name (its forward
    is the AVX-512 kernel's; the input gradient keeps the first shape), and matches the reference."""
    if not native.avx512_direct_available():
        pytest.skip("the CPU has no AVX-512 (the kernel is not used there)")
    m = CoordConv2d(3, 8, 3, padding=1, backend="cpp")
    x = torch.randn(2, 3, 16, 40)
    kernel_mode("measure")
    with torch.no_grad():
        m(x)
    (choice,) = native.kernel_choices()
    assert {"avx512_direct", "avx512_direct_6x4"} <= set(choice["candidates_us"])
    with torch.no_grad():
        CoordConv2d(3, 4, 3, padding=1, backend="cpp")(x)  # C_out = 4: one tile of the first shape
    assert "avx512_direct_6x4" not in native.kernel_choices()[-1]["candidates_us"]
    for name in ("avx512_direct", "avx512_direct_6x4"):
        kernel_mode(name)
        with torch.no_grad():
            assert kernel_events(lambda: m(x), "coordconv_fused::avx512_direct")[0] == 1
        assert native.kernel_choices() == []
    m.backend = "reference"
    with torch.no_grad():
        expected = m(x)
    m.backend = "cpp"
    for name in ("avx512_direct", "avx512_direct_6x4"):
        kernel_mode(name)
        with torch.no_grad():
            torch.testing.assert_close(m(x), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("isa,name", [("avx512", "avx512_direct_3x6"), ("avx2", "avx2_direct_3x4")])
def test_three_channel_tile_is_a_candidate_where_it_applies(kernel_mode, isa, name):
    """The SIMD kernel's 3-channel tile (3 output channels x 6 vectors in AVX-512, x 4 in AVX2) is
    measured for the input gradient of a layer with at most 3 input channels and for the forward of a
    layer with at most 3 output channels, nowhere else; the measured layers match the reference
    whatever was chosen."""
    if not getattr(native, f"{isa}_direct_available")():
        pytest.skip(f"the CPU has no {isa.upper()} (the kernel is not used there)")
    kernel_mode("measure", avx512=isa == "avx512")
    for c_in, c_out, grad_op, forward in ((3, 8, True, False), (8, 3, False, True), (8, 8, False, False)):
        native.clear_kernel_choices()
        m = CoordConv2d(c_in, c_out, 3, padding=1, backend="cpp")
        x = torch.randn(2, c_in, 16, 40, requires_grad=True)
        m(x).sum().backward()
        choices = {c["op"]: c for c in native.kernel_choices()}
        assert (name in choices["forward"]["candidates_us"]) == forward, (c_in, c_out)
        grad_candidates = choices["backward"]["candidates_us"] if "backward" in choices else {}
        assert (name in grad_candidates) == grad_op, (c_in, c_out)
        assert_matches_reference("cpp", Case((16, 40), in_channels=c_in, out_channels=c_out, kernel_size=3, padding=1))


def test_choices_are_cached_per_shape_dtype_and_threads(kernel_mode):
    kernel_mode("measure")
    m = CoordConv2d(3, 8, 3, padding=1, backend="cpp")
    threads = torch.get_num_threads()

    def forwards() -> list[dict]:
        return [c for c in native.kernel_choices() if c["op"] == "forward"]

    try:
        with torch.no_grad():
            m(torch.randn(2, 3, 12, 20))
            first = forwards()
            assert len(first) == 1 and first[0]["chosen"] in first[0]["candidates_us"]
            assert set(first[0]["candidates_us"]) >= {"aten", "row_direct"}
            assert all(t > 0 for t in first[0]["candidates_us"].values())
            m(torch.randn(2, 3, 12, 20))
            assert forwards() == first  # the same layer: the cached choice, nothing measured
            m(torch.randn(4, 3, 12, 20))  # another batch
            assert len(forwards()) == 2
            torch.set_num_threads(1 if threads != 1 else 2)  # another thread count
            m(torch.randn(2, 3, 12, 20))
            assert len(forwards()) == 3
            m.double()(torch.randn(2, 3, 12, 20, dtype=torch.float64))  # another dtype
            assert len(forwards()) == 4
            assert "threads=" in forwards()[2]["layer"] and "Double" in forwards()[3]["layer"]
    finally:
        torch.set_num_threads(threads)


def test_a_choice_is_timed_again_on_schedule(kernel_mode):
    """A layer's candidates are timed again at each of ``choice_confirm_calls()`` calls after its first
    call (a first call may find the machine busy, for longer than a few calls), and never after the
    last; each keeps its best time of all, and the choice is made again from them."""
    kernel_mode("measure")
    m = CoordConv2d(3, 8, 3, padding=1, backend="cpp")
    x = torch.randn(2, 3, 12, 20)
    schedule = native.choice_confirm_calls()
    assert len(schedule) >= 2 and list(schedule) == sorted(set(schedule)) and schedule[0] > 0
    with torch.no_grad():
        m(x)
        (last,) = native.kernel_choices()
        assert last["measurements"] == 1
        done = 0
        for measurement, at in enumerate(schedule, start=2):
            for _ in range(at - done - 1):
                m(x)
            assert native.kernel_choices() == [last]  # not yet
            m(x)
            done = at
            (now,) = native.kernel_choices()
            assert now["measurements"] == measurement and now["key"] == last["key"]
            # (a candidate may drop out meanwhile: oneDNN's blocked output, given up for a layer
            # where oneDNN does not answer in that layout; the others keep their best times)
            before, after = last["candidates_us"], now["candidates_us"]
            assert "aten" in after and after.keys() <= before.keys()
            assert all(0 < after[k] <= before[k] for k in after)
            assert now["chosen"] in after
            last = now
        for _ in range(2 * schedule[-1]):
            m(x)
        assert native.kernel_choices() == [last]  # no further measurement


@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight_grad", "frozen_weight"])
def test_backward_measures_the_input_gradient(kernel_mode, weight_grad):
    """The input gradient's implementation is measured: with the weight gradient wanted too, as the
    whole of what each candidate runs (op "backward": nn.Conv2d's one convolution_backward call, or
    the kernel's input gradient plus ATen's weight gradient); alone otherwise (op "input_grad")."""
    kernel_mode("measure")
    m = CoordConv2d(2, 8, 3, padding=1, backend="cpp")
    m.weight.requires_grad_(weight_grad)
    x = torch.randn(2, 2, 10, 24, requires_grad=True)
    m(x).sum().backward()
    ops = {c["op"] for c in native.kernel_choices()}
    assert "forward" in ops
    # ATen's is the input gradient's only candidate where there is no SIMD kernel (AVX-512 or AVX2)
    simd = native.avx512_direct_available() or native.avx2_direct_available()
    assert ("backward" in ops) == (simd and weight_grad)
    assert ("input_grad" in ops) == (simd and not weight_grad)


@pytest.mark.parametrize("layer", [CoordConv1d(2, 3, 3), CoordConv3d(1, 2, 3)], ids=["1d", "3d"])
def test_other_ranks_are_measured_too(layer, kernel_mode):
    kernel_mode("measure")
    layer.backend = "cpp"
    x = torch.randn(2, *([2, 9] if isinstance(layer, CoordConv1d) else [1, 5, 6, 7]))
    with torch.no_grad():
        layer(x)
    assert [c["op"] for c in native.kernel_choices()] == ["forward"]


def test_unknown_mode_is_an_error(kernel_mode):
    kernel_mode("fastest")
    m = CoordConv2d(1, 2, 1, backend="cpp")
    with pytest.raises(
        RuntimeError, match="COORDCONV_CPU_KERNEL must be one of measure, heuristic, direct, aten, row_"
    ):
        m(torch.randn(1, 1, 4, 4))


# ---- choices kept in a file (coordconv_fused.backends.choice_file) ------------------------------


def _shallow_layer_call():
    torch.manual_seed(0)
    layer = CoordConv2d(3, 8, 3, padding=1, backend="cpp")
    x = torch.randn(4, 3, 20, 24)
    with torch.no_grad():
        return layer, x, layer(x)


def test_cpu_model_has_family_and_model(tmp_path):
    """Two CPUs a virtual machine names alike ("AMD EPYC") are told apart by family and model: in
    the choice file's fingerprint and the benchmark's machine line."""

    def cpuinfo(family: int) -> str:
        path = tmp_path / f"cpuinfo-{family}"
        path.write_text(
            f"processor\t: 0\ncpu family\t: {family}\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu avx2 fma\n\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\n"
        )
        return str(path)

    assert choice_file.cpu_model_and_flags(cpuinfo(23)) == ("AMD EPYC, family 23 model 1", {"fpu", "avx2", "fma"})
    assert choice_file.cpu_model_and_flags(cpuinfo(25))[0] == "AMD EPYC, family 25 model 1"


def test_choices_saved_and_loaded_are_not_measured_again(kernel_mode, tmp_path):
    kernel_mode("measure")
    layer, x, y = _shallow_layer_call()
    measured = native.kernel_choices()
    assert len(measured) == 1 and measured[0]["key"]
    path = tmp_path / "choices.json"
    assert choice_file.save_kernel_choices(path) == 1
    native.clear_kernel_choices()
    assert choice_file.load_kernel_choices(path) == 1
    assert native.kernel_choices() == measured  # restored as saved, before any call
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)
    # A re-measurement would have replaced the times: they are the loaded ones.
    assert native.kernel_choices() == measured
    assert choice_file.load_kernel_choices(path) == 0  # known keys keep their choice


def test_choices_from_another_machine_are_not_used(kernel_mode, tmp_path):
    kernel_mode("measure")
    _shallow_layer_call()
    path = tmp_path / "choices.json"
    choice_file.save_kernel_choices(path)
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "Another CPU"
    path.write_text(json.dumps(data))
    native.clear_kernel_choices()
    with pytest.warns(UserWarning, match="measured elsewhere.*cpu: 'Another CPU' there"):
        assert choice_file.load_kernel_choices(path) == 0
    assert native.kernel_choices() == []
    (tmp_path / "other.json").write_text(json.dumps({"choices": 3}))
    with pytest.raises(ValueError, match="not a file of coordconv-fused kernel choices"):
        choice_file.load_kernel_choices(tmp_path / "other.json")


def test_a_loaded_choice_that_cannot_run_here_is_measured_again(kernel_mode, tmp_path):
    """A file's choice names an implementation that is not a candidate for the layer in this
    process (here: the AVX-512 kernel, read with COORDCONV_NO_AVX512=1): the layer is measured
    again and computes the reference's result."""
    kernel_mode("measure")
    _shallow_layer_call()
    (choice,) = native.kernel_choices()
    choice = dict(choice, chosen="avx512_direct", candidates_us={"avx512_direct": 1.0})
    kernel_mode("measure", avx512=False)
    assert native._C.add_kernel_choices([choice]) == 1
    layer, x, _ = _shallow_layer_call()
    (now,) = native.kernel_choices()
    assert now["key"] == choice["key"] and now["chosen"] != "avx512_direct"
    layer.backend = "reference"
    with torch.no_grad():
        torch.testing.assert_close(_shallow_layer_call()[2], layer(x), atol=1e-5, rtol=1e-5)


def test_environment_variable_saves_at_exit_and_loads_at_import(tmp_path):
    path = tmp_path / "cache.json"
    env = {k: v for k, v in os.environ.items() if k not in ("COORDCONV_CPU_KERNEL", "COORDCONV_NO_AVX512")}
    env[choice_file.ENV_VAR] = str(path)
    code = (
        "import torch; from coordconv_fused import CoordConv2d; from coordconv_fused.backends import native; "
        "print(len(native.kernel_choices())); "
        "torch.no_grad()(CoordConv2d(3, 8, 3, padding=1, backend='cpp'))(torch.randn(4, 3, 20, 24)); "
        "print(len(native.kernel_choices()))"
    )
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["0", "1"] and path.exists()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.split() == ["1", "1"]  # loaded at import; the call measured nothing new


@pytest.mark.parametrize(
    "times,heuristic,kept",
    [
        ([1511.0, 1518.0], 1, 1),  # a tie (the stem's forward on a busy 2-core EPYC): the rule's pick stays
        ([1000.0, 1049.0], 1, 1),  # within 5%
        ([1000.0, 1051.0], 1, 0),  # beyond: the measurement wins
        ([2963.0, 20231.0, 2202.0], 0, 2),  # the rule's pick clearly slower
        ([900.0, 1000.0], 0, 0),  # the rule's pick is the fastest
        ([1000.0, 990.0], -1, 1),  # no rule's pick among the candidates: the fastest
    ],
)
def test_measurement_overrides_the_fixed_rule_only_when_clearly_faster(times, heuristic, kept):
    """The kept candidate (kernel_choice.h, pick_measured): the fastest, unless the fixed rule's pick
    is within 5% of it, so that measurement noise on a tie never flips a layer to a kernel that is
    slower in steady state."""
    from coordconv_fused import _C_testing  # type: ignore[attr-defined]

    assert _C_testing.pick_measured(times, heuristic) == kept
