// The `cpp` backend's forward, one of (chosen per layer by kernel_choice.h):
//  * oneDNN's convolution into its blocked layout, and one pass to NCHW adding P (blocked_output.h);
//  * a direct kernel (small C_in * taps, e.g. a network's first layer): data taps + P + bias in a
//    single pass over the output (the SIMD kernel of direct_simd.h in AVX-512 or AVX2 where the CPU
//    has them, or a row kernel vectorised by the compiler); or
//  * ATen/oneDNN convolution for the data, and P added in one parallel in-place pass (from P's
//    affine rows where it has them, as the SIMD kernel does).
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

#include "../geometry.h"
#include "blocked_output.h"
#include "coord_term.h"
#include "cpu_ops.h"
#include "direct_simd.h"
#include "kernel_choice.h"

namespace coordconv {
namespace {

// ---- forward ---------------------------------------------------------------------------------

// acc[j] += a * x[j * stride], the inner loop of the direct kernel (vectorised for stride 1).
template <typename scalar_t, typename acc_t>
inline void axpy_row(acc_t* __restrict acc, const scalar_t* __restrict x, acc_t a, int64_t n, int64_t stride) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += a * static_cast<acc_t>(x[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j] += a * static_cast<acc_t>(x[j * stride]);
  }
}

template <typename scalar_t, typename acc_t>
void direct_forward_cpu(const Geometry& g, const scalar_t* x, const scalar_t* w, const acc_t* P, const scalar_t* bias,
                        scalar_t* y) {
  const int64_t cg = g.c_in / g.groups, coutg = g.c_out / g.groups;
  const int64_t OW = g.out[2], rows = g.out[0] * g.out[1];
  const int64_t DP = g.padded[0], HP = g.padded[1], WP = g.padded[2];
  at::parallel_for(0, g.n * g.c_out, grain_for(rows * OW * cg * g.taps()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(OW);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.c_out, co = plane % g.c_out, grp = co / coutg;
      const acc_t b = g.has_bias ? static_cast<acc_t>(bias[co]) : acc_t(0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t od = r / g.out[1], oh = r % g.out[1];
        const acc_t* prow = P + (co * rows + r) * OW;
        for (int64_t j = 0; j < OW; ++j) acc[j] = prow[j] + b;
        for (int64_t ci = 0; ci < cg; ++ci) {
          const scalar_t* xc = x + (n * g.c_in + grp * cg + ci) * DP * HP * WP;
          const scalar_t* wc = w + (co * cg + ci) * g.taps();
          for (int64_t td = 0; td < g.kernel[0]; ++td) {
            const int64_t pd = od * g.stride[0] - g.pad[0] + td * g.dil[0];
            if (pd < 0 || pd >= DP) continue;
            for (int64_t th = 0; th < g.kernel[1]; ++th) {
              const int64_t ph = oh * g.stride[1] - g.pad[1] + th * g.dil[1];
              if (ph < 0 || ph >= HP) continue;
              const scalar_t* xrow = xc + (pd * HP + ph) * WP;
              for (int64_t tw = 0; tw < g.kernel[2]; ++tw) {
                // pw = j * s + off must lie in [0, WP).
                const int64_t s = g.stride[2], off = tw * g.dil[2] - g.pad[2];
                const int64_t lo = off >= 0 ? 0 : (-off + s - 1) / s;
                const int64_t hi = std::min<int64_t>(OW, off > WP - 1 ? 0 : (WP - 1 - off) / s + 1);
                if (hi <= lo) continue;
                const acc_t a = static_cast<acc_t>(wc[(td * g.kernel[1] + th) * g.kernel[2] + tw]);
                axpy_row<scalar_t, acc_t>(acc.data() + lo, xrow + lo * s + off, a, hi - lo, s);
              }
            }
          }
        }
        scalar_t* yrow = y + (plane * rows + r) * OW;
        for (int64_t j = 0; j < OW; ++j) yrow[j] = static_cast<scalar_t>(acc[j]);
      }
    }
  });
}

// y += P, over every plane of the output (the epilogue of the ATen/oneDNN candidate). Where P has affine rows (float32,
// coord_term.h), rows [lo, hi) add U + (oh - lo) V from the two [C_out, OW] tables, which stay in cache, and only the
// border rows read P: the pass then moves little more than the output it updates (on a batch-1 layer
// P is as large as the output).
template <typename scalar_t, typename acc_t>
void add_coord_term_cpu(const Geometry& g, const CoordTerm& coord, scalar_t* y) {
  const int64_t points = g.out_points(), OW = g.out[2];
  const acc_t* P = coord.P.data_ptr<acc_t>();
  const AffineRows& a = coord.affine;
  const bool affine = std::is_same_v<acc_t, float> && a.uv.defined();
  const float* uv = affine ? a.uv.data_ptr<float>() : nullptr;
  const int64_t lo = affine ? a.lo * OW : points, hi = affine ? a.hi * OW : points;  // flat offsets in a plane
  const auto add = [](scalar_t* __restrict yp, const acc_t* __restrict p, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yp[i] = static_cast<scalar_t>(static_cast<acc_t>(yp[i]) + p[i]);
  };
  const auto body = [&] {
    at::parallel_for(0, g.n * g.c_out, grain_for(points), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t co = plane % g.c_out;
        const acc_t* p = P + co * points;
        scalar_t* yp = y + plane * points;
        add(yp, p, lo);
        if (affine) {
          const float* __restrict u = uv + co * OW;
          const float* __restrict v = u + g.c_out * OW;
          for (int64_t r = lo; r < hi; r += OW) {
            const float t = static_cast<float>((r - lo) / OW);
            scalar_t* __restrict yr = yp + r;
#pragma omp simd
            for (int64_t j = 0; j < OW; ++j)
              yr[j] = static_cast<scalar_t>(static_cast<acc_t>(yr[j]) + (u[j] + t * v[j]));
          }
        }
        add(yp + hi, p + hi, points - hi);
      }
    });
  };
  if (affine) {
    // (the event the direct kernel records too: tests see which layers use the affine rows)
    RECORD_FUNCTION("coordconv_fused::affine_coord_rows", c10::ArrayRef<const c10::IValue>{});
    body();
  } else {
    body();
  }
}

// The row kernel is a candidate up to this depth C_in/groups * taps (beyond, it loses everywhere).
constexpr int64_t kRowCandidateMaxK = 32;

// The ISA in which the SIMD kernel can compute this layer at all, if any: float32, 1-D/2-D, NCHW,
// groups 1, on a CPU with AVX-512 (unless COORDCONV_NO_AVX512) or AVX2; the caps keep clearly
// hopeless deep layers from being timed. (A candidate for the measurement...)
std::optional<Isa> simd_eligible(const Geometry& g, const at::Tensor& input, at::MemoryFormat format) {
  const auto isa = direct_isa();
  const bool ok = isa.has_value() && input.scalar_type() == at::kFloat && format == at::MemoryFormat::Contiguous &&
                  g.groups == 1 && g.kernel[0] == 1 && g.padded[0] == 1 && g.out[0] == 1 &&
                  g.padded[2] < (int64_t{1} << 30) && g.out[2] * g.stride[2] < (int64_t{1} << 30) &&
                  g.k_data() <= 4 * kAvx512DirectMaxK && g.c_in <= 4 * kAvx512DirectMaxCin;
  return ok ? isa : std::nullopt;
}

// ...and whether the fixed rule of docs/tuning.md takes it (COORDCONV_CPU_KERNEL=heuristic).
bool use_avx512_direct(const Geometry& g, const at::Tensor& input, at::MemoryFormat format) {
  return simd_eligible(g, input, format) == Isa::kAvx512 && avx512_direct_pays(g);
}

// The output by one implementation; coord: the coordinate term (P in the accumulation dtype).
at::Tensor forward_impl(Impl impl, const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const CoordTerm& coord, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef output_padding,
                        int64_t groups) {
  if (impl == Impl::kOnednnBlocked) {
    at::Tensor y = forward_blocked(g, input, weight, bias, coord, stride, padding, dilation);
    if (y.defined()) return y;
    impl = Impl::kAten;  // (the layer's output format is not known: blocked_output.h)
  }
  at::Tensor y = impl == Impl::kAten
                     ? at::convolution(input, weight, bias, stride, padding, dilation, false, output_padding, groups)
                     : at::empty(output_sizes(g), input.options());
  if (y.numel() == 0) return y;
  const at::Tensor& P = coord.P;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_conv_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (is_simd(impl)) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        run_direct_simd(impl, g, input, weight, &coord, g.has_bias ? bias->contiguous() : at::Tensor(), y);
      }
    } else if (impl == Impl::kRowDirect) {
      const at::Tensor x = input.contiguous(), w = weight.contiguous();
      direct_forward_cpu<scalar_t, acc_t>(g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), P.data_ptr<acc_t>(),
                                          g.has_bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
    } else if (y.is_contiguous()) {
      add_coord_term_cpu<scalar_t, acc_t>(g, coord, y.data_ptr<scalar_t>());
    } else if (coord.P_last.defined() && y.is_contiguous(y.suggest_memory_format())) {
      y.add_(coord.P_last);  // channels-last: P in the output's order, broadcast over the batch
    } else {                 // any other layout: let ATen broadcast over it
      auto sizes = output_sizes(g);
      sizes[0] = 1;
      y.add_(P.view(sizes));
    }
  });
  return y;
}

}  // namespace

// y = the output of the SIMD direct kernel `impl` for float32 input x, weight [C_out, C_in, (kh,) kw],
// the coordinate term (or null) and bias (or undefined).
void run_direct_simd(Impl impl, const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                     const CoordTerm* coord, const at::Tensor& bias, at::Tensor& y) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const int64_t block = oc_block_of(impl);
  const int64_t blocks = (g.c_out + block - 1) / block, K = g.k_data();
  // [channel block][tap][channel in block], zero past C_out: a tile's weights lie together
  at::Tensor wpack = at::empty({blocks, K, block}, weight.options());
  float* wp = wpack.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t o = 0; o < block; ++o) {
        const int64_t oc = b * block + o;
        *wp++ = oc < g.c_out ? ws[oc * K + k] : 0.0f;
      }
  const SplitLayout layout = split_layout(g);
  at::Tensor xs = at::empty({g.n * g.c_in * g.padded[1] * layout.floats_per_row()}, x.options());
  const AffineRows* affine = coord != nullptr && coord->affine.uv.defined() ? &coord->affine : nullptr;
  const auto launch = [&] {
    direct_forward_simd(isa_of(impl), block, g, layout, x.data_ptr<float>(), xs.data_ptr<float>(),
                        wpack.data_ptr<float>(), coord != nullptr ? coord->P.data_ptr<float>() : nullptr,
                        affine != nullptr ? affine->uv.data_ptr<float>() : nullptr, affine != nullptr ? affine->lo : 0,
                        affine != nullptr ? affine->hi : 0, bias.defined() ? bias.data_ptr<float>() : nullptr,
                        y.data_ptr<float>());
  };
  if (affine != nullptr) {
    // (a profiler event: tests see which layers add the coordinate term from its affine rows)
    RECORD_FUNCTION("coordconv_fused::affine_coord_rows", c10::ArrayRef<const c10::IValue>{});
    launch();
  } else {
    launch();
  }
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r, bool separate) {
  const AutocastOff autocast_off;  // inputs arrive already cast (see functional.py)
  Geometry g = make_geometry(input, weight, bias, stride, padding, dilation, transposed, groups, pre_pad, pre_pad_mode,
                             with_r, separate);
  if (g.n * g.c_out * g.out_points() == 0) {
    return at::convolution(input, weight, bias, stride, padding, dilation, false, output_padding, groups);
  }
  const auto format = conv_output_format(input, weight);
  CoordTerm coord;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_term_cpu", [&] {
    coord = cached_coord_term<scalar_t, at::opmath_type<scalar_t>>(g, coord_weight, format);
  });
  // The candidates: ATen/oneDNN + the coordinate epilogue, oneDNN + the fused reorder and epilogue
  // where its output is blocked, the row kernel on shallow layers, the SIMD kernel where it applies
  // (in AVX-512 both its tile shapes, the second where C_out fills more than one tile of the first;
  // kernel_choice.h chooses among them).
  const bool dense = format == at::MemoryFormat::Contiguous;
  std::vector<Impl> candidates{Impl::kAten};
  const bool blocked = blocked_output_eligible(g, input, format);
  if (blocked) candidates.push_back(Impl::kOnednnBlocked);
  if (dense && g.k_data() <= kRowCandidateMaxK) candidates.push_back(Impl::kRowDirect);
  if (const auto isa = simd_eligible(g, input, format)) {
    for (const Impl impl : simd_candidates(*isa, g.c_out)) candidates.push_back(impl);
  }
  // (oneDNN's own passes with the epilogue in one of them rather than after them, where it applies)
  const Impl heuristic = use_avx512_direct(g, input, format)     ? Impl::kAvx512Direct
                         : dense && g.k_data() <= kCpuDirectMaxK ? Impl::kRowDirect
                         : blocked                               ? Impl::kOnednnBlocked
                                                                 : Impl::kAten;
  auto run = [&](Impl impl) {
    return forward_impl(impl, g, input, weight, bias, coord, stride, padding, dilation, output_padding, groups);
  };
  const Impl impl = choose_impl("forward", g, input.scalar_type(), candidates, heuristic, [&](Impl c) { run(c); });
  return run(impl);
}

}  // namespace coordconv
