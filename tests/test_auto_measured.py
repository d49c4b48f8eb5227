"""``auto`` by measurement (coordconv_fused.backends.measured): the fastest candidate is kept per layer
signature, measured once, keyed by shape and by training/inference, never touching the caller's
gradients, switched off by COORDCONV_AUTO=fixed. On the CPU with two stand-in backends (one slowed
down); on CUDA, where a GPU is visible, with the real candidates."""

import time

import pytest
import torch

from coordconv_fused import CoordConv2d, coord_conv2d
from coordconv_fused.backends import (
    AUTO_MEASURED,
    Backend,
    auto_choices,
    clear_auto_choices,
    get_backend,
    temporary_backend,
)
from coordconv_fused.functional import clear_plan_cache


@pytest.fixture
def stand_ins(monkeypatch):
    """Backends 'fast' and 'slow' (the torch backend, the second sleeping 0.1 s per call: far beyond
    the noise of a busy machine) as auto's measured candidates on the CPU; yields the number of calls
    each received."""
    torch_fn = get_backend("torch").fn
    calls = {"fast": 0, "slow": 0}

    def make(name, delay):
        def fn(input, weight, coord_weight, bias, spec):
            calls[name] += 1
            if delay:
                time.sleep(delay)
            return torch_fn(input, weight, coord_weight, bias, spec)

        return Backend(name=name, fn=fn)

    with temporary_backend(make("slow", 0.1)), temporary_backend(make("fast", 0.0)):
        monkeypatch.setitem(AUTO_MEASURED, "cpu", ("slow", "fast"))
        monkeypatch.delenv("COORDCONV_AUTO", raising=False)
        clear_auto_choices()
        clear_plan_cache()
        yield calls
    clear_auto_choices()
    clear_plan_cache()


def _tensors(shape=(2, 3, 6, 7), grad=False):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=grad)
    w = torch.randn(4, shape[1], 3, 3, requires_grad=grad)
    cw = torch.randn(4, 2, 3, 3, requires_grad=grad)
    b = torch.randn(4, requires_grad=grad)
    return x, w, cw, b


def test_picks_the_fastest_once(stand_ins):
    x, w, cw, b = _tensors()
    out = coord_conv2d(x, w, cw, b, padding=1, backend="auto")
    torch.testing.assert_close(out, coord_conv2d(x, w, cw, b, padding=1, backend="torch"))
    (choice,) = auto_choices()
    assert choice["chosen"] == "fast" and choice["timed"] == "forward"
    assert set(choice["times_us"]) == {"slow", "fast"} and choice["times_us"]["slow"] > 90_000
    slow_calls = stand_ins["slow"]
    assert slow_calls == 4  # one warm-up and three timed calls
    for _ in range(3):
        coord_conv2d(x, w, cw, b, padding=1, backend="auto")
    assert stand_ins["slow"] == slow_calls and len(auto_choices()) == 1  # no second measurement


def test_keyed_by_shape_and_training(stand_ins):
    x, w, cw, b = _tensors()
    coord_conv2d(x, w, cw, b, padding=1, backend="auto")
    coord_conv2d(*_tensors((3, 3, 5, 5)), padding=1, backend="auto")  # a new shape
    coord_conv2d(x, w, cw, b, padding=1, stride=2, backend="auto")  # new arguments
    coord_conv2d(x.to(memory_format=torch.channels_last), w, cw, b, padding=1, backend="auto")  # new layout
    assert len(auto_choices()) == 4
    xg, wg, cwg, bg = _tensors(grad=True)
    coord_conv2d(xg, wg, cwg, bg, padding=1, backend="auto").sum().backward()  # training: its own entry
    timed = [c["timed"] for c in auto_choices()]
    assert timed.count("forward+backward") == 1 and len(timed) == 5
    with torch.no_grad():  # inference with the same tensors: the forward-only entry
        coord_conv2d(xg, wg, cwg, bg, padding=1, backend="auto")
    assert len(auto_choices()) == 5


def test_measurement_leaves_gradients_alone(stand_ins):
    x, w, cw, b = _tensors(grad=True)
    out = coord_conv2d(x, w, cw, b, padding=1, backend="auto")  # the first call measures fwd+bwd
    assert all(t.grad is None for t in (x, w, cw, b))
    out.sum().backward()
    got = [t.grad.clone() for t in (x, w, cw, b)]
    x2, w2, cw2, b2 = _tensors(grad=True)
    coord_conv2d(x2, w2, cw2, b2, padding=1, backend="torch").sum().backward()
    for g, t in zip(got, (x2, w2, cw2, b2)):
        torch.testing.assert_close(g, t.grad)


def test_fixed_mode_does_not_measure(stand_ins, monkeypatch):
    monkeypatch.setenv("COORDCONV_AUTO", "fixed")
    coord_conv2d(*_tensors(), padding=1, backend="auto")
    assert auto_choices() == [] and stand_ins == {"fast": 0, "slow": 0}  # the preference order: torch


def test_bad_mode_is_an_error(stand_ins, monkeypatch):
    monkeypatch.setenv("COORDCONV_AUTO", "fastest")
    with pytest.raises(ValueError, match="COORDCONV_AUTO must be 'measure' or 'fixed'"):
        coord_conv2d(*_tensors(), padding=1, backend="auto")


def test_a_module_keeps_the_choice(stand_ins):
    layer = CoordConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 7)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert [c["chosen"] for c in auto_choices()] == ["fast"], auto_choices()
    assert stand_ins["slow"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_measures_torch_and_cuda():
    from coordconv_fused.backends.native import has_cuda_kernels

    if not has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    clear_auto_choices()
    clear_plan_cache()
    layer = CoordConv2d(8, 16, 3, padding=1).cuda()
    x = torch.randn(4, 8, 20, 20, device="cuda")
    with torch.no_grad():
        out = layer(x)
    (choice,) = auto_choices()
    assert set(choice["times_us"]) == {"torch", "cuda"} and choice["chosen"] in ("torch", "cuda")
    torch.testing.assert_close(out, layer.to("cpu")(x.cpu()), atol=1e-4, rtol=1e-4, check_device=False)


def test_gpu_report_lists_the_choices():
    """The GPU benchmark's report says what auto chose, with each candidate's time (CPU: the format)."""
    from coordconv_fused import gpu_benchmark

    report = {
        "results": [],
        "machine": {"processor": "GPU", "torch": "2.x", "cuda": "13.0", "cudnn": 91900, "tf32": False},
        "date": "today",
        "rounds": 3,
        "auto_choices": [
            {
                "layer": "(8, 64, 56, 56)",
                "timed": "forward",
                "chosen": "cuda",
                "times_us": {"torch": 52.4, "cuda": 41.0},
            }
        ],
    }
    text = gpu_benchmark.format_report(report)
    assert "| (8, 64, 56, 56) | forward | cuda | torch 52, cuda 41 |" in text
