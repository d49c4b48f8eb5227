// coordconv-fused: the C++ side of the coordinate math and the kernel bodies shared by the CPU
// build (which also emulates the CUDA grid) and the CUDA build.
//
// Everything here is a transcription of coordconv_fused/coords.py, the one definition of the
// coordinate convention: along an axis of n positions, position i has coordinate
// (2*i - (n-1)) / (n-1) (an integer numerator, one correctly rounded division), 0 when n == 1; the
// radius is the correctly rounded sqrt of the sum of squares. Problems of rank 1 and 2 are lifted
// to three spatial axes (D, H, W) with leading axes of size 1, whose coordinate is 0.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CC_HD __host__ __device__ __forceinline__
#else
#define CC_HD inline
#endif

namespace coordconv {

enum PadMode : int32_t { kZeros = 0, kReflect = 1, kReplicate = 2, kCircular = 3 };

// The index arithmetic of one call, lifted to 3 spatial axes (index 0 = D, 1 = H, 2 = W).
struct Geometry {
  int64_t n, c_in, c_out, groups;
  int64_t padded[3];                             // spatial size of the (explicitly pre-padded) input
  int64_t image[3];                              // spatial size of the image before that padding
  int64_t before[3];                             // explicit pre-padding before the first element
  int64_t out[3];                                // output spatial size
  int64_t stride[3], pad[3], dil[3], kernel[3];  // pad: the convolution's symmetric zero padding
  int32_t ndim;                                  // 1, 2 or 3 (number of coordinate axes)
  int32_t num_coords;                            // ndim (+1 with the radius)
  int32_t pad_mode;                              // PadMode of the explicit pre-padding
  bool with_r, separate, has_bias;
  int64_t ystride[5];  // strides of the output, lifted to [N, C, D, H, W]
  // Element strides of coord_weight [C_out, d, *kernel] along d and along its flattened taps (rows
  // of k_coord elements): (taps, 1) contiguous, (1, d) channels-last.
  int64_t cw_cstride, cw_tstride;

  CC_HD int64_t taps() const { return kernel[0] * kernel[1] * kernel[2]; }
  CC_HD int64_t out_points() const { return out[0] * out[1] * out[2]; }
  CC_HD int64_t k_coord() const { return separate ? num_coords : num_coords * taps(); }
  CC_HD int64_t k_data() const { return (c_in / groups) * taps(); }
};

// (2*i - (n-1)) / (n-1), or 0 for n == 1; `num` is the integer numerator.
template <typename acc_t>
CC_HD acc_t axis_coord(int64_t num, int64_t n) {
  return n > 1 ? static_cast<acc_t>(num) / static_cast<acc_t>(n - 1) : acc_t(0);
}

// The image index that padded index i (possibly outside [0, n)) reads under a padding mode.
CC_HD int64_t map_index(int64_t i, int64_t n, int32_t mode) {
  switch (mode) {
    case kReflect:
      if (i < 0) i = -i;
      if (i >= n) i = 2 * (n - 1) - i;
      return i;
    case kReplicate:
      return i < 0 ? 0 : (i >= n ? n - 1 : i);
    case kCircular:
      return ((i % n) + n) % n;
    default:
      return i;
  }
}

// Coordinate value and 0/1 mask along axis `ax` for output index `o` and tap `t` (full filter).
// The position read is p = o*stride - pad + t*dil in the pre-padded input; outside it lies the
// convolution's zero padding (value 0, mask 0); with zero pre-padding, outside the image too.
template <typename acc_t>
CC_HD void axis_tap(const Geometry& g, int ax, int64_t o, int64_t t, acc_t* value, acc_t* mask) {
  int64_t p = o * g.stride[ax] - g.pad[ax] + t * g.dil[ax];
  int64_t n = g.image[ax];
  int64_t i = p - g.before[ax];
  bool inside = p >= 0 && p < g.padded[ax];
  if (g.pad_mode == kZeros) {
    inside = inside && i >= 0 && i < n;
  } else {
    i = map_index(i, n, g.pad_mode);
  }
  *value = inside ? axis_coord<acc_t>(2 * i - (n - 1), n) : acc_t(0);
  *mask = inside ? acc_t(1) : acc_t(0);
}

// Coordinate along axis `ax` of the centre of the receptive field of output index o (separate
// filter): h* = o*s - pad_before + dil*(k-1)/2, so 2*h* - (n-1) is an integer.
template <typename acc_t>
CC_HD acc_t axis_centre(const Geometry& g, int ax, int64_t o) {
  int64_t pad_before = g.before[ax] + g.pad[ax];
  int64_t num = 2 * g.stride[ax] * o + g.dil[ax] * (g.kernel[ax] - 1) - 2 * pad_before - (g.image[ax] - 1);
  return axis_coord<acc_t>(num, g.image[ax]);
}

// Lifted axis of coordinate channel c (c < ndim).
CC_HD int channel_axis(const Geometry& g, int64_t c) { return static_cast<int>(c + 3 - g.ndim); }

CC_HD float correctly_rounded_sqrt(float x) { return sqrtf(x); }
CC_HD double correctly_rounded_sqrt(double x) { return sqrt(x); }

// Value of coordinate channel c from the three per-axis values and masks, rounded to scalar_t as a
// concatenated coordinate channel would be, returned in acc_t.
template <typename scalar_t, typename acc_t>
CC_HD acc_t channel_value(const Geometry& g, int64_t c, const acc_t v[3], acc_t inside) {
  acc_t value;
  if (c < g.ndim) {
    // (selects with constant indices, not v[axis]: a runtime index would put v in local memory)
    const int ax = channel_axis(g, c);
    value = ax == 0 ? v[0] : (ax == 1 ? v[1] : v[2]);
  } else {
    value = inside * correctly_rounded_sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  }
  return static_cast<acc_t>(static_cast<scalar_t>(value));
}

// Column kc of the coordinate im2col matrix at output point (od, oh, ow): what the coordinate
// filter's weight kc multiplies.
template <typename scalar_t, typename acc_t>
CC_HD acc_t coord_im2col(const Geometry& g, int64_t kc, int64_t od, int64_t oh, int64_t ow) {
  const int64_t o[3] = {od, oh, ow};
  acc_t v[3];
  acc_t inside = acc_t(1);
  int64_t c;
  if (g.separate) {
    c = kc;
    for (int ax = 0; ax < 3; ++ax) v[ax] = axis_centre<acc_t>(g, ax, o[ax]);
  } else {
    c = kc / g.taps();
    int64_t t = kc % g.taps();
    const int64_t tap[3] = {t / (g.kernel[1] * g.kernel[2]), (t / g.kernel[2]) % g.kernel[1], t % g.kernel[2]};
    for (int ax = 0; ax < 3; ++ax) {
      acc_t m;
      axis_tap<acc_t>(g, ax, o[ax], tap[ax], &v[ax], &m);
      inside *= m;
    }
    // Axis channels: the coordinate is 0 wherever any axis is outside (zero padding).
    for (int ax = 0; ax < 3; ++ax) v[ax] *= inside;
  }
  return channel_value<scalar_t, acc_t>(g, c, v, inside);
}

// ---------------------------------------------------------------------------------------------
// Kernel bodies of the CUDA backend, one element per call, indexed by a flat index. A CUDA kernel
// calls them with blockIdx.x * blockDim.x + threadIdx.x; the CPU emulation calls them for every
// (block, thread) of the same grid. No barriers, no shared memory.

// Element idx = kc * points + p of the coordinate im2col matrix [k_coord, points]: what weight kc
// of the coordinate filter multiplies at output point p. (The coordinate term is this matrix times
// the filter, the filter's gradient the batch-summed output gradient times its transpose: two small
// GEMMs, one per call, whatever the batch.)
template <typename scalar_t, typename acc_t>
CC_HD void coord_cols_body(const Geometry& g, acc_t* cols, int64_t idx) {
  const int64_t points = g.out_points();
  const int64_t kc = idx / points, p = idx % points;
  cols[idx] = coord_im2col<scalar_t, acc_t>(g, kc, p / (g.out[2] * g.out[1]), (p / g.out[2]) % g.out[1], p % g.out[2]);
}

// The largest kernel extent along an axis for which the epilogue evaluates the coordinates itself;
// larger filters (whose term costs taps * num_coords multiply-adds per element) take the GEMM path
// of gpu_host.h.
constexpr int kMaxAxisTaps = 16;

// The coordinate terms of the V consecutive output channels o0 .. o0 + V - 1 at output point
// at = (od, oh, ow), into term[0 .. V): for each channel o, the sum over k of cw[o, k] times column k
// of the coordinate im2col matrix (coord_im2col). The coordinates are evaluated once for all V
// channels, tap by tap, from the separable structure: an axis's value and mask are computed in the
// loop over that axis's taps (kernel[0] + kernel[0] * kernel[1] + taps evaluations), a tap in the zero
// padding of any axis is skipped (it reads 0 from every channel, the radius included), and the other
// taps read the coordinate on their channel's axis. Everything stays in registers: no per-axis
// tables (measured as a 416-byte stack frame per thread on sm_90, in local memory). cw: [C_out,
// k_coord] rows of k_coord elements, laid out within a row as g.cw_cstride and g.cw_tstride say.
template <typename scalar_t, typename acc_t, int V>
CC_HD void coord_terms_at(const Geometry& g, const scalar_t* cw, int64_t o0, const int64_t at[3], acc_t term[V]) {
  const int64_t k_coord = g.k_coord();
  const scalar_t* w = cw + o0 * k_coord;
  for (int v = 0; v < V; ++v) term[v] = acc_t(0);
  if (g.separate) {  // (k_coord = num_coords columns: the centres' coordinates)
    for (int64_t c = 0; c < g.num_coords; ++c) {
      const acc_t col = coord_im2col<scalar_t, acc_t>(g, c, at[0], at[1], at[2]);
      for (int v = 0; v < V; ++v) term[v] += static_cast<acc_t>(w[v * k_coord + c * g.cw_cstride]) * col;
    }
    return;
  }
  acc_t x[3], inside;
  for (int64_t t0 = 0; t0 < g.kernel[0]; ++t0) {
    axis_tap<acc_t>(g, 0, at[0], t0, &x[0], &inside);
    if (inside == acc_t(0)) continue;
    for (int64_t t1 = 0; t1 < g.kernel[1]; ++t1) {
      axis_tap<acc_t>(g, 1, at[1], t1, &x[1], &inside);
      if (inside == acc_t(0)) continue;
      for (int64_t t2 = 0; t2 < g.kernel[2]; ++t2) {
        axis_tap<acc_t>(g, 2, at[2], t2, &x[2], &inside);
        if (inside == acc_t(0)) continue;
        const scalar_t* wt = w + ((t0 * g.kernel[1] + t1) * g.kernel[2] + t2) * g.cw_tstride;
        for (int64_t c = 0; c < g.num_coords; ++c) {
          const acc_t col = channel_value<scalar_t, acc_t>(g, c, x, acc_t(1));
          for (int v = 0; v < V; ++v) term[v] += static_cast<acc_t>(wt[v * k_coord + c * g.cw_cstride]) * col;
        }
      }
    }
  }
}

// V elements accessed as one (16 bytes where V * sizeof(scalar_t) is).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

// The coordinate terms plus the bias of the V consecutive elements (in memory order) from offset m of
// one sample, NCHW or channels-last, into term[0 .. V): in channels-last with C_out a multiple of V,
// V channels of one point, whose coordinates are evaluated once.
template <typename scalar_t, typename acc_t, int V>
CC_HD void sample_terms(const Geometry& g, const scalar_t* cw, const scalar_t* bias, bool channels_last, int64_t m,
                        acc_t term[V]) {
  const int64_t points = g.out_points();
  int64_t o = channels_last ? m % g.c_out : m / points;
  int64_t p = channels_last ? m / g.c_out : m % points;
  if (channels_last && g.c_out % V == 0) {  // V channels of one point: its coordinates evaluated once
    const int64_t at[3] = {p / (g.out[1] * g.out[2]), (p / g.out[2]) % g.out[1], p % g.out[2]};
    coord_terms_at<scalar_t, acc_t, V>(g, cw, o, at, term);
    if (bias != nullptr)
      for (int v = 0; v < V; ++v) term[v] += static_cast<acc_t>(bias[o + v]);
  } else {
    for (int v = 0; v < V; ++v) {
      const int64_t at[3] = {p / (g.out[1] * g.out[2]), (p / g.out[2]) % g.out[1], p % g.out[2]};
      coord_terms_at<scalar_t, acc_t, 1>(g, cw, o, at, &term[v]);
      if (bias != nullptr) term[v] += static_cast<acc_t>(bias[o]);
      if (channels_last) {  // (the next element in memory order)
        if (++o == g.c_out) {
          o = 0;
          ++p;
        }
      } else if (++p == points) {
        p = 0;
        ++o;
      }
    }
  }
}

// Epilogue with the coordinates evaluated in the kernel: y += P + bias in place, in acc_t with one
// rounding, for a dense output whose samples are sample = C_out * points elements apart, NCHW
// (channels_last false) or channels-last. Thread idx owns the V consecutive elements (in memory
// order) at offset m = (idx % (sample / V)) * V of samples [first, first + per_thread),
// first = idx / (sample / V) * per_thread: it computes their V terms once (in channels-last, V
// channels of one point, whose coordinates are then evaluated once) and adds them to each of those
// samples, by one V-element access per sample (V * sizeof(scalar_t) = 16 bytes where the
// host found sample a multiple of V and y 16-byte aligned; V = 1 otherwise), a few samples' loads
// issued before their stores. Consecutive threads: consecutive memory.
template <typename scalar_t, typename acc_t, int V>
CC_HD void coord_epilogue_body(const Geometry& g, const scalar_t* cw, const scalar_t* bias, scalar_t* y,
                               bool channels_last, int64_t per_thread, int64_t idx) {
  const int64_t sample = g.c_out * g.out_points(), slots = sample / V;
  const int64_t m = (idx % slots) * V, first = idx / slots * per_thread;
  acc_t term[V];
  sample_terms<scalar_t, acc_t, V>(g, cw, bias, channels_last, m, term);
  constexpr int kInFlight = 4;  // samples whose loads are issued together
  const int64_t last = first + per_thread < g.n ? first + per_thread : g.n;
  for (int64_t n = first; n < last; n += kInFlight) {
    Pack<scalar_t, V> pack[kInFlight];
    for (int u = 0; u < kInFlight; ++u)
      if (n + u < last) pack[u] = *reinterpret_cast<const Pack<scalar_t, V>*>(y + (n + u) * sample + m);
    for (int u = 0; u < kInFlight; ++u) {
      if (n + u >= last) break;
      for (int v = 0; v < V; ++v) pack[u].v[v] = static_cast<scalar_t>(static_cast<acc_t>(pack[u].v[v]) + term[v]);
      *reinterpret_cast<Pack<scalar_t, V>*>(y + (n + u) * sample + m) = pack[u];
    }
  }
}

// Elements per vector access of the epilogue: 16 bytes of scalar_t.
template <typename scalar_t>
constexpr int kEpilogueVecOf = 16 / sizeof(scalar_t) < 8 ? 16 / sizeof(scalar_t) : 8;

// The GEMM path's epilogue (filters beyond kMaxAxisTaps): elements per thread.
constexpr int kEpilogueVec = 4;

// The split epilogue, first kernel: term[m .. m + V) = the coordinate terms plus the bias of one
// sample (sample_terms), m = V * idx, in acc_t: each term computed once, whatever the batch.
template <typename scalar_t, typename acc_t, int V>
CC_HD void sample_term_body(const Geometry& g, const scalar_t* cw, const scalar_t* bias, acc_t* term,
                            bool channels_last, int64_t idx) {
  acc_t t[V];
  sample_terms<scalar_t, acc_t, V>(g, cw, bias, channels_last, V * idx, t);
  for (int v = 0; v < V; ++v) term[V * idx + v] = t[v];
}

// The split epilogue, second kernel: y[i .. i + V) += term[i % sample ...] in place, i = V * idx, by
// one V-element access (16 bytes where the host found sample a multiple of V and y 16-byte aligned;
// V = 1 otherwise): a pass over the output at the memory's pace, its one sample of terms read from
// cache.
template <typename scalar_t, typename acc_t, int V>
CC_HD void add_sample_term_body(const acc_t* term, scalar_t* y, int64_t sample, int64_t idx) {
  const int64_t i = V * idx, t = i % sample;
  Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(y + i);
  for (int v = 0; v < V; ++v) pack.v[v] = static_cast<scalar_t>(static_cast<acc_t>(pack.v[v]) + term[t + v]);
  *reinterpret_cast<Pack<scalar_t, V>*>(y + i) = pack;
}

// Epilogue: y += term in place for the kEpilogueVec elements from kEpilogueVec * idx of a dense
// output whose samples are `sample` elements apart (batch outermost: NCHW or channels-last),
// `term` holding one sample in y's memory order (coordinate term plus bias, in acc_t: one rounding).
template <typename scalar_t, typename acc_t>
CC_HD void add_term_body(const acc_t* term, scalar_t* y, int64_t sample, int64_t total, int64_t idx) {
  int64_t i = idx * kEpilogueVec;
  int64_t t = i % sample;
  for (int v = 0; v < kEpilogueVec && i < total; ++v, ++i) {
    y[i] = static_cast<scalar_t>(static_cast<acc_t>(y[i]) + term[t]);
    if (++t == sample) t = 0;
  }
}

}  // namespace coordconv
