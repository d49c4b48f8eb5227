"""FLOP formulas of the custom ops, for ``torch.utils.flop_counter.FlopCounterMode``.

A dispatch mode sees a custom op as one call and not the ATen calls inside its kernel, so without a
formula a counter gives a CoordConv layer on the ``cpp``/``cuda``/``triton`` backends zero FLOPs. The
formulas count what the op computes, as PyTorch counts a convolution (multiply-adds times two;
bias and batch sums not counted): the data convolution plus the coordinate term, a convolution of
a *batch of one* (``[1, d, ...]``); in backward, the data convolution's input and weight gradients
as ``aten.convolution_backward`` counts them, and the coordinate filter's gradient from the batch
sum of the output gradient (a batch of one again). The ``torch`` backend's eager calls are ATen ops
and are counted as such: the same totals.

The formulas are registered when ``torch.utils.flop_counter`` is imported, not before: importing it
imports Triton (80 ms here), and logs a warning where a CUDA build of torch has no Triton.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .schema import NAMESPACE

__all__ = ["register_flop_formulas"]

Shape = Sequence[int]


def _conv_flop_count(x: Shape, w: Shape, out: Shape, transposed: bool) -> int:
    from torch.utils.flop_counter import conv_flop_count  # (loaded: the formulas run under its mode)

    return conv_flop_count(list(x), list(w), list(out), transposed)


def _t(shape: Shape) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def _weight_grad(x: Shape, grad: Shape, w: Shape, transposed: bool) -> int:
    # (aten.convolution_backward's own formula: the weight gradient as a convolution)
    if transposed:
        return _conv_flop_count(_t(grad), _t(x), _t(w), False)
    return _conv_flop_count(_t(x), _t(grad), _t(w), False)


def _coords(input: Shape, coord_weight: Shape, transposed: bool) -> list[int]:
    """The coordinate batch of one the coordinate filter is applied to (for a separate filter its
    spatial size is the output's, which ``conv_flop_count`` takes from the output shape)."""
    return [1, coord_weight[0] if transposed else coord_weight[1], *input[2:]]


def forward_flops(input, weight, coord_weight, bias, stride, padding, dilation, transposed, *args, out_shape, **kw):
    term_out = [1, *out_shape[1:]]
    coords = _coords(input, coord_weight, transposed)
    return _conv_flop_count(input, weight, out_shape, transposed) + _conv_flop_count(
        coords, coord_weight, term_out, transposed
    )


def coord_weight_grad_flops(grad_sum, input, weight, coord_weight, stride, padding, dilation, transposed, *a, **kw):
    return _weight_grad(_coords(input, coord_weight, transposed), grad_sum, coord_weight, transposed)


def input_grad_flops(grad, input, weight, stride, padding, dilation, transposed, *args, **kwargs):
    return _conv_flop_count(grad, weight, input, not transposed)


def backward_flops(grad, input, weight, coord_weight, stride, padding, dilation, transposed, *args, **kwargs):
    need_input, need_weight, need_coord_weight, _ = args[-1]  # output_mask, the schema's last argument
    flops = _conv_flop_count(grad, weight, input, not transposed) if need_input else 0
    if need_weight:
        flops += _weight_grad(input, grad, weight, transposed)
    if need_coord_weight:
        flops += _weight_grad(_coords(input, coord_weight, transposed), [1, *grad[1:]], coord_weight, transposed)
    return flops


_FORMULAS: dict[str, Callable[..., int]] = {
    "": forward_flops,
    "_coord_weight_grad": coord_weight_grad_flops,
    "_input_grad": input_grad_flops,
    "_backward": backward_flops,
}


_PENDING: list[tuple[str, tuple[str, ...]]] = []


def register_flop_formulas(name: str, suffixes: Sequence[str] = ("", "_coord_weight_grad")) -> None:
    """Register the formulas of ``coordconv_fused::<name><suffix>`` for each suffix (``""`` the
    forward, ``"_coord_weight_grad"``, ``"_input_grad"``, ``"_backward"``): now if
    ``torch.utils.flop_counter`` is loaded, else as soon as it is."""
    _PENDING.append((name, tuple(suffixes)))
    if "torch.utils.flop_counter" in sys.modules:
        _register_pending()
    elif not any(isinstance(f, _AfterFlopCounterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterFlopCounterImport())


def _register_pending() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    while _PENDING:
        name, suffixes = _PENDING.pop()
        for suffix in suffixes:
            packet = getattr(getattr(torch.ops, NAMESPACE), name + suffix)
            if packet not in flop_registry:
                formula: Any = _FORMULAS[suffix]  # (typed by torch as a ParamSpec-preserving decorator)
                register_flop_formula(packet)(formula)


class _AfterFlopCounterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_pending` right after ``torch.utils.flop_counter`` is executed (a post-import
    hook: the module is found as usual, its loader's ``exec_module`` is followed by the registration)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.utils.flop_counter":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader: Any = spec.loader if spec is not None else None
        if loader is not None and hasattr(loader, "exec_module"):
            execute = loader.exec_module

            def exec_module(module) -> None:
                execute(module)
                _register_pending()

            loader.exec_module = exec_module
        return spec
