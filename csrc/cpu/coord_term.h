// The `cpp` backend's coordinate term P[o, point], which does not depend on the sample, in closed form
// from the separable structure of the coordinate channels (channel a varies along axis a only, and
// zero padding is a product of per-axis masks):
//   P_a[o, i, j, k] = sum_{t,u,v} cw[o, a, t, u, v] * F_d[i, t] * F_h[j, u] * F_w[k, v]
// with F = the axis's coordinate table on axis a and the 0/1 mask table elsewhere (small per-axis
// tables of size out x kernel), i.e. three small contractions instead of a convolution; only the
// radius, which is not separable, needs a [points x taps] table. P is cached while coord_weight
// holds the same values and the geometry is the same. The same tables serve the backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <mutex>
#include <unordered_map>

#include "../geometry.h"

namespace coordconv {

// ---- closed-form coordinate term -----------------------------------------------------------

struct AxisTables {
  at::Tensor value[3];  // [out, kernel]: coordinate read by tap t at output o (rounded to the input dtype)
  at::Tensor mask[3];   // [out, kernel]: 1 where that position is inside (not zero padding)
  at::Tensor raw[3];    // unrounded values, for the radius
};

template <typename scalar_t, typename acc_t>
AxisTables axis_tables(const Geometry& g, const at::TensorOptions& acc_opts) {
  AxisTables t;
  for (int ax = 0; ax < 3; ++ax) {
    t.value[ax] = at::empty({g.out[ax], g.kernel[ax]}, acc_opts);
    t.mask[ax] = at::empty({g.out[ax], g.kernel[ax]}, acc_opts);
    t.raw[ax] = at::empty({g.out[ax], g.kernel[ax]}, acc_opts);
    acc_t* v = t.value[ax].data_ptr<acc_t>();
    acc_t* m = t.mask[ax].data_ptr<acc_t>();
    acc_t* r = t.raw[ax].data_ptr<acc_t>();
    for (int64_t o = 0; o < g.out[ax]; ++o) {
      for (int64_t k = 0; k < g.kernel[ax]; ++k) {
        const int64_t i = o * g.kernel[ax] + k;
        axis_tap<acc_t>(g, ax, o, k, &r[i], &m[i]);
        v[i] = static_cast<acc_t>(static_cast<scalar_t>(r[i]));
      }
    }
  }
  return t;
}

// Radius channel: R[point, tap] (rounded), zero wherever any axis is in the zero padding.
template <typename scalar_t, typename acc_t>
at::Tensor radius_table(const Geometry& g, const AxisTables& t, const at::TensorOptions& acc_opts) {
  at::Tensor R = at::empty({g.out_points(), g.taps()}, acc_opts);
  acc_t* out = R.data_ptr<acc_t>();
  const acc_t* raw[3] = {t.raw[0].data_ptr<acc_t>(), t.raw[1].data_ptr<acc_t>(), t.raw[2].data_ptr<acc_t>()};
  const acc_t* msk[3] = {t.mask[0].data_ptr<acc_t>(), t.mask[1].data_ptr<acc_t>(), t.mask[2].data_ptr<acc_t>()};
  const int64_t KD = g.kernel[0], KH = g.kernel[1], KW = g.kernel[2];
  at::parallel_for(0, g.out_points(), grain_for(g.taps()), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = p % g.out[2], j = (p / g.out[2]) % g.out[1], i = p / (g.out[2] * g.out[1]);
      acc_t* row = out + p * g.taps();
      for (int64_t td = 0; td < KD; ++td)
        for (int64_t th = 0; th < KH; ++th)
          for (int64_t tw = 0; tw < KW; ++tw) {
            const acc_t vd = raw[0][i * KD + td], vh = raw[1][j * KH + th], vw = raw[2][k * KW + tw];
            const acc_t inside = msk[0][i * KD + td] * msk[1][j * KH + th] * msk[2][k * KW + tw];
            const acc_t v[3] = {vd * inside, vh * inside, vw * inside};
            row[(td * KH + th) * KW + tw] = channel_value<scalar_t, acc_t>(g, g.ndim, v, inside);
          }
    }
  });
  return R;
}

// Separate filter: the receptive-field centre coordinates, [point, d] (rounded).
template <typename scalar_t, typename acc_t>
at::Tensor centre_table(const Geometry& g, const at::TensorOptions& acc_opts) {
  at::Tensor C = at::empty({g.out_points(), g.num_coords}, acc_opts);
  acc_t* out = C.data_ptr<acc_t>();
  for (int64_t p = 0; p < g.out_points(); ++p) {
    for (int64_t c = 0; c < g.num_coords; ++c) {
      out[p * g.num_coords + c] =
          coord_im2col<scalar_t, acc_t>(g, c, p / (g.out[2] * g.out[1]), (p / g.out[2]) % g.out[1], p % g.out[2]);
    }
  }
  return C;
}

// Per-axis factor tables of axis channel c: the coordinate on its own axis, the mask elsewhere.
inline std::array<at::Tensor, 3> factors(const Geometry& g, const AxisTables& t, int64_t c) {
  const int axis = channel_axis(g, c);
  return {axis == 0 ? t.value[0] : t.mask[0], axis == 1 ? t.value[1] : t.mask[1], axis == 2 ? t.value[2] : t.mask[2]};
}

// The rows of P in affine form, for the float32 direct kernel (direct_simd.h) and the epilogue after
// oneDNN (forward.cpp): wherever every tap row of an output row lies inside the input (the row masks
// all ones), the row coordinate each tap reads grows linearly with the output row, so
// P[o, oh, :] = U[o, :] + (oh - lo) V[o, :] for lo <= oh < hi. Two [C_out, OW] tables that stay in
// cache then stand for the output-sized P on all but the border rows, which the kernel would otherwise
// read from memory beside the output.
struct AffineRows {
  at::Tensor uv;  // [2, C_out, OW] float32: U, then V; undefined where P has no affine rows
  int64_t lo = 0, hi = 0;
};

// P and its affine rows (those only for a float32 2-D layer without the radius channel).
struct CoordTerm {
  at::Tensor P;
  AffineRows affine;
  // P as [1, C_out, (D,) H, W] in channels-last order, made once per P where a layer's output is
  // channels-last (the epilogue then adds it to each sample in memory order; P itself would be read
  // across the channels with a stride of H W: 1.12x the convolution against 1.03x on a mid layer)
  at::Tensor P_last;
};

constexpr int64_t kMinAffineRows = 3;

// U, V from the per-row factor table F1 [OH, c KH] (P = F1 x E, E [C_out, 1, c KH, OW]): F1's rows
// lo and hi - 1 fix the line (in double); every row between must lie on it to the coordinates'
// rounding (float32 coordinate values are rounded, so they are affine only to a few ulps; a pre-padding
// mode that maps positions non-linearly fails the check and leaves P as it is).
inline AffineRows affine_rows(const Geometry& g, const AxisTables& t, const at::Tensor& F1, const at::Tensor& E) {
  AffineRows r;
  const int64_t OH = g.out[1], KH = g.kernel[1];
  if (g.out[0] != 1 || OH < kMinAffineRows) return r;
  const at::Tensor mask_t = t.mask[1].to(at::kDouble).contiguous(), F_t = F1.to(at::kDouble).contiguous();
  const double *mask = mask_t.const_data_ptr<double>(), *f = F_t.const_data_ptr<double>();
  const auto inside = [&](int64_t oh) {
    return std::all_of(mask + oh * KH, mask + (oh + 1) * KH, [](double m) { return m == 1.0; });
  };
  int64_t lo = 0;
  while (lo < OH && !inside(lo)) ++lo;
  int64_t hi = lo;
  while (hi < OH && inside(hi)) ++hi;
  if (hi - lo < kMinAffineRows) return r;
  const int64_t cols = F_t.size(1);
  at::Tensor coef = at::empty({2, cols}, F_t.options());
  double* c = coef.data_ptr<double>();
  double deviation = 0, scale = 1;
  for (int64_t k = 0; k < cols; ++k) {
    c[k] = f[lo * cols + k];
    c[cols + k] = (f[(hi - 1) * cols + k] - c[k]) / static_cast<double>(hi - 1 - lo);
    for (int64_t oh = lo; oh < hi; ++oh) {
      const double v = f[oh * cols + k];
      deviation = std::max(deviation, std::abs(v - (c[k] + static_cast<double>(oh - lo) * c[cols + k])));
      scale = std::max(scale, std::abs(v));
    }
  }
  if (deviation > 8 * std::numeric_limits<float>::epsilon() * scale) return r;
  // [2, c KH] x [C_out, c KH, OW] -> [C_out, 2, OW] -> [2, C_out, OW]
  r.uv = at::matmul(coef.to(E.scalar_type()), E.select(1, 0)).transpose(0, 1).to(at::kFloat).contiguous();
  r.lo = lo;
  r.hi = hi;
  return r;
}

// The axis channels' part of P as matrix products, the output-sized one last and shared by all
// channels:  P[o,i,j,k] = sum_c sum_u F1_c[j,u] E_c[o,i,u,k],  E_c = F0_c x (w_c x F2_c^T).
// (A 4-operand einsum contracted left to right builds output-sized intermediates per channel.)
// With `affine`, also P's affine rows.
inline at::Tensor axis_coord_term(const Geometry& g, const AxisTables& t, const at::Tensor& cw, AffineRows* affine) {
  const int64_t O = g.c_out, KD = g.kernel[0], KH = g.kernel[1], KW = g.kernel[2], OD = g.out[0];
  std::vector<at::Tensor> f1, e;
  for (int64_t c = 0; c < g.ndim; ++c) {
    const auto f = factors(g, t, c);
    const at::Tensor a = at::matmul(cw.select(1, c).reshape({O, KD, KH, KW}), f[2].t());  // [O, KD, KH, OW]
    e.push_back(at::matmul(f[0], a.reshape({O, KD, KH * g.out[2]})).view({O, OD, KH, g.out[2]}));
    f1.push_back(f[1]);
  }
  const at::Tensor F1 = at::cat(f1, 1), E = at::cat(e, 2);
  if (affine != nullptr) *affine = affine_rows(g, t, F1, E);
  return at::matmul(F1, E).contiguous();  // [OH, c KH] x [O, OD, c KH, OW]
}

// P = the coordinate term, [C_out, OD, OH, OW] in the accumulation dtype, and (float32) its affine rows.
template <typename scalar_t, typename acc_t>
CoordTerm coord_term_table(const Geometry& g, const at::Tensor& coord_weight) {
  const auto acc_opts = coord_weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor cw = coord_weight.to(acc_opts.dtype_opt()->toScalarType()).reshape({g.c_out, g.num_coords, -1});
  if (g.separate) {
    const at::Tensor C = centre_table<scalar_t, acc_t>(g, acc_opts);
    return {at::mm(cw.select(2, 0), C.t()).view({g.c_out, g.out[0], g.out[1], g.out[2]}), {}};
  }
  const AxisTables t = axis_tables<scalar_t, acc_t>(g, acc_opts);
  CoordTerm term;
  const bool affine = std::is_same_v<scalar_t, float> && !g.with_r;
  term.P = axis_coord_term(g, t, cw, affine ? &term.affine : nullptr);
  if (g.with_r) {
    const at::Tensor R = radius_table<scalar_t, acc_t>(g, t, acc_opts);
    term.P.view({g.c_out, -1}).addmm_(cw.select(1, g.ndim), R.t());
  }
  return term;
}

// ---- cache of P --------------------------------------------------------------------------------

// Keyed by the coord_weight tensor and the geometry; valid while coord_weight holds the same
// values. The values are compared with a saved copy (O(|coord_weight|), tiny next to the output)
// rather than trusted to the version counter, which `.data` updates and gradcheck's perturbations
// bypass.
struct CacheEntry {
  Geometry key{};
  at::Tensor coord_weight;  // a copy of the values P was computed from
  CoordTerm term;
};

inline Geometry cache_key(Geometry g) {
  g.n = 0;  // P does not depend on the batch or on the output's strides
  std::memset(g.ystride, 0, sizeof(g.ystride));
  return g;
}

// Whether `b` holds the values of `saved` (a contiguous copy of the same shape and dtype): the bytes
// compared directly on the CPU (no dispatch: this runs on every call), at::equal elsewhere.
inline bool same_values(const at::Tensor& saved, const at::Tensor& b) {
  if (saved.is_cpu() && b.is_cpu() && b.is_contiguous() && saved.is_contiguous()) {
    return b.nbytes() == 0 || std::memcmp(saved.const_data_ptr(), b.const_data_ptr(), b.nbytes()) == 0;
  }
  return at::equal(saved, b);
}

constexpr size_t kMaxCacheEntries = 256;
// The process-wide cache and its lock (coord_term.cpp).
std::mutex& cache_mutex();
std::unordered_map<const c10::TensorImpl*, CacheEntry>& cache();

// P in `format` (ChannelsLast or ChannelsLast3d), viewed with the output's sizes for a batch of one.
inline at::Tensor term_in_format(const Geometry& g, const at::Tensor& P, at::MemoryFormat format) {
  std::vector<int64_t> sizes = output_sizes(g);
  sizes[0] = 1;
  return P.view(sizes).contiguous(format);
}

// P for this layer and coord_weight's values, from the cache where they are the same; with
// `last_format` a channels-last format, P_last in it too.
template <typename scalar_t, typename acc_t>
CoordTerm cached_coord_term(const Geometry& g, const at::Tensor& coord_weight,
                            at::MemoryFormat last_format = at::MemoryFormat::Contiguous) {
  const Geometry key = cache_key(g);
  const bool want_last = last_format != at::MemoryFormat::Contiguous;
  const c10::TensorImpl* impl = coord_weight.unsafeGetTensorImpl();
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache().find(impl);
    if (it != cache().end() && std::memcmp(&it->second.key, &key, sizeof(Geometry)) == 0 &&
        it->second.coord_weight.sizes() == coord_weight.sizes() &&
        it->second.coord_weight.scalar_type() == coord_weight.scalar_type() &&
        same_values(it->second.coord_weight, coord_weight)) {
      CoordTerm& term = it->second.term;
      if (want_last && !term.P_last.defined()) term.P_last = term_in_format(g, term.P, last_format);
      return term;
    }
  }
  CoordTerm term = coord_term_table<scalar_t, acc_t>(g, coord_weight);
  if (want_last) term.P_last = term_in_format(g, term.P, last_format);
  std::lock_guard<std::mutex> lock(cache_mutex());
  if (cache().size() >= kMaxCacheEntries) cache().clear();
  cache()[impl] = CacheEntry{key, coord_weight.clone(at::MemoryFormat::Contiguous), term};
  return term;
}

// ---- cache of the backward's tables ------------------------------------------------------------

// What the coordinate gradient contracts grad_output with (backward.cpp): the per-axis tables and
// the radius table, or the separate filter's centre table. They depend on the geometry and the
// input dtype alone, so they are built once per layer shape rather than on every backward.
struct GradTables {
  AxisTables axis;    // full coordinate kernel
  at::Tensor radius;  // full coordinate kernel with the radius channel
  at::Tensor centre;  // separate filter
  // What each output row is multiplied with, one column of OW values per row of this [width rounded
  // up to 4, OW] table (zero beyond width): the innermost axis's mask and coordinate tables (full
  // coordinate kernel; none for the separate filter), then ones (the row's sum, for the bias gradient).
  at::Tensor row_columns;
  int64_t row_width = 0;
};

struct GradTablesEntry {
  Geometry key;
  at::ScalarType dtype;
  GradTables tables;
};

// The process-wide cache of GradTables (coord_term.cpp; guarded by cache_mutex()).
std::vector<GradTablesEntry>& grad_tables_cache();

template <typename scalar_t, typename acc_t>
GradTables cached_grad_tables(const Geometry& g, const at::TensorOptions& acc_opts) {
  Geometry key = cache_key(g);
  key.has_bias = false;
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    for (const auto& e : grad_tables_cache()) {
      if (e.dtype == dtype && std::memcmp(&e.key, &key, sizeof(Geometry)) == 0) return e.tables;
    }
  }
  GradTables t;
  const at::Tensor ones = at::ones({g.out[2], 1}, acc_opts);
  at::Tensor columns;  // [OW, width]
  if (g.separate) {
    t.centre = centre_table<scalar_t, acc_t>(g, acc_opts);
    columns = ones;
  } else {
    t.axis = axis_tables<scalar_t, acc_t>(g, acc_opts);
    if (g.with_r) t.radius = radius_table<scalar_t, acc_t>(g, t.axis, acc_opts);
    columns = at::cat({t.axis.mask[2], t.axis.value[2], ones}, 1);
  }
  t.row_width = columns.size(1);
  t.row_columns = at::zeros({(t.row_width + 3) / 4 * 4, g.out[2]}, acc_opts);
  t.row_columns.narrow(0, 0, t.row_width).copy_(columns.t());
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& entries = grad_tables_cache();
  if (entries.size() >= kMaxCacheEntries) entries.clear();
  entries.push_back(GradTablesEntry{key, dtype, t});
  return t;
}

}  // namespace coordconv
