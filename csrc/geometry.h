// Host-side: the op's arguments -> coordconv::Geometry, argument checks, dtype dispatch helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/ArrayRef.h>

#include "coordconv.h"

namespace coordconv {

// Inside the ops, ATen calls must not be re-cast by autocast (the Python side casts the inputs
// like a convolution before calling the op).
struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline int32_t pad_mode_code(c10::string_view mode) {
  if (mode == "zeros") return kZeros;
  if (mode == "reflect") return kReflect;
  if (mode == "replicate") return kReplicate;
  if (mode == "circular") return kCircular;
  TORCH_CHECK(false, "coordconv_fused: unknown pre_pad_mode '", std::string(mode), "'");
}

// Lift the op's per-axis arguments (rank 1..3) to the 3 axes (D, H, W) of Geometry.
inline Geometry make_geometry(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              bool transposed, int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode,
                              bool with_r, bool separate) {
  TORCH_CHECK(!transposed, "coordconv_fused: the C++/CUDA kernels do not implement transposed CoordConv");
  const int64_t nd = input.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3, "coordconv_fused: expected a 3-D, 4-D or 5-D input, got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == input.dim() && stride.size() == (size_t)nd && padding.size() == (size_t)nd &&
                  dilation.size() == (size_t)nd && pre_pad.size() == (size_t)(2 * nd),
              "coordconv_fused: inconsistent argument ranks");
  Geometry g{};
  g.n = input.size(0);
  g.c_in = input.size(1);
  g.c_out = weight.size(0);
  g.groups = groups;
  g.ndim = static_cast<int32_t>(nd);
  g.with_r = with_r;
  g.separate = separate;
  g.num_coords = static_cast<int32_t>(nd + (with_r ? 1 : 0));
  g.pad_mode = pad_mode_code(pre_pad_mode);
  g.has_bias = bias.has_value() && bias->defined();
  for (int ax = 0; ax < 3; ++ax) {
    const int64_t k = ax - (3 - nd);  // index into the op's per-axis lists, < 0 for lifted axes
    const bool real = k >= 0;
    g.padded[ax] = real ? input.size(2 + k) : 1;
    g.before[ax] = real ? pre_pad[2 * k] : 0;
    g.image[ax] = real ? input.size(2 + k) - pre_pad[2 * k] - pre_pad[2 * k + 1] : 1;
    g.stride[ax] = real ? stride[k] : 1;
    g.pad[ax] = real ? padding[k] : 0;
    g.dil[ax] = real ? dilation[k] : 1;
    g.kernel[ax] = real ? weight.size(2 + k) : 1;
    g.out[ax] = (g.padded[ax] + 2 * g.pad[ax] - g.dil[ax] * (g.kernel[ax] - 1) - 1) / g.stride[ax] + 1;
  }
  g.cw_cstride = separate ? 1 : g.taps();  // a contiguous coord_weight (see coord_weight_in_layout)
  g.cw_tstride = 1;
  return g;
}

// coord_weight as the epilogue reads it, for a g fresh from make_geometry (its strides those of a
// contiguous filter): a channels-last parameter (a module converted with
// .to(memory_format=torch.channels_last)) as it is, with g's strides set to its layout; any other
// contiguous (a copy only where it is not).
inline at::Tensor coord_weight_in_layout(const at::Tensor& cw, Geometry& g) {
  const bool last = (cw.dim() == 4 && cw.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                    (cw.dim() == 5 && cw.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (!last || cw.is_contiguous()) return cw.contiguous();
  g.cw_cstride = 1;
  g.cw_tstride = cw.size(1);
  return cw;
}

inline std::vector<int64_t> output_sizes(const Geometry& g) {
  std::vector<int64_t> s{g.n, g.c_out};
  for (int ax = 3 - g.ndim; ax < 3; ++ax) s.push_back(g.out[ax]);
  return s;
}

// The memory format ATen's convolution gives its output (what the op's fake kernel reports).
inline at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight) {
  for (const auto& t : {input, weight}) {
    auto f = t.suggest_memory_format();
    if (f == at::MemoryFormat::ChannelsLast || f == at::MemoryFormat::ChannelsLast3d) return f;
  }
  return at::MemoryFormat::Contiguous;
}

// at::parallel_for's grain for items of `cost` elementary operations each: a range of less than
// about at::internal::GRAIN_SIZE operations runs on the calling thread, since waking the pool costs
// more than a tiny layer's whole arithmetic.
inline int64_t grain_for(int64_t cost) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, cost));
}
// The CPU's direct kernels (data + coordinates + bias in one pass) are used when the data GEMM's
// depth C_in/groups * taps is at most this: depth 1, where the row kernel beats oneDNN plus the
// coordinate epilogue (docs/tuning.md).
constexpr int64_t kCpuDirectMaxK = 1;

}  // namespace coordconv
