// The Autograd kernel of coord_conv_ext_term, the coordinate term alone (a compiled CPU graph's term:
// coordconv_fused/backends/native.py). The term is linear in coord_weight and depends on the input
// and the weight by their shapes only, so its one gradient is the coordinate gradient of the
// batch-of-one grad: coord_weight_grad_aten, ATen ops (traceable by AOT autograd, differentiable for
// second order). In C++ so that an inference call costs no Python.
#include <torch/library.h>

#include "coord_conv_autograd.h"

namespace coordconv {
namespace autograd {
namespace {

using TermSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, COORDCONV_CONV_ARGS);

const c10::TypedOperatorHandle<TermSig>& term_op() {
  static const auto op = typed_op<TermSig>("coordconv_fused::coord_conv_ext_term");
  return op;
}

class CoordTermFunction : public torch::autograd::Function<CoordTermFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& coord_weight, COORDCONV_CONV_ARGS) {
    at::Tensor term;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      term = term_op().call(input, weight, coord_weight, stride, padding, dilation, transposed, output_padding, groups,
                            pre_pad, pre_pad_mode, with_r, separate);
    }
    ctx->save_for_backward({input, weight, coord_weight});
    ctx->saved_data["args"] = c10::ivalue::Tuple::create({stride, padding, dilation, transposed, output_padding, groups,
                                                          pre_pad, std::string(pre_pad_mode), with_r, separate});
    return term;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data["args"].toTupleRef().elements();
    const ConvArgs a{d[0].toSymIntVector(), d[1].toSymIntVector(), d[2].toSymIntVector(), d[4].toSymIntVector(),
                     d[6].toSymIntVector(), d[3].toBool(),         d[5].toSymInt(),       d[7].toStringRef(),
                     d[8].toBool(),         d[9].toBool()};
    variable_list out(13);  // (input, weight, coord_weight, then the non-tensor arguments)
    out[2] = with_args(a, [&](auto... args) {
      return coord_weight_grad_aten().call(grads[0], saved[0], saved[1], saved[2], args...);
    });
    return out;
  }
};

at::Tensor coord_term_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                               COORDCONV_CONV_ARGS) {
  if (!at::GradMode::is_enabled() || !coord_weight.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView below;
    return term_op().call(input, weight, coord_weight, stride, padding, dilation, transposed, output_padding, groups,
                          pre_pad, pre_pad_mode, with_r, separate);
  }
  return CoordTermFunction::apply(input, weight, coord_weight, stride, padding, dilation, transposed, output_padding,
                                  groups, pre_pad, pre_pad_mode, with_r, separate);
}

}  // namespace

TORCH_LIBRARY_IMPL(coordconv_fused, Autograd, m) { m.impl("coord_conv_ext_term", &coord_term_autograd); }

}  // namespace autograd
}  // namespace coordconv
