"""``torch.utils.flop_counter.FlopCounterMode`` on every backend: the custom ops' FLOP formulas
(``coordconv_fused/ops/flops.py``) against a count by hand of the decomposition. A dispatch mode sees a
custom op as one call and not the ATen calls inside it: without the formulas, a layer on ``cpp`` or
``auto`` counted zero FLOPs."""

import math
import subprocess
import sys

import pytest
import torch

from coordconv_fused.ops.aten import composite
from coordconv_fused.testing import Case

FLOP_CASES = [
    Case((6, 5), batch=2, in_channels=3, out_channels=4, padding=1, with_r=True),
    Case((6, 5), batch=3, in_channels=4, out_channels=4, groups=2, stride=2, padding=1, padding_mode="reflect"),
    Case((6, 5), batch=2, in_channels=3, out_channels=4, kernel_size=3, padding=1, separate=True),
    Case((7,), batch=2, in_channels=2, out_channels=3, padding=1),
    Case((3, 4, 3), batch=1, in_channels=1, out_channels=2, kernel_size=2, padding=1, with_r=True),
    Case((3, 4), batch=2, in_channels=3, out_channels=4, transposed=True, stride=2, with_r=True),
]


def _count(run) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as forward:
        out = run()
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


def _counted_flops(backend: str, case: Case) -> tuple[int, int]:
    tensors = case.make_tensors(torch.float32, seed=1)
    case.run(backend, tensors)  # (a first call may measure candidates: count a later one)
    return _count(lambda: case.run(backend, tensors))


def _decomposition_flops(case: Case) -> tuple[int, int]:
    """What PyTorch counts for the layer as ATen ops (the data convolution plus the coordinate term
    for a batch of one: ``ops.aten.composite``, what the exporters get)."""
    t = case.make_tensors(torch.float32, seed=1)
    return _count(lambda: composite(t["input"], t["weight"], t["coord_weight"], t["bias"], case.spec()))


def _by_hand(case: Case) -> tuple[int, int]:
    """2 * (multiply-adds of the data convolution + those of the coordinate term for a batch of
    one); backward: input and weight gradients of the data convolution, and the coordinate filter's
    gradient (a batch of one again). (For groups > 1 PyTorch counts a convolution's weight gradient
    as if ungrouped: compared where groups == 1.)"""
    n, c_in, c_out = case.batch, case.in_channels, case.out_channels
    out = case.run("reference", case.make_tensors(torch.float32)).shape[2:]
    taps = math.prod(case.spec().kernel_size)
    d = case.ndim + case.with_r
    # (a transposed convolution: each input point times the whole filter, as PyTorch counts it)
    points = math.prod(case.sizes if case.transposed else out)
    data = 2 * n * points * taps * c_in * c_out // case.groups
    term = 2 * points * c_out * d * (1 if case.separate else taps)
    return data + term, 2 * data + term


@pytest.mark.parametrize("case", [c for c in FLOP_CASES if c.groups == 1], ids=str)
def test_the_decomposition_counts_what_a_count_by_hand_gives(case):
    assert _decomposition_flops(case) == _by_hand(case)


# (no transposed C++ kernel: those pairs are not generated)
PAIRS = [
    (b, c)
    for c in FLOP_CASES
    for b in ("torch", "cpp", "auto", "cuda_emulated")
    if not (c.transposed and b in ("cpp", "cuda_emulated"))
]


@pytest.mark.parametrize("backend,case", PAIRS, ids=[f"{b}-{c}" for b, c in PAIRS])
def test_flop_counter_counts_every_backend_as_the_decomposition(backend, case, request):
    if backend == "cuda_emulated":
        backend = request.getfixturevalue("emulated_cuda")
    assert _counted_flops(backend, case) == _decomposition_flops(case)


@pytest.mark.backend("triton")
def test_flop_counter_counts_the_triton_ops():
    case = Case((5, 4), batch=1, in_channels=2, out_channels=2, padding=1)
    assert _counted_flops("triton", case) == _decomposition_flops(case)


@pytest.mark.backend("cpp")
def test_formulas_are_registered_when_the_counter_is_imported_not_before():
    """``import coordconv_fused`` leaves ``torch.utils.flop_counter`` (and the Triton it imports)
    unloaded; importing it afterwards registers the formulas (a fresh interpreter)."""
    code = """
import sys
import torch
import coordconv_fused
assert "torch.utils.flop_counter" not in sys.modules
from torch.utils.flop_counter import FlopCounterMode
layer = coordconv_fused.CoordConv2d(3, 8, 3, padding=1, backend="cpp")
with FlopCounterMode(display=False) as counter:
    layer(torch.randn(2, 3, 16, 16))
print(counter.get_total_flops())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 2 * 256 * 9 * 8 * (2 * 3 + 2)  # data (batch 2) + term (batch 1)
