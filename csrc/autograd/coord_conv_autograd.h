// Autograd of the CoordConv ops implemented in C++ (torchvision's pattern): an Autograd-key kernel
// per forward op, whose backward calls ops of their own through the dispatcher, so that it is as
// cheap as a built-in op in eager mode and traceable by AOT autograd.
//
//   forward   <Op::forward>                     (CPU/CUDA kernels, fake kernel in Python)
//   backward  <Op::forward>_backward            all four gradients in one call (where the op has
//                                               it: Op::fused_backward, CPU tensors), else
//             aten::convolution_backward        input, weight (and bias) gradients, and
//             <Op::forward>_coord_weight_grad   the coordinate gradient from grad.sum(0)
//   backward while autograd records a graph of the gradients (create_graph=True):
//             aten::convolution_backward + coordconv_fused::coord_weight_grad_aten (the ATen
//             decomposition, registered in Python): differentiable, so second-order gradients
//             are exact. The fused kernels are first-order only.
//
// Schemas: coordconv_fused/ops/schema.py. The signatures below use SymInt so that the same code
// runs under fake tensors with symbolic shapes; the CPU/CUDA kernels take plain ints.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../batch_sum.h"

namespace coordconv {
namespace autograd {

using c10::SymInt;
using c10::SymIntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op's arguments after the tensors (the schema's `_CONV_ARGS` tail).
#define COORDCONV_CONV_ARGS                                                                                \
  SymIntArrayRef stride, SymIntArrayRef padding, SymIntArrayRef dilation, bool transposed,                 \
      SymIntArrayRef output_padding, SymInt groups, SymIntArrayRef pre_pad, c10::string_view pre_pad_mode, \
      bool with_r, bool separate

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              COORDCONV_CONV_ARGS);
using CoordGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                COORDCONV_CONV_ARGS);
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardSig = Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          COORDCONV_CONV_ARGS, std::array<bool, 4>);

// The non-tensor arguments, kept by the forward for the backward.
struct ConvArgs {
  std::vector<SymInt> stride, padding, dilation, output_padding, pre_pad;
  bool transposed = false;
  SymInt groups{1};
  std::string pre_pad_mode;
  bool with_r = false, separate = false;
};

// Calls `fn(<the arguments as the schema orders them>)`.
template <typename Fn>
decltype(auto) with_args(const ConvArgs& a, Fn&& fn) {
  return fn(SymIntArrayRef(a.stride), SymIntArrayRef(a.padding), SymIntArrayRef(a.dilation), a.transposed,
            SymIntArrayRef(a.output_padding), a.groups, SymIntArrayRef(a.pre_pad), c10::string_view(a.pre_pad_mode),
            a.with_r, a.separate);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Sig>();
}

// The differentiable coordinate gradient (ATen ops, implemented in coordconv_fused/ops/autograd.py).
inline const c10::TypedOperatorHandle<CoordGradSig>& coord_weight_grad_aten() {
  static const auto op = typed_op<CoordGradSig>("coordconv_fused::coord_weight_grad_aten");
  return op;
}

// Op: a traits type with `static constexpr const char* name` (the forward op, qualified) and
// `static constexpr bool fused_backward` (whether `<name>_backward` has a CPU kernel).
template <class Op>
struct Ops {
  static const c10::TypedOperatorHandle<ForwardSig>& forward() {
    static const auto op = typed_op<ForwardSig>(Op::name);
    return op;
  }
  static const c10::TypedOperatorHandle<CoordGradSig>& coord_weight_grad() {
    static const auto op = typed_op<CoordGradSig>(std::string(Op::name) + "_coord_weight_grad");
    return op;
  }
  static const c10::TypedOperatorHandle<BackwardSig>& fused_backward() {
    static const auto op = typed_op<BackwardSig>(std::string(Op::name) + "_backward");
    return op;
  }
};

// The gradients of (input, weight, coord_weight, bias) where `mask` asks (undefined elsewhere).
template <class Op>
Grads backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
               const at::Tensor& coord_weight, const ConvArgs& a, std::array<bool, 4> mask) {
  const bool record = at::GradMode::is_enabled();  // a graph of the gradients is being recorded
  if constexpr (Op::fused_backward) {
    if (!record && grad.device().is_cpu()) {
      at::AutoDispatchBelowADInplaceOrView below;  // no graph to record: skip the autograd fallback
      return with_args(a, [&](auto... args) {
        return Ops<Op>::fused_backward().call(grad, input, weight, coord_weight, args..., mask);
      });
    }
  }
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;  // (no graph to record: plain kernel calls)
  if (!record) below.emplace();
  const auto [need_in, need_w, need_cw, need_b] = mask;
  at::Tensor grad_in, grad_w, grad_cw, grad_b, grad_sum;
  if (need_cw) {
    // The coordinate term is the same for every sample: only the batch sum of grad matters
    // (accumulated in float32 for half types). The bias gradient is its sum over the points, so
    // convolution_backward need not read grad once more for it.
    const bool half = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
    const auto acc = half ? at::kFloat : grad.scalar_type();
    grad_sum = grad.sym_size(0) == 1 && !half ? grad : sum_over_batch(grad, acc);
  }
  const bool bias_in_conv = need_b && !grad_sum.defined();
  if (need_in || need_w || bias_in_conv) {
    const SymInt c_out = a.transposed ? weight.sym_size(1) * a.groups : weight.sym_size(0);
    const std::vector<SymInt> bias_sizes{c_out};
    std::tie(grad_in, grad_w, grad_b) = at::convolution_backward_symint(
        grad, input, weight, bias_in_conv ? at::OptionalSymIntArrayRef(bias_sizes) : std::nullopt, a.stride, a.padding,
        a.dilation, a.transposed, a.output_padding, a.groups, {need_in, need_w, bias_in_conv});
  }
  if (grad_sum.defined()) {
    if (need_b) {
      std::vector<int64_t> dims{0};
      for (int64_t d = 2; d < grad_sum.dim(); ++d) dims.push_back(d);
      grad_b = grad_sum.sum(dims).to(grad.scalar_type());
    }
    // (the kernels' op takes the sum as accumulated, in float32 for half types: no rounding to the
    // gradient's dtype and back; the ATen graph takes it in that dtype, like its other arguments)
    const at::Tensor gs = record ? grad_sum.to(grad.scalar_type()) : grad_sum;
    const auto& op = record ? coord_weight_grad_aten() : Ops<Op>::coord_weight_grad();
    grad_cw = with_args(a, [&](auto... args) { return op.call(gs, input, weight, coord_weight, args...); });
  }
  return {grad_in, grad_w, grad_cw, grad_b};
}

template <class Op>
class CoordConvFunction : public torch::autograd::Function<CoordConvFunction<Op>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& coord_weight, const std::optional<at::Tensor>& bias,
                            COORDCONV_CONV_ARGS) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      output = Ops<Op>::forward().call(input, weight, coord_weight, bias, stride, padding, dilation, transposed,
                                       output_padding, groups, pre_pad, pre_pad_mode, with_r, separate);
    }
    ctx->save_for_backward({input, weight, coord_weight});
    // (one tuple: each saved_data entry costs a string key and a hash-map insertion)
    ctx->saved_data["args"] =
        c10::ivalue::Tuple::create({bias.has_value() && bias->defined(), stride, padding, dilation, transposed,
                                    output_padding, groups, pre_pad, std::string(pre_pad_mode), with_r, separate});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data["args"].toTupleRef().elements();
    const bool has_bias = d[0].toBool();
    const ConvArgs a{d[1].toSymIntVector(), d[2].toSymIntVector(), d[3].toSymIntVector(), d[5].toSymIntVector(),
                     d[7].toSymIntVector(), d[4].toBool(),         d[6].toSymInt(),       d[8].toStringRef(),
                     d[9].toBool(),         d[10].toBool()};
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   has_bias && ctx->needs_input_grad(3)};
    auto [grad_in, grad_w, grad_cw, grad_b] =
        coordconv::autograd::backward<Op>(grads[0], saved[0], saved[1], saved[2], a, mask);
    variable_list out{grad_in, grad_w, grad_cw, grad_b};
    out.resize(14);  // no gradients for the non-tensor arguments
    return out;
  }
};

// Whether t carries a forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp; level 0, the
// only level forward AD uses below functorch).
inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

// The Autograd-key kernel of Op: records the node only when a gradient can flow (otherwise a plain
// call below autograd, no node allocated). Refuses forward-mode AD, which it has no rule for: the
// call below autograd would drop the tangent without a word. (The layers and the functional API
// never get here under forward AD: they run ATen ops there, functional.py.)
template <class Op>
at::Tensor coord_conv_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                               const std::optional<at::Tensor>& bias, COORDCONV_CONV_ARGS) {
  TORCH_CHECK(!(has_tangent(input) || has_tangent(weight) || has_tangent(coord_weight) ||
                (bias.has_value() && has_tangent(*bias))),
              Op::name,
              " has no forward derivative (forward-mode AD, torch.func.jvp): call the CoordConv layer or "
              "coordconv_fused.coord_conv*d, which run as ATen ops under forward AD");
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() ||
      !(input.requires_grad() || weight.requires_grad() || coord_weight.requires_grad() || bias_grad)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return Ops<Op>::forward().call(input, weight, coord_weight, bias, stride, padding, dilation, transposed,
                                   output_padding, groups, pre_pad, pre_pad_mode, with_r, separate);
  }
  return CoordConvFunction<Op>::apply(input, weight, coord_weight, bias, stride, padding, dilation, transposed,
                                      output_padding, groups, pre_pad, pre_pad_mode, with_r, separate);
}

}  // namespace autograd
}  // namespace coordconv
