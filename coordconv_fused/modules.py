"""CoordConv modules: drop-in subclasses of ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn import init

from . import backends
from .coords import num_coord_channels
from .functional import (
    CONV_FUNCTIONS,
    CONV_TRANSPOSE_FUNCTIONS,
    _cached_call,
    _coord_conv_transpose,
    _spec_of_key,
    add_coords,
    is_separate_filter,
)
from .ops.arguments import static_arguments
from .spec import PaddingArg, check_flag, make_spec

__all__ = [
    "CoordConv1d",
    "CoordConv2d",
    "CoordConv3d",
    "CoordConvTranspose1d",
    "CoordConvTranspose2d",
    "CoordConvTranspose3d",
    "AddCoords",
]

IntOrTuple = int | Sequence[int]


def _check_backend_name(backend: str) -> str:
    names = backends.backend_names()
    if backend != "auto" and backend not in names:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {names}")
    return backend


if TYPE_CHECKING:  # what the mixins are mixed into (at run time: object, so the MRO stays nn.Conv's)
    _ConvBase = nn.modules.conv._ConvNd
    _ConvTransposeBase = nn.modules.conv._ConvTransposeNd
else:
    _ConvBase = _ConvTransposeBase = object


class _CoordMixin(_ConvBase):
    """Shared coordinate-parameter handling of the CoordConv modules.

    Subclasses set ``_ndim`` (spatial rank) and, for forward convolutions, ``_base`` (the
    ``nn.Conv`` class). (No class annotations at run time: TorchScript would try to type them.)
    """

    if TYPE_CHECKING:
        _ndim: int

    __jit_unused_properties__ = ["num_coords", "coord_kernel_size"]
    __jit_ignored_attributes__ = ["_call_key"]

    @torch.jit.unused
    def _forward_tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(weight, coord_weight, bias)`` for a forward call: read from ``_parameters`` rather than
        through ``nn.Module.__getattr__`` (0.6 µs each on a 2-core EPYC, a tenth of a small layer's
        host time); one not there (``torch.nn.utils.parametrize``, ``weight_norm``: a property or a
        plain attribute instead) is read as an attribute."""
        params: dict[str, Any] = self._parameters
        weight = params.get("weight")
        if weight is None:
            weight = self.weight
        coord_weight = params.get("coord_weight")
        if coord_weight is None:
            coord_weight = self.coord_weight
        bias = params["bias"] if "bias" in params else self.bias
        return weight, coord_weight, bias

    def _add_coord_weight(self, shape: Sequence[int], with_r: bool, backend: str, factory_kwargs: dict) -> None:
        self.with_r = with_r
        self.backend = _check_backend_name(backend)
        self.coord_weight = nn.Parameter(torch.empty(*shape, **factory_kwargs))
        self.reset_parameters()

    def _fan_in(self) -> int:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise ``weight``, ``coord_weight`` and ``bias`` as ``nn.Conv`` initialises a layer
        whose input has the coordinate channels concatenated (uniform in ``±1/sqrt(fan_in)``)."""
        if "coord_weight" not in self._parameters:
            return  # called by nn.ConvNd.__init__, before coord_weight exists
        bound = 1.0 / math.sqrt(self._fan_in())
        init.uniform_(self.weight, -bound, bound)
        init.uniform_(self.coord_weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    @property
    def num_coords(self) -> int:
        """Number of implicit coordinate channels ``d``."""
        return num_coord_channels(self._ndim, self.with_r)

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: precompute the op's arguments as plain attributes, so
        that the scripted forward calls ``coordconv_fused::coord_conv`` directly."""
        transposed = isinstance(self, _CoordConvTransposeNd)
        spec = make_spec(
            self._ndim,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
            self.with_r,
            getattr(self, "separate", False),
            transposed,
        )
        # The same arguments the eager path prepares (ops.arguments.static_arguments), as attributes.
        pads, mode, args = static_arguments(spec)
        stride, conv_padding, dilation, _, _, _, pre_pad, _, _, separate = args
        self._script_ndim = self._ndim
        self._script_stride = stride
        self._script_conv_padding = conv_padding
        self._script_dilation = dilation
        self._script_fpad = pads if pads is not None else [0] * (2 * self._ndim)
        self._script_fpad_mode = mode
        self._script_pre_pad = pre_pad
        self._script_separate = separate
        return self

    def _scripted_call(self, input: Tensor, output_padding: list[int], transposed: bool) -> Tensor:
        unbatched = input.dim() == self._script_ndim + 1
        x = input.unsqueeze(0) if unbatched else input
        if any(p != 0 for p in self._script_fpad):
            x = F.pad(x, self._script_fpad, mode=self._script_fpad_mode)
        out = torch.ops.coordconv_fused.coord_conv(
            x,
            self.weight,
            self.coord_weight,
            self.bias,
            self._script_stride,
            self._script_conv_padding,
            self._script_dilation,
            transposed,
            output_padding,
            self.groups,
            self._script_pre_pad,
            self.padding_mode,
            self.with_r,
            self._script_separate,
        )
        return out.squeeze(0) if unbatched else out


# What a forward layer's plan key holds of its configuration (functional._cached_call): setting any
# of these makes the key kept on the layer again.
_KEY_ATTRIBUTES = frozenset({"_ndim", "stride", "padding", "dilation", "groups", "padding_mode", "with_r", "separate"})


class _CoordConvNd(_CoordMixin):
    if TYPE_CHECKING:
        _base: type[nn.modules.conv._ConvNd]

    """CoordConv over ``_ndim`` spatial dims; mixed into ``nn.Conv{1,2,3}d``."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _KEY_ATTRIBUTES and "_call_key" in self.__dict__:  # (a constructed layer)
            self._make_call_key()

    @torch.jit.unused
    def _make_call_key(self) -> tuple:
        """The configuration's part of the plan key of :meth:`_eager_forward`, kept on the layer
        (made at construction, made again when any of ``_KEY_ATTRIBUTES`` is set: under
        ``torch.compile`` it is then a constant, never a side effect) rather than read attribute by
        attribute on every call."""
        key = (
            self._ndim, self.stride, self.padding, self.dilation, self.groups, self.padding_mode, self.with_r, None,
            self.separate,
        )  # fmt: skip
        self.__dict__["_call_key"] = key
        return key

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        with_r: bool = False,
        coord_kernel_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        self.separate = is_separate_filter(coord_kernel_size, self._ndim)
        # Validate every argument first, with the functional API's messages (nn.Conv accepts e.g.
        # kernel_size=0 with a warning; the coordinate filter's initialisation would then divide by 0).
        make_spec(self._ndim, kernel_size, stride, padding, dilation, groups, padding_mode, with_r, self.separate)
        # (the MRO's next class is nn.Conv{1,2,3}d, whose signature is not _ConvNd's)
        conv_args: tuple[Any, ...] = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        super().__init__(*conv_args, bias, padding_mode, device, dtype)  # type: ignore[call-arg]
        ck = (1,) * self._ndim if self.separate else self.kernel_size
        d = num_coord_channels(self._ndim, with_r)
        self._add_coord_weight((out_channels, d, *ck), with_r, backend, {"device": device, "dtype": dtype})
        self._make_call_key()

    @property
    def coord_kernel_size(self) -> int | None:
        return 1 if self.separate else None

    def _fan_in(self) -> int:
        return (self.in_channels // self.groups + self.num_coords) * math.prod(self.kernel_size)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript: the `torch` backend's op, called directly (no dispatch in a script).
            return self._scripted_call(input, [0] * self._script_ndim, False)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):  # a torch.fx.Proxy (symbolic tracing): one call of the function
            return CONV_FUNCTIONS[self._ndim](
                input, self.weight, self.coord_weight, self.bias, self.stride, self.padding, self.dilation,
                self.groups, self.padding_mode, self.with_r, self.backend, coord_kernel_size=self.coord_kernel_size,
            )  # fmt: skip
        # The key and spec of functional._coord_conv, built here without its extra frame, closure and
        # keyword call: a few microseconds of a small layer's host time.
        weight, coord_weight, bias = self._forward_tensors()
        key = self.__dict__.get("_call_key") or self._make_call_key()
        return _cached_call(key, _spec_of_key, input, weight, coord_weight, bias, self.backend)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", with_r={self.with_r}, coord_kernel_size="
            f"{self.coord_kernel_size}, backend={self.backend!r}"
        )

    @classmethod
    def from_conv(
        cls, conv: nn.Module, with_r: bool = False, coord_kernel_size: int | None = None, backend: str = "auto"
    ):
        """A CoordConv layer computing exactly what ``conv`` computes until it is trained.

        Copies ``conv``'s configuration, ``weight`` and ``bias`` (same device and dtype) and sets
        ``coord_weight`` to zero.
        """
        base = cls._base
        if not isinstance(conv, base) or isinstance(conv, _CoordConvNd):
            raise TypeError(f"{cls.__name__}.from_conv expects an nn.{base.__name__}, got {type(conv).__name__}")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            with_r=with_r,
            coord_kernel_size=coord_kernel_size,
            backend=backend,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            new.coord_weight.zero_()
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None and new.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        new.train(conv.training)
        return new


class CoordConv1d(_CoordConvNd, nn.Conv1d):
    """``nn.Conv1d`` over the input plus an implicit coordinate channel (and ``|c0|`` with
    ``with_r``). See :class:`CoordConv2d`."""

    _ndim = 1
    _base = nn.Conv1d


class CoordConv2d(_CoordConvNd, nn.Conv2d):
    """``nn.Conv2d`` over the input plus implicit coordinate channels (CoordConv, Liu et al. 2018).

    Takes exactly ``nn.Conv2d``'s arguments, plus keyword-only:

    * ``with_r``: add the radius channel ``sqrt(i**2 + j**2)``;
    * ``coord_kernel_size``: ``None`` (the coordinate channels get the full ``kH x kW`` kernel, as
      with concatenation) or ``1`` (the paper's separate 1x1 coordinate filter, evaluated at the
      centre of every receptive field);
    * ``backend``: 'auto' or a name from :func:`coordconv_fused.available_backends`.

    The coordinate filter is the extra parameter ``coord_weight`` (``[C_out, d, kH, kW]`` or
    ``[C_out, d, 1, 1]``). The coordinate channels are never materialised per sample.
    """

    _ndim = 2
    _base = nn.Conv2d


class CoordConv3d(_CoordConvNd, nn.Conv3d):
    """``nn.Conv3d`` over the input plus implicit coordinate channels along D, H and W (and the
    radius with ``with_r``). See :class:`CoordConv2d`."""

    _ndim = 3
    _base = nn.Conv3d


class _CoordConvTransposeNd(_CoordMixin, _ConvTransposeBase):
    """Transposed CoordConv: appends the coordinates of its *input*; mixed into
    ``nn.ConvTranspose{1,2,3}d``. Only ``padding_mode='zeros'``, as for ``nn.ConvTranspose``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: IntOrTuple = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: IntOrTuple = 1,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        with_r: bool = False,
        backend: str = "auto",
    ) -> None:
        make_spec(
            self._ndim,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            padding_mode,
            with_r,
            transposed=True,
            output_padding=output_padding,
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            output_padding,
            groups,
            bias,
            dilation,
            padding_mode,
            device,
            dtype,
        )
        d = num_coord_channels(self._ndim, with_r)
        self._add_coord_weight(
            (d, out_channels, *self.kernel_size), with_r, backend, {"device": device, "dtype": dtype}
        )

    def _fan_in(self) -> int:
        # nn.ConvTranspose's fan-in (dimension 1 of its weight), which the extra input
        # channels do not change.
        return self.weight.shape[1] * math.prod(self.kernel_size)

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if torch.jit.is_scripting():
            output_padding = self._output_padding(
                input,
                output_size,
                self._script_stride,
                self._script_conv_padding,
                list(self.kernel_size),
                self._script_ndim,
                self._script_dilation,
            )
            return self._scripted_call(input, output_padding, True)
        return self._eager_forward(input, output_size)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        geometry: tuple[Any, ...] = (self.stride, self.padding, self.kernel_size, self._ndim, self.dilation)
        output_padding = self._output_padding(input, output_size, *geometry)
        if not isinstance(input, Tensor):  # a torch.fx.Proxy (symbolic tracing): one call of the function
            return CONV_TRANSPOSE_FUNCTIONS[self._ndim](
                input, self.weight, self.coord_weight, self.bias, self.stride, self.padding, output_padding,
                self.groups, self.dilation, self.with_r, self.backend,
            )  # fmt: skip
        weight, coord_weight, bias = self._forward_tensors()
        return _coord_conv_transpose(
            self._ndim,
            input,
            weight,
            coord_weight,
            bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
            self.with_r,
            self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", with_r={self.with_r}, backend={self.backend!r}"


class CoordConvTranspose1d(_CoordConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with the input's coordinate channel appended."""

    _ndim = 1


class CoordConvTranspose2d(_CoordConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with the input's coordinate channels appended: equals
    ``conv_transpose2d(cat([x, coords]), cat([weight, coord_weight], 0))``. ``coord_weight`` is
    ``[d, C_out, kH, kW]``. Keyword-only ``with_r`` and ``backend`` as for :class:`CoordConv2d`."""

    _ndim = 2


class CoordConvTranspose3d(_CoordConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with the input's coordinate channels appended."""

    _ndim = 3


class AddCoords(nn.Module):
    """Append coordinate channels to a ``[N, C, *sizes]`` (or unbatched ``[C, *sizes]``) input.

    Returns the explicit concatenation ``[x, c0, ..., (r)]`` with ``rank`` coordinate channels (plus
    the radius with ``with_r``), in the library's coordinate convention. Use it to feed coordinates
    to layers that are not convolutions; in front of a convolution, a CoordConv layer gives the same
    result without materialising the channels.
    """

    def __init__(self, rank: int, with_r: bool = False) -> None:
        super().__init__()
        if rank not in (1, 2, 3):
            raise ValueError(f"AddCoords: rank must be 1, 2 or 3, got {rank!r}")
        self.rank = rank
        self.with_r = check_flag(with_r, "with_r")

    def forward(self, input: Tensor) -> Tensor:
        return add_coords(input, self.rank, self.with_r)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, with_r={self.with_r}"
