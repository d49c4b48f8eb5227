"""No host-device synchronisation on the CUDA code path: where no GPU is visible, the path runs on
fake CUDA tensors (no data: any .item(), .tolist(), value comparison or data-dependent shape
raises); where one is, forward and backward run under torch.cuda.set_sync_debug_mode("error")."""

import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from coordconv_fused import coord_conv1d, coord_conv2d, coord_conv3d, ops
from coordconv_fused.ops.aten import coord_weight_grad

VARIANTS = [
    (coord_conv2d, (2, 3, 8, 7), dict(padding=1, with_r=True)),
    (coord_conv2d, (2, 3, 9, 8), dict(padding=1, padding_mode="reflect", stride=2, coord_kernel_size=1)),
    (coord_conv2d, (2, 3, 8, 8), dict(padding="same", padding_mode="circular")),
    (coord_conv1d, (2, 3, 11), dict(padding=2, dilation=2, with_r=True)),
    (coord_conv3d, (1, 3, 4, 5, 6), dict(padding=1, padding_mode="replicate")),
]


def _tensors(fn, shape, kwargs, device):
    nd = len(shape) - 2
    k = (3,) * nd
    d = nd + int(kwargs.get("with_r", False))
    ck = (1,) * nd if kwargs.get("coord_kernel_size") == 1 else k
    return (
        torch.randn(*shape, device=device),
        torch.randn(4, shape[1], *k, device=device),
        torch.randn(4, d, *ck, device=device),
        torch.randn(4, device=device),
    )


IDS = ["2d-with_r", "2d-separate-reflect-stride2", "2d-same-circular", "1d-dilated", "3d-replicate"]


@pytest.mark.parametrize("fn,shape,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_path_reads_no_data_on_fake_tensors(fn, shape, kwargs, backend):
    with FakeTensorMode():
        x, w, cw, b = _tensors(fn, shape, kwargs, "cuda")
        y = fn(x, w, cw, b, backend=backend, **kwargs)
        assert y.device.type == "cuda"
        # The backward code (the autograd engine itself needs a real device: called directly).
        args = ops.op_arguments(x, _spec_of(fn, w, kwargs))[1]
        ctx = types.SimpleNamespace(saved_tensors=(x, w, cw), needs_input_grad=(True,) * 4, has_bias=True, args=args)
        grads = ops.differentiable_backward(ctx, torch.randn_like(y))
        assert [g.shape for g in grads[:4]] == [x.shape, w.shape, cw.shape, b.shape]
        assert coord_weight_grad(torch.randn_like(y[:1]), x, w, cw, *args).shape == cw.shape


@pytest.mark.parametrize("fn,shape,kwargs", VARIANTS, ids=IDS)
def test_torch_backend_eager_state_reads_no_data_off_cpu(fn, shape, kwargs):
    """The ``torch`` backend's eager path keeps the coordinates (and, on the CPU only, the term
    checked by value) between calls: on a device that is not the CPU it must compare no values.
    Meta tensors are plain tensors without data (any value read raises), and repeated calls run
    the kept-state path, with and without autograd."""
    x, w, cw, b = _tensors(fn, shape, kwargs, "meta")
    with torch.no_grad():
        for _ in range(3):
            assert fn(x, w, cw, b, backend="torch", **kwargs).device.type == "meta"
    cw.requires_grad_()
    for _ in range(2):
        assert fn(x, w, cw, b, backend="torch", **kwargs).requires_grad


@pytest.mark.backend("cpp")
@pytest.mark.parametrize("fn,shape,kwargs", VARIANTS, ids=IDS)
def test_torch_backend_steady_state_from_cpp_reads_no_data_off_cpu(fn, shape, kwargs):
    """Off the CPU the ``torch`` backend's calls after a signature's first are made from C++
    (``_C.call_aten``): on meta tensors (plain tensors without data) that path runs, with and
    without autograd, and reads no value, so on a GPU it cannot synchronise."""
    from coordconv_fused.testing import torch_backend_counting_python

    x, w, cw, b = _tensors(fn, shape, kwargs, "meta")
    call, python_calls = torch_backend_counting_python(_spec_of(fn, w, kwargs))
    want = fn(x, w, cw, b, backend="torch", **kwargs).shape
    with torch.no_grad():
        for _ in range(3):
            assert call(x, w, cw, b).shape == want
    cw.requires_grad_()
    for _ in range(2):
        y = call(x, w, cw, b)
        assert y.requires_grad and y.device.type == "meta" and y.shape == want
    assert len(python_calls) == 1  # (the first call: the Python path, which hands the state over)


def _spec_of(fn, w, kwargs):
    from coordconv_fused.spec import make_spec

    nd = w.dim() - 2
    return make_spec(
        nd,
        tuple(w.shape[2:]),
        kwargs.get("stride", 1),
        kwargs.get("padding", 0),
        kwargs.get("dilation", 1),
        1,
        kwargs.get("padding_mode", "zeros"),
        kwargs.get("with_r", False),
        kwargs.get("coord_kernel_size") == 1,
    )


@pytest.mark.parametrize("fn,shape,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton", "auto"])
@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_forward_backward_never_syncs(fn, shape, kwargs, backend, device):
    x, w, cw, b = (t.requires_grad_() for t in _tensors(fn, shape, kwargs, device))
    fn(x, w, cw, b, backend=backend, **kwargs).sum().backward()  # warm-up: caches, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x, w, cw, b, backend=backend, **kwargs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
