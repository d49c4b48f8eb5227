"""The op layer: every CoordConv op's schema (declared once, :mod:`.schema`), fake kernels and
autograd (:mod:`.autograd`), the layer as ATen ops (:mod:`.aten`: the ``torch`` backend, the
exporters' and ``torch.compile``'s graph, the differentiable backward), and the prepared per-call
path of the op-backed backends (:mod:`.call`)."""

from ..geometry import image_sizes, pairs  # noqa: F401  (older import path)
from .arguments import op_arguments, pre_pad, static_arguments
from .autograd import define_coord_conv_op, differentiable_backward, register_native_coord_conv_op
from .call import call_coord_conv_op, prepare_call
from .schema import GRAD_SCHEMA, SCHEMA, define_native_ops

__all__ = [
    "SCHEMA",
    "GRAD_SCHEMA",
    "define_native_ops",
    "define_coord_conv_op",
    "register_native_coord_conv_op",
    "differentiable_backward",
    "call_coord_conv_op",
    "prepare_call",
    "op_arguments",
    "static_arguments",
    "pre_pad",
]
