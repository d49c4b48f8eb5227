// The host side of the CUDA backend, written once over a launch policy: CudaLaunch (cuda/) runs
// the kernel bodies of coordconv.h on the GPU; EmulatedLaunch (cpu/cuda_emulation.cpp) runs the
// very same bodies for every (block, thread) of the same grid on the CPU, so the CUDA code is
// tested on machines without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "geometry.h"

namespace coordconv {

constexpr int kThreadsPerBlock = 256;

template <class Launch>
at::Tensor gpu_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r, bool separate) {
  const AutocastOff autocast_off;  // inputs arrive already cast (see functional.py)
  Geometry g = make_geometry(input, weight, bias, stride, padding, dilation, transposed, groups, pre_pad, pre_pad_mode,
                             with_r, separate);
  const at::Tensor cw = coord_weight.contiguous();
  at::Tensor y;
  const bool direct = g.k_data() <= kDirectMaxK;
  if (direct) {
    y = at::empty(output_sizes(g), input.options().memory_format(conv_output_format(input, weight)));
  } else {
    // cuDNN for the data; the coordinate term is added by the epilogue kernel.
    y = at::convolution(input, weight, bias, stride, padding, dilation, false, output_padding, groups);
  }
  if (y.numel() == 0) return y;
  lifted_strides(y, g.ystride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_conv_gpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (direct) {
      const at::Tensor x = input.contiguous(), w = weight.contiguous();
      const scalar_t* b = g.has_bias ? bias->data_ptr<scalar_t>() : nullptr;
      Launch::template direct_forward<scalar_t, acc_t>(g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                       cw.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), y.numel());
    } else {
      Launch::template coord_epilogue<scalar_t, acc_t>(g, cw.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), y.numel());
    }
  });
  return y;
}

template <class Launch>
at::Tensor gpu_coord_weight_grad(const at::Tensor& grad_sum, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& coord_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                                 int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
                                 bool separate) {
  const AutocastOff autocast_off;  // inputs arrive already cast (see functional.py)
  Geometry g = make_geometry(input, weight, c10::nullopt, stride, padding, dilation, transposed, groups, pre_pad,
                             pre_pad_mode, with_r, separate);
  at::Tensor out = at::empty(coord_weight.sizes(), coord_weight.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_weight_grad_gpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor gs = grad_sum.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    Launch::template coord_weight_grad<scalar_t, acc_t>(g, gs.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

}  // namespace coordconv
