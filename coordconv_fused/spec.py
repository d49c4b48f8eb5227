"""Argument normalisation and validation shared by the functional API, the modules and backends.

:class:`ConvSpec` is the normalised description of one CoordConv call (everything but the
tensors). :func:`make_spec` builds it from ``nn.Conv``-style arguments and :func:`check_tensors`
validates the tensors against it, raising ``ValueError`` with a message that names the problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Union

from torch import Tensor

from .coords import num_coord_channels
from .geometry import conv_output_size

__all__ = ["ConvSpec", "PaddingArg", "make_spec", "check_flag", "check_tensors", "conv_output_size", "PADDING_MODES"]

PaddingArg = Union[str, int, Sequence[int]]  # noqa: UP007  (a runtime alias: `|` needs Python 3.10's types)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * ndim
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}") from None
    if len(out) == 1:
        out = out * ndim
    if len(out) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    return out


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is a bool; a ``ValueError`` naming ``name`` otherwise (``'yes'``, ``None``,
    ``2`` are refused rather than read as truthy)."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Normalised arguments of a CoordConv call (``ndim`` spatial dims).

    ``padding`` is either a tuple of ints (symmetric, as ``nn.Conv2d`` takes it) or 'same'/'valid'.
    ``separate`` selects the paper's separate 1x1 coordinate filter.
    """

    ndim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    with_r: bool
    separate: bool
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def num_coords(self) -> int:
        """Number of coordinate channels ``d``."""
        return num_coord_channels(self.ndim, self.with_r)

    @property
    def side_pads(self) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` padding of every spatial axis, with 'same' resolved as PyTorch does
        (the smaller half before the first element)."""
        if self.padding == "valid":
            return ((0, 0),) * self.ndim
        if self.padding == "same":
            out = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return tuple((p, p) for p in self.padding if isinstance(p, int))

    @property
    def pad_before(self) -> tuple[int, ...]:
        return tuple(b for b, _ in self.side_pads)

    def split_padding(self) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """Split the padding into an explicit pre-pad and the convolution's symmetric zero padding.

        Returns ``(pre_pad, conv_padding)``. Non-zero padding modes pad everything explicitly (as
        ``nn.Conv2d`` does); zero padding keeps the symmetric part in the convolution and pre-pads
        only the extra trailing element of an asymmetric 'same' (as ATen does).
        """
        if self.padding_mode != "zeros":
            return self.side_pads, (0,) * self.ndim
        pre = tuple((0, a - b) for b, a in self.side_pads)
        return pre, tuple(b for b, _ in self.side_pads)

    def output_size(self, in_sizes: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for spatial input size ``in_sizes``."""
        if self.transposed:
            return tuple(
                (n - 1) * s - 2 * p + d * (k - 1) + op + 1
                for n, s, p, d, k, op in zip(
                    in_sizes, self.stride, self.padding, self.dilation, self.kernel_size, self.output_padding
                )
            )
        return tuple(
            conv_output_size(n, k, s, b, a, d)
            for n, (b, a), s, d, k in zip(in_sizes, self.side_pads, self.stride, self.dilation, self.kernel_size)
        )


def make_spec(
    ndim: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: PaddingArg = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    with_r: bool = False,
    separate: bool = False,
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
) -> ConvSpec:
    """Validate ``nn.Conv``-style arguments and return the normalised :class:`ConvSpec`."""
    with_r = check_flag(with_r, "with_r")
    kernel = _tuple(kernel_size, ndim, "kernel_size")
    stride_t = _tuple(stride, ndim, "stride")
    dilation_t = _tuple(dilation, ndim, "dilation")
    out_pad = _tuple(output_padding, ndim, "output_padding")
    if any(k <= 0 for k in kernel):
        raise ValueError(f"kernel_size must be positive, got {kernel}")
    if any(s <= 0 for s in stride_t):
        raise ValueError(f"stride must be positive, got {stride_t}")
    if any(d <= 0 for d in dilation_t):
        raise ValueError(f"dilation must be positive, got {dilation_t}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(map(repr, PADDING_MODES))}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple of ints, got {padding!r}")
        if transposed:
            raise ValueError(f"padding={padding!r} is not supported for transposed convolutions")
        if padding == "same" and any(s != 1 for s in stride_t):
            raise ValueError("padding='same' is not supported for strided convolutions")
        padding_n: tuple[int, ...] | str = padding
    else:
        padding_n = _tuple(padding, ndim, "padding")
        if any(p < 0 for p in padding_n):
            raise ValueError(f"padding must be non-negative, got {padding_n}")
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(
                f"only padding_mode='zeros' is supported for transposed convolutions, got {padding_mode!r}"
            )
        if separate:
            raise ValueError("the separate coordinate filter is not supported for transposed convolutions")
        for op, s, d in zip(out_pad, stride_t, dilation_t):
            if op < 0 or (op >= s and op >= d):
                raise ValueError(
                    f"output_padding must be non-negative and smaller than either stride or dilation, "
                    f"got output_padding={out_pad}, stride={stride_t}, dilation={dilation_t}"
                )
    elif any(out_pad):
        raise ValueError("output_padding is only valid for transposed convolutions")
    return ConvSpec(
        ndim=ndim,
        kernel_size=kernel,
        stride=stride_t,
        padding=padding_n,
        dilation=dilation_t,
        groups=groups,
        padding_mode=padding_mode,
        with_r=with_r,
        separate=bool(separate),
        transposed=transposed,
        output_padding=out_pad,
    )


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensors(input: Tensor, weight: Tensor, coord_weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> None:
    """Check a batched input and the parameters against ``spec``; raise ``ValueError`` if wrong."""
    n = spec.ndim
    kind = f"conv_transpose{n}d" if spec.transposed else f"conv{n}d"
    for name, t in (("input", input), ("weight", weight), ("coord_weight", coord_weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"coord_{kind}: {name} must be a Tensor, got {type(t).__name__}")
    if input.dim() != n + 2:
        raise ValueError(
            f"coord_{kind}: expected a {n + 2}-D (batched) or {n + 1}-D (unbatched) input, "
            f"got input of shape {_fmt(input.shape)}"
        )
    if not input.is_floating_point():
        raise ValueError(f"coord_{kind}: input must be a floating-point tensor, got {input.dtype}")
    for name, t in (("weight", weight), ("coord_weight", coord_weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(
                f"coord_{kind}: {name} is on {t.device} but input is on {input.device}; move them to the same device"
            )
        if t.dtype != input.dtype:
            raise ValueError(
                f"coord_{kind}: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                f"they must match (use torch.autocast for mixed precision)"
            )
    if weight.dim() != n + 2:
        raise ValueError(f"coord_{kind}: expected a {n + 2}-D weight, got shape {_fmt(weight.shape)}")
    if tuple(weight.shape[2:]) != spec.kernel_size:
        raise ValueError(
            f"coord_{kind}: weight kernel {tuple(weight.shape[2:])} does not match kernel_size {spec.kernel_size}"
        )
    c_in, g, d = input.shape[1], spec.groups, spec.num_coords
    if spec.transposed:
        c_out = weight.shape[1] * g
        if weight.shape[0] != c_in:
            raise ValueError(
                f"coord_{kind}: weight of shape {_fmt(weight.shape)} expects {weight.shape[0]} input "
                f"channels, but input of shape {_fmt(input.shape)} has {c_in}"
            )
        expected_cw = (d, c_out, *spec.kernel_size)
    else:
        c_out = weight.shape[0]
        if weight.shape[1] * g != c_in:
            raise ValueError(
                f"coord_{kind}: weight of shape {_fmt(weight.shape)} with groups={g} expects "
                f"{weight.shape[1] * g} input channels, but input of shape {_fmt(input.shape)} has {c_in}"
            )
        if c_out % g != 0:
            raise ValueError(f"coord_{kind}: out_channels={c_out} is not divisible by groups={g}")
        ck = (1,) * n if spec.separate else spec.kernel_size
        expected_cw = (c_out, d, *ck)
    if c_in % g != 0:
        raise ValueError(f"coord_{kind}: in_channels={c_in} is not divisible by groups={g}")
    if tuple(coord_weight.shape) != expected_cw:
        what = "separate 1x1" if spec.separate else "full"
        raise ValueError(
            f"coord_{kind}: coord_weight must have shape {_fmt(expected_cw)} ({d} coordinate channels"
            f"{', with_r' if spec.with_r else ''}, {what} coordinate kernel), got {_fmt(coord_weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"coord_{kind}: bias must have shape [{c_out}], got {_fmt(bias.shape)}")
    in_sizes = tuple(input.shape[2:])
    if not spec.transposed and spec.padding_mode in ("reflect", "circular"):
        for n_i, (b, a) in zip(in_sizes, spec.side_pads):
            limit = n_i - 1 if spec.padding_mode == "reflect" else n_i
            if max(b, a) > limit:
                raise ValueError(
                    f"coord_{kind}: padding {spec.side_pads} is too large for padding_mode="
                    f"{spec.padding_mode!r} on an input of spatial size {in_sizes}"
                )
    out = spec.output_size(in_sizes)
    if any(o <= 0 for o in out):
        raise ValueError(
            f"coord_{kind}: input of spatial size {in_sizes} is too small for kernel_size="
            f"{spec.kernel_size}, dilation={spec.dilation}, padding={spec.padding}, stride={spec.stride} "
            f"(output size would be {out})"
        )
