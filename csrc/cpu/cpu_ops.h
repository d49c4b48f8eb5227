// The CPU kernels of the coord_conv_ext ops (schemas: coordconv_fused/ops/schema.py), one file per
// concern: forward.cpp, input_grad.cpp, backward.cpp (the caches: coord_term.cpp); registered in register.cpp.
#pragma once

#include <ATen/ATen.h>

#include "../geometry.h"
#include "coord_term.h"
#include "direct_simd.h"
#include "kernel_choice.h"

#include <array>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

namespace coordconv {

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r, bool separate);

at::Tensor input_grad_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                          at::IntArrayRef output_padding, int64_t groups);

// The input gradient's implementation for this layer (ATen's convolution_backward or the SIMD direct
// kernel, measured the first time the layer is seen: kernel_choice.h), and the gradient by `impl`.
Impl input_grad_impl(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                     int64_t groups);
// The same choice where the weight gradient is wanted too, timed as the whole of what each candidate
// then runs: nn.Conv2d's convolution_backward call (input, weight and, with need_b, bias gradients), or
// the SIMD kernel's input gradient and ATen's weight gradient (op "backward").
Impl backward_impl(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                   int64_t groups, bool need_b);
at::Tensor input_grad_by(Impl impl, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                         at::IntArrayRef output_padding, int64_t groups);

at::Tensor coord_weight_grad_cpu(const at::Tensor& grad_sum, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& coord_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                                 int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
                                 bool separate);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
    bool separate, std::array<bool, 4> output_mask);

// y = the output of the SIMD direct kernel `impl` (forward.cpp; is_simd(impl)) for float32 input x,
// weight [C_out, C_in, (kh,) kw], the coordinate term (or null: none) and bias (or undefined).
void run_direct_simd(Impl impl, const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                     const CoordTerm* coord, const at::Tensor& bias, at::Tensor& y);

// COORDCONV_NO_AVX512 set: the AVX-512 kernels are not used, the AVX2 ones are where the CPU has
// them (what an AVX2-only CPU runs; for A/B measurements and bisecting: read on every call that
// would take them, so a benchmark can alternate).
inline bool avx512_disabled() { return std::getenv("COORDCONV_NO_AVX512") != nullptr; }

// The widest instruction set the SIMD direct kernel runs in here, if any.
inline std::optional<Isa> direct_isa() {
  if (isa_supported(Isa::kAvx512) && !avx512_disabled()) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return std::nullopt;
}

// The SIMD direct kernel in `isa` (its first tile shape) as an implementation of kernel_choice.h; which
// implementations are SIMD kernels, and their ISA and channels per tile.
inline Impl simd_impl(Isa isa) { return isa == Isa::kAvx512 ? Impl::kAvx512Direct : Impl::kAvx2Direct; }
// ...and its 3-channel tile (convolutions of at most kOcBlockNarrow output channels).
inline Impl narrow_impl(Isa isa) { return isa == Isa::kAvx512 ? Impl::kAvx512Direct3x6 : Impl::kAvx2Direct3x4; }
inline bool is_simd(Impl impl) {
  return impl == Impl::kAvx512Direct || impl == Impl::kAvx512Direct6x4 || impl == Impl::kAvx512Direct3x6 ||
         impl == Impl::kAvx2Direct || impl == Impl::kAvx2Direct3x4;
}
inline Isa isa_of(Impl impl) {
  return impl == Impl::kAvx2Direct || impl == Impl::kAvx2Direct3x4 ? Isa::kAvx2 : Isa::kAvx512;
}
inline int64_t oc_block_of(Impl impl) {
  return impl == Impl::kAvx512Direct6x4                                   ? kOcBlockWide
         : impl == Impl::kAvx512Direct3x6 || impl == Impl::kAvx2Direct3x4 ? kOcBlockNarrow
                                                                          : kOcBlock;
}
// The SIMD direct kernels to measure for a convolution of `c_out` output channels in `isa`: the
// first tile shape, in AVX-512 the 6-channel one where C_out fills more than one 4-channel tile, and
// in either ISA the 3-channel one where C_out is at most 3.
inline std::vector<Impl> simd_candidates(Isa isa, int64_t c_out) {
  std::vector<Impl> impls{simd_impl(isa)};
  if (isa == Isa::kAvx512 && c_out > kOcBlock) impls.push_back(Impl::kAvx512Direct6x4);
  if (c_out <= kOcBlockNarrow) impls.push_back(narrow_impl(isa));
  return impls;
}

}  // namespace coordconv
