// The host side of the CUDA backend, written once over a launch policy: CudaLaunch (cuda/) runs
// the kernel bodies of coordconv.h on the GPU; EmulatedLaunch (cpu/cuda_emulation.cpp) runs the
// very same bodies for every (block, thread) of the same grid on the CPU, so the CUDA code is
// tested on machines without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <optional>

#include "geometry.h"

namespace coordconv {

constexpr int kThreadsPerBlock = 256;

// The coordinate im2col matrix [k_coord, points] of the call, in acc_t (the coordinates rounded to
// scalar_t as concatenated channels would be): one launch, independent of the batch.
template <class Launch, typename scalar_t, typename acc_t>
at::Tensor coord_cols(const Geometry& g, const at::Tensor& like) {
  at::Tensor cols =
      at::empty({g.k_coord(), g.out_points()}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (cols.numel() > 0) Launch::template coord_cols<scalar_t, acc_t>(g, cols.data_ptr<acc_t>(), cols.numel());
  return cols;
}

// cuBLAS takes 32-bit sizes and leading dimensions: past this many points the coordinate GEMMs run
// over contiguous copies of chunks of the points.
constexpr int64_t kMaxGemmPoints = int64_t(1) << 30;

// Columns [s, s + len) of a [rows, points] matrix, as a matrix cuBLAS can take.
inline at::Tensor point_chunk(const at::Tensor& m, int64_t s, int64_t len) {
  return m.size(1) <= kMaxGemmPoints ? m : m.narrow(1, s, len).contiguous();
}

// The coordinate term [C_out, points] = cw [C_out, k_coord] x cols [k_coord, points] (+ bias).
inline at::Tensor term_gemm(const at::Tensor& cw, const at::Tensor& cols, const at::Tensor& bias_column) {
  const int64_t points = cols.size(1);
  if (points <= kMaxGemmPoints) return bias_column.defined() ? at::addmm(bias_column, cw, cols) : at::mm(cw, cols);
  at::Tensor term = at::empty({cw.size(0), points}, cols.options());
  for (int64_t s = 0; s < points; s += kMaxGemmPoints) {
    const int64_t len = std::min(kMaxGemmPoints, points - s);
    const at::Tensor part = point_chunk(cols, s, len);
    term.narrow(1, s, len).copy_(bias_column.defined() ? at::addmm(bias_column, cw, part) : at::mm(cw, part));
  }
  return term;
}

// The coordinate filter's gradient [C_out, k_coord] = gs [C_out, points] x cols^T.
inline at::Tensor coord_grad_gemm(const at::Tensor& gs, const at::Tensor& cols) {
  const int64_t points = cols.size(1);
  if (points <= kMaxGemmPoints) return at::mm(gs, cols.t());
  at::Tensor out = at::zeros({gs.size(0), cols.size(0)}, gs.options());
  for (int64_t s = 0; s < points; s += kMaxGemmPoints) {
    const int64_t len = std::min(kMaxGemmPoints, points - s);
    out.addmm_(point_chunk(gs, s, len), point_chunk(cols, s, len).t());
  }
  return out;
}

// How gpu_forward runs its epilogue: one kernel with 16-byte accesses by its rule (the default),
// wherever the output allows them, or nowhere; or split in two kernels, one sample's terms computed
// once into a buffer, then added over the batch. A process-wide switch for timing them side by side
// (coordconv_fused.backends.native.cuda_epilogue_policy); results are the same bits under each.
enum EpiloguePolicy : int { kRule = 0, kVectors = 1, kScalars = 2, kSplit = 3 };
inline std::atomic<int>& epilogue_policy() {
  static std::atomic<int> policy{kRule};
  return policy;
}

// Whether the epilogue evaluates this layer's coordinates itself (coord_epilogue_body): every filter
// extent at most kMaxAxisTaps.
inline bool coords_in_kernel(const Geometry& g) {
  return g.separate || (g.kernel[0] <= kMaxAxisTaps && g.kernel[1] <= kMaxAxisTaps && g.kernel[2] <= kMaxAxisTaps);
}

// The layouts the epilogue indexes: batch outermost and dense, NCHW (false) or channels-last (true);
// nullopt for any other (no convolution gives one; a fallback handles it).
inline std::optional<bool> epilogue_layout(const at::Tensor& y) {
  if (!y.is_non_overlapping_and_dense() || y.stride(0) != y.numel() / y.size(0)) return std::nullopt;
  if (y.is_contiguous()) return false;
  if (y.dim() == 4 && y.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  if (y.dim() == 5 && y.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return true;
  return std::nullopt;
}

// The forward: cuDNN's convolution of the data, without the bias (cuDNN would add a bias in a pass
// of its own), then one in-place pass adding the coordinate term plus the bias, its coordinates
// evaluated in the kernel (coord_epilogue_body): two launches per call, like nn.Conv2d's convolution
// and bias. Each thread computes the terms of one element of a sample (of a 16-byte run of channels
// in channels-last where a sample's runs are many: see the rule below) and adds them to that offset
// of several samples, so that the terms' cost is shared by the batch while the grid keeps about
// Launch::target_threads() threads. Filters beyond kMaxAxisTaps along an axis (and, defensively,
// an output in another layout) take the GEMM path: the term [C_out, points] = coord_weight x the
// coordinate im2col matrix by a small GEMM, added by a pass reading it in the output's memory order.
template <class Launch>
at::Tensor gpu_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r, bool separate) {
  const AutocastOff autocast_off;  // inputs arrive already cast (see functional.py)
  Geometry g = make_geometry(input, weight, bias, stride, padding, dilation, transposed, groups, pre_pad, pre_pad_mode,
                             with_r, separate);
  at::Tensor y = at::convolution(input, weight, c10::nullopt, stride, padding, dilation, false, output_padding, groups);
  if (y.numel() == 0) return y;
  const auto layout = epilogue_layout(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_conv_gpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t sample = y.numel() / y.size(0);
    if (layout.has_value() && coords_in_kernel(g)) {
      const at::Tensor cw = coord_weight_in_layout(coord_weight.to(input.scalar_type()), g);
      const at::Tensor b = g.has_bias ? bias->to(input.scalar_type()).contiguous() : at::Tensor();
      // 16-byte accesses (kVec elements per thread) by rule only in channels-last, where a thread's
      // kVec elements are kVec channels of one point whose coordinates it evaluates once, and only
      // where one sample's vectors give at least a quarter of target_threads() threads, so that each
      // term is computed for few groups of samples. Measured on an H200 (docs/bench-cuda.md, run 8),
      // the forward against one element per thread: bf16 channels-last 0.69x (high-resolution layer),
      // 0.87x (stem), 0.79x (input layer), 0.99x (mid layer, 25K vectors per sample), 1.23x (deep
      // layer, 6K); float32 NCHW (no coordinates shared) 1.04-1.47x, never faster. Every sample must
      // start on a 16-byte boundary (cuDNN's do).
      constexpr int kVec = kEpilogueVecOf<scalar_t>;
      const int policy = epilogue_policy().load(std::memory_order_relaxed);
      const bool vec_ok = sample % kVec == 0 && reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0;
      const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      if (policy == kSplit) {  // one sample's terms, each computed once; then a pass over the batch
        const at::Tensor term = at::empty({sample}, y.options().dtype(acc));
        if (*layout && g.c_out % kVec == 0) {
          Launch::template sample_term<scalar_t, acc_t, kVec>(g, cw.data_ptr<scalar_t>(), bp, term.data_ptr<acc_t>(),
                                                              true, sample / kVec);
        } else {
          Launch::template sample_term<scalar_t, acc_t, 1>(g, cw.data_ptr<scalar_t>(), bp, term.data_ptr<acc_t>(),
                                                           *layout, sample);
        }
        if (vec_ok) {
          Launch::template add_sample_term<scalar_t, acc_t, kVec>(term.data_ptr<acc_t>(), y.data_ptr<scalar_t>(),
                                                                  sample, y.numel() / kVec);
        } else {
          Launch::template add_sample_term<scalar_t, acc_t, 1>(term.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), sample,
                                                               y.numel());
        }
        return;
      }
      const bool by_rule = *layout && g.c_out % kVec == 0 && sample / kVec >= Launch::target_threads() / 4;
      const bool vec = vec_ok && (policy == kVectors || (policy == kRule && by_rule));
      const int64_t slots = vec ? sample / kVec : sample;
      // samples per thread: as few as keep about target_threads() threads busy
      const int64_t chunks = std::clamp<int64_t>((Launch::target_threads() + slots - 1) / slots, 1, g.n);
      const int64_t per_thread = (g.n + chunks - 1) / chunks;
      const int64_t threads = slots * ((g.n + per_thread - 1) / per_thread);
      if (vec) {
        Launch::template coord_epilogue<scalar_t, acc_t, kVec>(g, cw.data_ptr<scalar_t>(), bp, y.data_ptr<scalar_t>(),
                                                               *layout, per_thread, threads);
      } else {
        Launch::template coord_epilogue<scalar_t, acc_t, 1>(g, cw.data_ptr<scalar_t>(), bp, y.data_ptr<scalar_t>(),
                                                            *layout, per_thread, threads);
      }
      return;
    }
    const at::Tensor cols = coord_cols<Launch, scalar_t, acc_t>(g, y);
    const at::Tensor cw = coord_weight.reshape({g.c_out, g.k_coord()}).to(acc);
    const at::Tensor term = term_gemm(cw, cols, g.has_bias ? bias->to(acc).unsqueeze(1) : at::Tensor());
    std::vector<int64_t> one = y.sizes().vec();
    one[0] = 1;
    if (layout.has_value()) {
      // (NCHW: the term [C_out, points] is already one sample in memory order)
      at::Tensor laid = term;
      if (*layout) {
        laid = at::empty_strided(one, y.strides(), term.options());
        laid.copy_(term.view(one));
      }
      const int64_t threads = (y.numel() + kEpilogueVec - 1) / kEpilogueVec;
      Launch::template add_term<scalar_t, acc_t>(laid.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), sample, y.numel(),
                                                 threads);
    } else {
      y.add_(term.view(one));
    }
  });
  return y;
}

// The gradient of coord_weight from grad_sum = grad_output.sum(0): [C_out, points] x cols^T, in
// acc_t, by a small GEMM.
template <class Launch>
at::Tensor gpu_coord_weight_grad(const at::Tensor& grad_sum, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& coord_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                                 int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
                                 bool separate) {
  const AutocastOff autocast_off;  // inputs arrive already cast (see functional.py)
  const Geometry g = make_geometry(input, weight, c10::nullopt, stride, padding, dilation, transposed, groups, pre_pad,
                                   pre_pad_mode, with_r, separate);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_weight_grad_gpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor cols = coord_cols<Launch, scalar_t, acc_t>(g, grad_sum);
    const at::Tensor gs = grad_sum.to(acc).reshape({g.c_out, g.out_points()});
    out = coord_grad_gemm(gs, cols).to(coord_weight.scalar_type()).reshape(coord_weight.sizes()).contiguous();
  });
  return out;
}

}  // namespace coordconv
