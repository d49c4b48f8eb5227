// The `cpp` backend's backward: the gradient of coord_weight in one pass over grad_output (per output
// channel: its batch sum, contracted with the coordinate term's tables), the input, weight and bias
// gradients by nn.Conv2d's own convolution_backward call, or the input gradient by input_grad.cpp's
// kernel where it was chosen (the bias gradient then in the same pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../batch_sum.h"
#include "../geometry.h"
#include "coord_term.h"
#include "cpu_ops.h"
#include "direct_simd.h"

namespace coordconv {
namespace {

// ---- gradient of coord_weight (and of the bias) ---------------------------------------------------

// The sums over every output point (the separate filter's coordinate gradient, the bias gradient's
// sum of row sums): accumulated in double for float32, so that their error does not grow with the
// number of terms (with one running float32 sum, a random search found the bias gradient's error
// 3-8x that of ATen's cascade sum); the radius channel's in blocks of this many points.
constexpr int64_t kSumBlock = 256;

// From this many multiply-adds (C_out * OD * OH * KH * KW) on, the contraction over the output rows
// runs as ATen's batched matrix products (the stem (1,3,224,224)->64 7x7/2: 351K; see docs/tuning.md);
// below, as a loop per channel, which costs less per call (a tiny layer's backward then makes no ATen
// call).
constexpr int64_t kBatchedRowsMin = 32768;

// sum over p in [0, n) of term(p), accumulated in double where acc_t is float (vectorised).
template <typename acc_t, typename Term>
acc_t long_sum(int64_t n, const Term& term) {
  using wide_t = std::conditional_t<std::is_same_v<acc_t, float>, double, acc_t>;
  wide_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t p = 0; p < n; ++p) total += static_cast<wide_t>(term(p));
  return static_cast<acc_t>(total);
}

// dst[p] = the sum over the n_samples planes src + n * stride of their element p, in acc_t: four
// planes per pass over dst (dst stays in cache; the planes stream from memory once).
template <typename scalar_t, typename acc_t>
void batch_sum(const scalar_t* src, int64_t stride, int64_t n_samples, int64_t len, acc_t* dst) {
  if (n_samples == 0) {
    std::fill(dst, dst + len, acc_t(0));
    return;
  }
  const auto cast = [](scalar_t v) { return static_cast<acc_t>(v); };
  int64_t n = 0;
  for (; n + 4 <= n_samples; n += 4) {
    const scalar_t *a = src + n * stride, *b = a + stride, *c = b + stride, *d = c + stride;
    if (n == 0) {
#pragma omp simd
      for (int64_t p = 0; p < len; ++p) dst[p] = (cast(a[p]) + cast(b[p])) + (cast(c[p]) + cast(d[p]));
    } else {
#pragma omp simd
      for (int64_t p = 0; p < len; ++p) dst[p] += (cast(a[p]) + cast(b[p])) + (cast(c[p]) + cast(d[p]));
    }
  }
  for (; n < n_samples; ++n) {
    const scalar_t* a = src + n * stride;
    if (n == 0) {
#pragma omp simd
      for (int64_t p = 0; p < len; ++p) dst[p] = cast(a[p]);
    } else {
#pragma omp simd
      for (int64_t p = 0; p < len; ++p) dst[p] += cast(a[p]);
    }
  }
}

// out[r, j] = sum over k < len of rows[r, k] columns[j, k], for r < n_rows and j < width (row-major;
// `columns` holds a multiple of 4 rows, zero beyond width): four columns per pass over a row, so that
// four independent sums hide the latency of the additions.
template <typename acc_t>
__attribute__((always_inline)) inline void row_products_loop(const acc_t* rows, int64_t n_rows, int64_t len,
                                                             const acc_t* columns, int64_t width, acc_t* out) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const acc_t* a = rows + r * len;
    for (int64_t j = 0; j < width; j += 4) {
      const acc_t *b0 = columns + j * len, *b1 = b0 + len, *b2 = b1 + len, *b3 = b2 + len;
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < len; ++k) {
        const acc_t v = a[k];
        s0 += v * b0[k];
        s1 += v * b1[k];
        s2 += v * b2[k];
        s3 += v * b3[k];
      }
      const acc_t sums[4] = {s0, s1, s2, s3};
      for (int64_t i = 0; i < 4 && j + i < width; ++i) out[r * width + j + i] = sums[i];
    }
  }
}

#if defined(COORDCONV_HAVE_SIMD_KERNEL)
// The same loop compiled for AVX2 and FMA (8 lanes; the portable build has 4): float32.
__attribute__((target("avx2,fma"))) void row_products_avx2(const float* rows, int64_t n_rows, int64_t len,
                                                           const float* columns, int64_t width, float* out) {
  row_products_loop<float>(rows, n_rows, len, columns, width, out);
}
#endif

template <typename acc_t>
void row_products(const acc_t* rows, int64_t n_rows, int64_t len, const acc_t* columns, int64_t width, acc_t* out) {
#if defined(COORDCONV_HAVE_SIMD_KERNEL)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_supported(Isa::kAvx2)) return row_products_avx2(rows, n_rows, len, columns, width, out);
  }
#endif
  row_products_loop<acc_t>(rows, n_rows, len, columns, width, out);
}

// The gradients of coord_weight and of the bias from grad_output. Each output channel's planes are
// summed over the batch (the coordinate term is the same for every sample: `sums`, [C_out, points],
// grad itself for a batch of one in the accumulation dtype), then contracted with the coordinate
// term's tables:
//   G_c[o,t,u,v] = sum_i F0_c[i,t] sum_j F1_c[j,u] sum_k sums[o,i,j,k] F2_c[k,v]
// The innermost contraction, the only output-sized one, in the pass that makes the batch sums: each
// row of a channel's summed plane against the row tables (F2's two possible tables, mask and
// coordinate, and a column of ones whose products are the rows' sums, for the bias gradient); then
// per channel, in parallel,
// the small rest, the radius channel against its [points x taps] table and the separate-filter
// variant against the [points x coords] table of the centre coordinates. grad [N, C_out, *out];
// either output may be skipped (undefined).
template <typename scalar_t, typename acc_t>
void coord_and_bias_grads(const Geometry& g, const at::Tensor& grad, at::Tensor* coord_grad, at::Tensor* bias_grad) {
  const auto acc_opts = grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // A grad in another layout (channels_last, or the expanded one of y.sum().backward()) is summed
  // over the batch first (accumulated in acc_t, rounded once; a channels-last one over its samples'
  // blocks of memory: ATen's sum over its batch dim took 3.5 ms of a (8,64,56,56) grad against
  // 0.3 ms): no output-sized copy.
  const bool dense = grad.is_contiguous();
  const at::Tensor gc = dense ? grad : sum_over_batch(grad, grad.scalar_type()).contiguous();
  const int64_t O = g.c_out, N = dense ? g.n : 1, points = g.out_points();
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], KD = g.kernel[0], KH = g.kernel[1], KW = g.kernel[2];
  const int64_t taps = g.taps(), nc = g.num_coords, per_o = g.separate ? nc : nc * taps, rows = OD * OH;
  const GradTables tables = cached_grad_tables<scalar_t, acc_t>(g, acc_opts);
  const AxisTables& t = tables.axis;
  // Per channel, in parallel: its batch sum (`sums`, [C_out, points]: grad itself for one sample in
  // the accumulation dtype) and, while that plane is in cache, its rows' products with the row tables
  //   inner[o, i, j, :] = sums[o, i, j, :] x the row tables (tables.row_columns, transposed)
  // ([mask products (KW) | coordinate products (KW) |] the row's sum; only the sum for the separate
  // filter). (As one at::mm, that product of a tall matrix with a few columns ran at 8 GFLOP/s:
  // 0.44 ms of the high-resolution layer's backward on the Zen 5, the batch sums 2.2 ms.)
  const int64_t width = tables.row_width;
  const bool view = N == 1 && std::is_same_v<scalar_t, acc_t>;
  const at::Tensor sums = view ? gc.view({O, points}) : at::empty({O, points}, acc_opts);
  const at::Tensor inner = at::empty({O * rows, width}, acc_opts);
  {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const acc_t* columns = tables.row_columns.const_data_ptr<acc_t>();
    acc_t* sp = sums.data_ptr<acc_t>();
    acc_t* ip = inner.data_ptr<acc_t>();
    at::parallel_for(0, O, grain_for(N * points + points * width), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        acc_t* plane = sp + o * points;
        if (!view) batch_sum<scalar_t, acc_t>(gp + o * points, O * points, N, points, plane);
        row_products<acc_t>(plane, rows, OW, columns, width, ip + o * rows * width);
      }
    });
  }
  const bool want_cw = coord_grad != nullptr;
  at::Tensor cw = want_cw ? at::empty({O, per_o}, acc_opts) : at::Tensor();
  at::Tensor b = bias_grad != nullptr ? at::empty({O}, acc_opts) : at::Tensor();
  auto ptr = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<acc_t>() : nullptr; };
  const acc_t* sp = sums.data_ptr<acc_t>();
  const acc_t* ip = inner.data_ptr<acc_t>();
  const acc_t* rp = ptr(tables.radius);
  const acc_t* cp = ptr(tables.centre);
  acc_t* cwp = ptr(cw);
  acc_t* bp = ptr(b);
  // Each axis channel's outer factor tables (see factors()) and where its innermost products start;
  // on large layers, the rest of its contraction for all channels at once:
  //   mid[o, i, u, v] = sum_j F1[j, u] inner[o, i, j, v];  G[o, t, u, v] = sum_i F0[i, t] mid[o, i, u, v]
  std::array<std::array<const acc_t*, 2>, 3> outer{};
  std::array<int64_t, 3> inner_at{};
  const bool axes = want_cw && !g.separate;
  const bool batched = axes && O * rows * KH * KW >= kBatchedRowsMin;
  for (int64_t c = 0; axes && c < g.ndim; ++c) {
    const auto f = factors(g, t, c);
    outer[c] = {f[0].data_ptr<acc_t>(), f[1].data_ptr<acc_t>()};
    inner_at[c] = f[2].is_same(t.value[2]) ? KW : 0;
    if (batched) {
      const at::Tensor mid = at::matmul(f[1].t(), inner.view({O * OD, OH, width}).narrow(2, inner_at[c], KW));
      cw.narrow(1, c * taps, taps).view({O, KD, KH * KW}).copy_(at::matmul(f[0].t(), mid.view({O, OD, KH * KW})));
    }
  }
  // Per-thread scratch, allocated here rather than in the workers (a worker's first malloc would
  // give it its own glibc arena, which later allocations there keep growing).
  const int64_t scratch_len = OD * KH * KW + taps;
  const at::Tensor scratch = at::empty({at::get_num_threads(), scratch_len}, acc_opts);
  const int64_t radius_cost = g.with_r ? points * taps : 0;
  const int64_t cost = rows + (!want_cw     ? 0
                               : g.separate ? nc * points
                               : batched    ? radius_cost
                                            : nc * rows * KH * KW + radius_cost);
  at::parallel_for(0, O, grain_for(cost), [&](int64_t begin, int64_t end) {
    acc_t* const mid = scratch.data_ptr<acc_t>() + at::get_thread_num() * scratch_len;
    for (int64_t o = begin; o < end; ++o) {
      const acc_t* in = ip + o * rows * width;  // this channel's rows of inner
      if (bp != nullptr) bp[o] = long_sum<acc_t>(rows, [&](int64_t r) { return in[r * width + width - 1]; });
      if (cwp == nullptr) continue;
      const acc_t* buf = sp + o * points;
      acc_t* out = cwp + o * per_o;
      if (g.separate) {
        for (int64_t c = 0; c < nc; ++c)
          out[c] = long_sum<acc_t>(points, [&](int64_t p) { return buf[p] * cp[p * nc + c]; });
        continue;
      }
      for (int64_t c = 0; !batched && c < g.ndim; ++c) {
        const auto [F0, F1] = outer[c];
        const acc_t* src = in + inner_at[c];
        // mid[i, u, v] = sum_j F1[j, u] src[i, j, v]
        std::fill(mid, mid + OD * KH * KW, acc_t(0));
        for (int64_t i = 0; i < OD; ++i)
          for (int64_t j = 0; j < OH; ++j)
            for (int64_t u = 0; u < KH; ++u) {
              const acc_t f = F1[j * KH + u];
              if (f == acc_t(0)) continue;
              for (int64_t v = 0; v < KW; ++v) mid[(i * KH + u) * KW + v] += f * src[(i * OH + j) * width + v];
            }
        // out[c, t, u, v] = sum_i F0[i, t] mid[i, u, v]
        acc_t* dst = out + c * taps;
        for (int64_t tt = 0; tt < KD; ++tt)
          for (int64_t uv = 0; uv < KH * KW; ++uv) {
            acc_t s = 0;
            for (int64_t i = 0; i < OD; ++i) s += F0[i * KD + tt] * mid[i * KH * KW + uv];
            dst[tt * KH * KW + uv] = s;
          }
      }
      if (g.with_r) {
        acc_t* dst = out + g.ndim * taps;
        acc_t* block = mid + OD * KH * KW;  // (per block of points, then into dst: see kSumBlock)
        std::fill(dst, dst + taps, acc_t(0));
        for (int64_t start = 0; start < points; start += kSumBlock) {
          std::fill(block, block + taps, acc_t(0));
          for (int64_t p = start; p < std::min(points, start + kSumBlock); ++p) {
            const acc_t bv = buf[p];
            const acc_t* row = rp + p * taps;
            for (int64_t tap = 0; tap < taps; ++tap) block[tap] += bv * row[tap];
          }
          for (int64_t tap = 0; tap < taps; ++tap) dst[tap] += block[tap];
        }
      }
    }
  });
  if (coord_grad != nullptr) *coord_grad = cw;
  if (bias_grad != nullptr) *bias_grad = b;
}

}  // namespace

at::Tensor coord_weight_grad_cpu(const at::Tensor& grad_sum, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& coord_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                                 int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
                                 bool separate) {
  const AutocastOff autocast_off;  // inputs arrive already cast (see functional.py)
  Geometry g = make_geometry(input, weight, c10::nullopt, stride, padding, dilation, transposed, groups, pre_pad,
                             pre_pad_mode, with_r, separate);
  g.n = grad_sum.size(0);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_sum.scalar_type(), "coord_weight_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    coord_and_bias_grads<scalar_t, acc_t>(g, grad_sum, &out, nullptr);
  });
  return out.view(coord_weight.sizes()).to(coord_weight.scalar_type());
}

// ---- the whole backward ---------------------------------------------------------------------------

// Gradients of (input, weight, coord_weight, bias), each only where output_mask asks (else
// undefined). Where ATen computes the input gradient (or none is asked for), the input, weight and
// bias gradients are nn.Conv2d's own convolution_backward call, the same arguments: that part then
// costs what nn.Conv2d's backward costs on any CPU, and the one pass above adds the coordinate
// gradient. Where the direct kernel computes the input gradient, ATen's call computes the weight
// gradient alone and the pass the bias gradient too (docs/tuning.md). With the weight gradient
// wanted, which of the two runs is measured as a whole (backward_impl: the kernel's input gradient
// alone may be faster than ATen's and still lose to nn.Conv2d's one call for both).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
    bool separate, std::array<bool, 4> output_mask) {
  const AutocastOff autocast_off;
  const auto [need_in, need_w, need_cw, need_b] = output_mask;
  Geometry g = make_geometry(input, weight, c10::nullopt, stride, padding, dilation, transposed, groups, pre_pad,
                             pre_pad_mode, with_r, separate);
  // An expanded grad (y.sum().backward()) would be copied by each of the input and weight gradients:
  // once here instead (then the batch sum of the coordinate gradient reads it directly too).
  const at::Tensor grad = (need_in || need_w) && !grad_output.is_non_overlapping_and_dense()
                              ? grad_output.contiguous(grad_output.suggest_memory_format())
                              : grad_output;
  const Impl in_impl =
      !need_in ? Impl::kAten
      : need_w
          ? backward_impl(grad, input, weight, stride, padding, dilation, transposed, output_padding, groups, need_b)
          : input_grad_impl(grad, input, weight, stride, padding, dilation, transposed, output_padding, groups);
  const bool conv_call = need_w || (need_in && in_impl == Impl::kAten);  // one convolution_backward
  const bool bias_in_conv = need_b && conv_call && in_impl == Impl::kAten;
  at::Tensor grad_in, grad_w, grad_cw, grad_b;
  if (need_cw || (need_b && !bias_in_conv)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "coord_conv_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      coord_and_bias_grads<scalar_t, acc_t>(g, grad, need_cw ? &grad_cw : nullptr,
                                            need_b && !bias_in_conv ? &grad_b : nullptr);
    });
    if (need_cw) grad_cw = grad_cw.view(coord_weight.sizes()).to(coord_weight.scalar_type());
    if (grad_b.defined()) grad_b = grad_b.to(grad.scalar_type());
  }
  const bool aten_in = need_in && in_impl == Impl::kAten;
  if (need_in && !aten_in)
    grad_in =
        input_grad_by(in_impl, grad, input, weight, stride, padding, dilation, transposed, output_padding, groups);
  if (conv_call) {
    const std::vector<int64_t> bias_sizes{weight.size(0)};
    at::Tensor in, w, b;
    std::tie(in, w, b) = at::convolution_backward(
        grad, input, weight, bias_in_conv ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt, stride, padding,
        dilation, transposed, output_padding, groups, {aten_in, need_w, bias_in_conv});
    if (aten_in) grad_in = in;
    if (need_w) grad_w = w;
    if (bias_in_conv) grad_b = b;
  }
  return {grad_in, grad_w, grad_cw, grad_b};
}

}  // namespace coordconv
