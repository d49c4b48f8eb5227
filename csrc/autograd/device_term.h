// The `torch` backend's device path (csrc/prepared_call.cpp, coordconv_fused/ops/aten.py): the
// coordinate term plus the bias, made by one small GEMM of the coordinate filter with the signature's
// im2col matrix and added to the data convolution's output in place, as one autograd node.
//
// Recorded as ATen ops the term costs five nodes (the filter's and the bias's views, the GEMM, the
// term's view, the add) and, in backward, three reductions or products (the add's batch sum, the
// GEMM's filter gradient, its bias gradient). This node's backward reduces the output gradient over
// the batch once and makes both gradients from that sum (one matrix product, one row sum); while
// autograd records a graph of the gradients (create_graph=True) those are differentiable ATen ops,
// so second order stays exact.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../batch_sum.h"

namespace coordconv {
namespace autograd {

// How the term meets the output and the coordinate filter.
struct TermLayout {
  bool columns_last = false;  // columns [points, k], term [points, C_out]: a channels-last output
  bool transposed = false;    // coord_weight [d, C_out, *taps] (a transposed layer's)
  bool filter_last = false;   // a channels-last coord_weight: k in its memory order (*taps, d)
};

// The dims of an N-D tensor with the channels last: (0, 2, ..., N-1, 1).
inline std::vector<int64_t> channels_to_last(int64_t ndim) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < ndim; ++d) order.push_back(d);
  order.push_back(1);
  return order;
}

// The coordinate filter as a [C_out, k] matrix (views; ops/aten.py's _filter_matrix).
inline at::Tensor filter_matrix(const at::Tensor& coord_weight, const TermLayout& l) {
  if (l.filter_last)
    return coord_weight.permute(channels_to_last(coord_weight.dim())).reshape({coord_weight.size(0), -1});
  const at::Tensor cw = l.transposed ? coord_weight.movedim(1, 0) : coord_weight;
  return cw.reshape({cw.size(0), -1});
}

// The inverse of filter_matrix: a [C_out, k] matrix as a tensor of coord_weight's sizes (and, for a
// channels-last filter, its strides).
inline at::Tensor filter_of_matrix(const at::Tensor& m, at::IntArrayRef sizes, const TermLayout& l) {
  if (l.filter_last) {
    std::vector<int64_t> last{sizes[0]};  // sizes with the channels last
    for (size_t d = 2; d < sizes.size(); ++d) last.push_back(sizes[d]);
    last.push_back(sizes[1]);
    std::vector<int64_t> inverse{0, static_cast<int64_t>(sizes.size()) - 1};
    for (int64_t d = 1; d + 1 < static_cast<int64_t>(sizes.size()); ++d) inverse.push_back(d);
    return m.reshape(last).permute(inverse);
  }
  if (!l.transposed) return m.reshape(sizes);
  std::vector<int64_t> moved(sizes.begin(), sizes.end());
  std::swap(moved[0], moved[1]);
  return m.reshape(moved).movedim(0, 1);
}

// P plus the bias, one sample of the output in memory order: [C_out, points], or [points, C_out]
// where `columns_last`.
inline at::Tensor term_matrix(const at::Tensor& columns, const at::Tensor& coord_weight,
                              const std::optional<at::Tensor>& bias, const TermLayout& l) {
  const at::Tensor cw = filter_matrix(coord_weight, l);
  if (l.columns_last) return at::linear(columns, cw, bias);
  if (!bias) return at::mm(cw, columns);
  return at::addmm(bias->view({-1, 1}), cw, columns);
}

// out += term (term_matrix's), in place; a channels-last output seen as [N, points, C_out] (a
// contiguous view) so that the add reads both tensors in memory order.
inline void add_term_(const at::Tensor& out, const at::Tensor& term, bool columns_last) {
  if (!columns_last) {
    out.add_(term.view(out.sizes().slice(1)));
    return;
  }
  const int64_t n = out.size(0), c = out.size(1);
  if (n == 0) return;
  out.permute(channels_to_last(out.dim())).view({n, -1, c}).add_(term);
}

// output = out + P + bias, `out` updated in place (the data convolution's output, no other use).
class DeviceTermFunction : public torch::autograd::Function<DeviceTermFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor out, const at::Tensor& coord_weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& columns, TermLayout l) {
    {
      at::AutoDispatchBelowADInplaceOrView below;
      add_term_(out, term_matrix(columns, coord_weight, bias, l), l.columns_last);
    }
    ctx->mark_dirty({out});
    ctx->save_for_backward({columns});
    // (one entry: each saved_data entry costs a string key and a hash-map insertion)
    std::vector<int64_t> kept{l.columns_last, l.transposed, l.filter_last, bias.has_value() && bias->defined()};
    kept.insert(kept.end(), coord_weight.sizes().begin(), coord_weight.sizes().end());
    ctx->saved_data["layout"] = kept;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& grad = grads[0];
    const std::vector<int64_t> kept = ctx->saved_data["layout"].toIntVector();
    const TermLayout l{kept[0] != 0, kept[1] != 0, kept[2] != 0};
    const bool need_cw = ctx->needs_input_grad(1), need_b = kept[3] != 0 && ctx->needs_input_grad(2);
    at::Tensor grad_cw, grad_b;
    if (need_cw || need_b) {
      const at::Tensor columns = ctx->get_saved_variables()[0];
      // The term is the same for every sample: its gradients need only the batch sum of grad, seen
      // as one sample in the term's layout ([C_out, points] or [points, C_out]).
      const int64_t c = grad.size(1);
      const at::Tensor sum = sum_over_batch(grad, grad.scalar_type());
      at::Tensor g = l.columns_last ? sum.movedim(1, -1).reshape({-1, c}) : sum.reshape({c, -1});
      // (under autocast the output, so grad, may be in a lower precision than the columns)
      if (g.scalar_type() != columns.scalar_type()) g = g.to(columns.scalar_type());
      if (need_cw) {
        const at::Tensor m = l.columns_last ? at::mm(g.t(), columns) : at::mm(g, columns.t());
        grad_cw = filter_of_matrix(m, at::IntArrayRef(kept).slice(4), l);
      }
      if (need_b) grad_b = g.sum(l.columns_last ? 0 : 1);
    }
    return {ctx->needs_input_grad(0) ? grad : at::Tensor(), grad_cw, grad_b, at::Tensor(), at::Tensor()};
  }
};

// out + P + bias for the device path: one node where a gradient can flow, otherwise the same kernels
// with nothing recorded.
inline at::Tensor add_device_term(at::Tensor out, const at::Tensor& coord_weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& columns, const TermLayout& l) {
  const bool record = at::GradMode::is_enabled() && (out.requires_grad() || coord_weight.requires_grad() ||
                                                     (bias.has_value() && bias->requires_grad()));
  if (record) return DeviceTermFunction::apply(std::move(out), coord_weight, bias, columns, l);
  add_term_(out, term_matrix(columns, coord_weight, bias, l), l.columns_last);
  return out;
}

}  // namespace autograd
}  // namespace coordconv
