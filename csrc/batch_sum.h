// The batch sum of an output gradient, grad.sum(0, keepdim=true): what the coordinate gradient (and
// the bias gradient) reduce first, the coordinate term being the same for every sample. Used by the
// ops' autograd (csrc/autograd/) and the CPU backward (csrc/cpu/backward.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace coordconv {

// grad.sum(0, keepdim=true, dtype), for a channels-last grad reduced over the samples' contiguous
// blocks of memory (a [N, M] view): ATen's reduction of a channels-last tensor over its batch dim is
// up to 20x slower (coordconv_fused/ops/aten.py, batch_sum, has the measurement).
inline at::Tensor sum_over_batch(const at::Tensor& grad, at::ScalarType dtype) {
  std::vector<int64_t> order;
  if (grad.sym_numel() == 0) {
    return grad.sum(0, /*keepdim=*/true, dtype);
  } else if (grad.dim() == 4 && !grad.is_contiguous() && grad.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    order = {0, 2, 3, 1};
  } else if (grad.dim() == 5 && !grad.is_contiguous() && grad.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    order = {0, 2, 3, 4, 1};
  } else {
    return grad.sum(0, /*keepdim=*/true, dtype);
  }
  std::vector<c10::SymInt> sample{1};
  std::vector<int64_t> inverse(order.size());
  for (size_t i = 0; i < order.size(); ++i) {
    if (i > 0) sample.push_back(grad.sym_size(order[i]));
    inverse[order[i]] = static_cast<int64_t>(i);
  }
  const at::Tensor flat = grad.permute(order).reshape_symint({grad.sym_size(0), -1}).sum(0, false, dtype);
  return flat.view_symint(sample).permute(inverse);
}

}  // namespace coordconv
