"""Host-side launchers of the Triton kernels, taking the arguments of the CoordConv op.

On CUDA the kernels are autotuned over a few configurations (measured on an H200 with one fixed
configuration, docs/bench-cuda.md: 3.2-32x nn.Conv2d forward, so ``auto`` does not use them); in
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, for tests) they run with one fixed
configuration of large blocks, since the interpreter's cost is per program and per loop iteration.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from coordconv_fused.geometry import conv_output_size, image_sizes, pairs

from .coord_conv_fwd import coord_conv_fwd_kernel
from .coord_tile import PAD_MODES
from .coord_weight_grad import coord_weight_grad_kernel

__all__ = ["INTERPRET", "coord_conv_forward", "coord_weight_grad", "input_precision"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# COORDCONV_TRITON_AUTOTUNE=0: one fixed configuration on CUDA instead of autotuning each new shape
# (test runs on a GPU: each autotuned shape compiles and times every configuration).
FIXED_CONFIG = os.environ.get("COORDCONV_TRITON_AUTOTUNE") == "0"

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 64, 32, 4, 3),
        (64, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (64, 32, 32, 4, 4),
        (128, 32, 64, 4, 3),
        (32, 32, 16, 2, 2),
    ]
]
_GRAD_CONFIGS = [
    triton.Config({"BLOCK_CO": bc, "BLOCK_P": bp, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bc, bp, bk, w, s in [(64, 64, 32, 4, 3), (32, 128, 32, 4, 3), (64, 128, 16, 4, 3), (16, 64, 16, 2, 2)]
]
_fwd_autotuned = triton.autotune(_FWD_CONFIGS, key=["C_G", "COUT_G", "K_DATA", "K_COORD"])(coord_conv_fwd_kernel)
_grad_autotuned = triton.autotune(_GRAD_CONFIGS, key=["COUT", "K_COORD"])(coord_weight_grad_kernel)


def input_precision(dtype: torch.dtype) -> str:
    """'tf32' for float32 where PyTorch's own convolutions may use TF32, else 'ieee'."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _lift(values: Sequence[int], fill: int) -> list[int]:
    """Pad a per-axis list to 3 axes (D, H, W) with leading ``fill``."""
    return [fill] * (3 - len(values)) + [int(v) for v in values]


@dataclasses.dataclass
class _Geometry:
    """The index arithmetic every kernel needs, lifted to 3 spatial axes."""

    padded: list[int]  # DP, HP, WP
    out: list[int]  # DO, HO, WO
    image: list[int]  # ID, IH, IW
    before: list[int]  # BD, BH, BW
    conv: list[int]  # SD, SH, SW, PD, PH, PW, DD, DH, DW, KD, KH, KW

    def args(self) -> list[int]:
        return [*self.out, *self.image, *self.before, *self.conv]


def _geometry(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, pre_pad) -> _Geometry:
    kernel = weight.shape[2:]
    out = [
        conv_output_size(n, k, s, p, p, d) for n, k, s, p, d in zip(input.shape[2:], kernel, stride, padding, dilation)
    ]
    return _Geometry(
        padded=_lift(input.shape[2:], 1),
        out=_lift(out, 1),
        image=_lift(image_sizes(input, pre_pad), 1),
        before=_lift([b for b, _ in pairs(pre_pad)], 0),
        conv=_lift(stride, 1) + _lift(padding, 0) + _lift(dilation, 1) + _lift(kernel, 1),
    )


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(
        f"the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, for "
        f"testing); got a tensor on {t.device}"
    )


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    """View ``[N, C, *sizes]`` as ``[N, C, D, H, W]`` (leading spatial axes of size 1)."""
    return t.reshape(*t.shape[:2], *([1] * (5 - t.dim())), *t.shape[2:])


def _output_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format ATen's convolution gives its output (what the fake kernel reports)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if fmt is not None:
        for t in (input, weight):
            if t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
                return fmt
    return torch.contiguous_format


def coord_conv_forward(
    input,
    weight,
    coord_weight,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    pre_pad,
    pre_pad_mode,
    with_r,
    separate,
):
    """The fused forward (the op's arguments; see :mod:`coordconv_fused.ops`)."""
    if transposed:
        raise NotImplementedError("the Triton kernels do not implement transposed CoordConv")
    _check_device(input)
    ndim = input.dim() - 2
    geo = _geometry(input, weight, stride, padding, dilation, pre_pad)
    n, c_out = input.shape[0], weight.shape[0]
    out = torch.empty(
        (n, c_out, *geo.out[3 - ndim :]),
        dtype=input.dtype,
        device=input.device,
        memory_format=_output_memory_format(input, weight),
    )
    if out.numel() == 0:
        return out
    x5, y5 = _as_5d(input), _as_5d(out)
    w = weight.contiguous()
    cw = coord_weight.contiguous()
    c_g, cout_g = input.shape[1] // groups, c_out // groups
    m = n * geo.out[0] * geo.out[1] * geo.out[2]
    k_data = w[0].numel()
    k_coord = cw[0].numel()
    args = [
        x5,
        w,
        cw,
        bias if bias is not None else w,
        y5,
        m,
        c_g,
        cout_g,
        *geo.padded,
        *x5.stride(),
        *y5.stride(),
        *geo.args(),
        k_data,
        k_coord,
    ]
    meta = dict(
        NDIM=ndim,
        WITH_R=bool(with_r),
        SEPARATE=bool(separate),
        PAD_MODE=PAD_MODES[pre_pad_mode],
        HAS_BIAS=bias is not None,
        CT=tl.float64 if input.dtype == torch.float64 else tl.float32,
        INPUT_PRECISION=input_precision(input.dtype),
        # Triton 3.8's interpreter computes garbage for a bfloat16 tl.dot.
        DOT_F32=INTERPRET and input.dtype == torch.bfloat16,
    )
    if INTERPRET:
        bm, bn = _block(m, 16, 128), _block(cout_g, 16, 64)
        bk = _block(max(k_data, k_coord), 16, 64)
        grid = (triton.cdiv(m, bm), triton.cdiv(cout_g, bn), groups)
        coord_conv_fwd_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    elif FIXED_CONFIG:
        cfg = _FWD_CONFIGS[1]
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(cout_g, cfg.kwargs["BLOCK_N"]), groups)
        coord_conv_fwd_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:

        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cout_g, cfg["BLOCK_N"]), groups)

        _fwd_autotuned[grid](*args, **meta)
    return out


def coord_weight_grad(
    grad_sum,
    input,
    weight,
    coord_weight,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    pre_pad,
    pre_pad_mode,
    with_r,
    separate,
):
    """Gradient of ``coord_weight`` from ``grad_sum = grad_output.sum(0, keepdim=True)``."""
    if transposed:
        raise NotImplementedError("the Triton kernels do not implement transposed CoordConv")
    _check_device(input)
    geo = _geometry(input, weight, stride, padding, dilation, pre_pad)
    ct = torch.float64 if input.dtype == torch.float64 else torch.float32
    gs = grad_sum.to(ct).contiguous()
    c_out = coord_weight.shape[0]
    k_coord = coord_weight[0].numel()
    out = torch.empty(coord_weight.shape, dtype=coord_weight.dtype, device=coord_weight.device)
    args = [gs, out, c_out, *geo.padded, *geo.args(), k_coord]
    meta = dict(
        NDIM=input.dim() - 2,
        WITH_R=bool(with_r),
        SEPARATE=bool(separate),
        PAD_MODE=PAD_MODES[pre_pad_mode],
        IN_DTYPE=TL_DTYPES[input.dtype],
        CT=tl.float64 if ct == torch.float64 else tl.float32,
        INPUT_PRECISION=input_precision(input.dtype),
    )
    if INTERPRET:
        bc, bk = _block(c_out, 16, 64), _block(k_coord, 16, 64)
        bp = _block(gs[0, 0].numel(), 16, 256)
        grid = (triton.cdiv(c_out, bc), triton.cdiv(k_coord, bk))
        coord_weight_grad_kernel[grid](*args, **meta, BLOCK_CO=bc, BLOCK_P=bp, BLOCK_K=bk)
    elif FIXED_CONFIG:
        cfg = _GRAD_CONFIGS[0]
        grid = (triton.cdiv(c_out, cfg.kwargs["BLOCK_CO"]), triton.cdiv(k_coord, cfg.kwargs["BLOCK_K"]))
        coord_weight_grad_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:

        def grid(cfg):
            return (triton.cdiv(c_out, cfg["BLOCK_CO"]), triton.cdiv(k_coord, cfg["BLOCK_K"]))

        _grad_autotuned[grid](*args, **meta)
    return out
