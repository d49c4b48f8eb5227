"""What a forward keeps alive for backward: the fused backends save what nn.Conv2d saves (plus the
small coord_weight), never a per-sample coordinate tensor. Counted with saved-tensor hooks, not
timed, so the test is deterministic."""

import pytest
import torch
import torch.nn as nn

from coordconv_fused import CoordConv2d, CoordConv3d


def _saved_bytes(fn, x):
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


FUSED = ["torch", "cpp", "auto"]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("with_r,coord_kernel_size", [(False, None), (True, 1)])
def test_fused_backends_save_no_more_than_conv(backend, padding_mode, with_r, coord_kernel_size):
    n, c, h, w = 16, 8, 32, 24
    x = torch.randn(n, c, h, w, requires_grad=True)
    conv = nn.Conv2d(c, 8, 3, padding=1, padding_mode=padding_mode)
    cc = CoordConv2d(
        c,
        8,
        3,
        padding=1,
        padding_mode=padding_mode,
        with_r=with_r,
        coord_kernel_size=coord_kernel_size,
        backend=backend,
    )
    plain = _saved_bytes(conv, x)
    ours = _saved_bytes(cc, x)
    assert ours <= plain + cc.coord_weight.numel() * 4
    if coord_kernel_size is None:
        # The reference (explicit concatenation) holds the concatenated input: N*(C+d)*H*W floats.
        cc.backend = "reference"
        assert _saved_bytes(cc, x) >= plain + n * 2 * h * w * 4


def test_3d_saves_no_more_than_conv():
    x = torch.randn(4, 4, 8, 8, 8, requires_grad=True)
    conv = nn.Conv3d(4, 4, 3, padding=1)
    cc = CoordConv3d(4, 4, 3, padding=1, with_r=True, backend="torch")
    assert _saved_bytes(cc, x) <= _saved_bytes(conv, x) + cc.coord_weight.numel() * 4
