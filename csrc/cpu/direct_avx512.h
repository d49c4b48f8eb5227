// AVX-512 direct CoordConv for shallow layers (float32, 1-D/2-D, NCHW, groups = 1).
//
// A network's first layer (C_in * kh * kw small) is bound by its output: oneDNN convolves, then the
// coordinate term costs a second pass over the output. This kernel writes each output element once.
//
// Two passes:
//  1. The input is copied into a zero-margined, stride-phase-split layout: every input row becomes
//     `sw` phase rows, phase p holding the columns p, p + sw, p + 2 sw, ... with zeros on both sides.
//     Then the input column read by tap tw for output column j, j * sw + tw * dw - pw, is column
//     j + floor(d / sw) of phase (d mod sw), d = tw * dw - pw: a tap reads 16 consecutive output
//     columns with one unmasked load, whatever the stride, and zero padding costs nothing.
//  2. Register tiles of kOcBlock output channels x kVecs vectors of 16 columns (16 accumulators)
//     start from the coordinate term P (closed form, see coord_term.h) plus the bias,
//     accumulate the data taps (kVecs loads and kOcBlock weight broadcasts feed kOcBlock * kVecs
//     FMAs), and are stored once. A row's last tile is narrower and its last vector is masked.
//
// The tile shape was measured: docs/tuning.md.
//
// Compiled with a target attribute and selected at run time (`avx512_supported()`), so the
// extension still builds and runs on CPUs without AVX-512.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../geometry.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define COORDCONV_HAVE_AVX512_KERNEL 1
#endif

namespace coordconv {

constexpr int64_t kOcBlock = 4;  // output channels per register tile
constexpr int64_t kVecs = 4;     // vectors of 16 output columns per register tile
constexpr int64_t kLanes = 16;   // float32 lanes per zmm

// Where the kernel beats oneDNN + the coordinate epilogue, as measured on one machine (docs/tuning.md).
constexpr int64_t kAvx512DirectMaxK = 150;  // C_in * kh * kw
constexpr int64_t kAvx512DirectMaxCin = 16;
inline bool avx512_direct_pays(const Geometry& g) {
  return g.k_data() <= kAvx512DirectMaxK && g.c_in <= kAvx512DirectMaxCin && (g.out[2] >= 3 * kLanes || g.c_in <= 4);
}

// The phase-split input of pass 1, for one (n, c, ih) input row: `stride` phase rows of `row_len`
// floats; output column j of tap (phase p, shift q) reads phase p at `margin + j + q`.
struct SplitLayout {
  int64_t stride, margin, row_len;
  int64_t floats_per_row() const { return stride * row_len; }
  // Offset of column tap tw's first read from the start of a row (precomputed: no division in the tap loop).
  int64_t tap_offset(const Geometry& g, int64_t tw) const;
};

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

inline int64_t SplitLayout::tap_offset(const Geometry& g, int64_t tw) const {
  const int64_t d = tw * g.dil[2] - g.pad[2], q = floor_div(d, stride);
  return (d - q * stride) * row_len + margin + q;
}

inline SplitLayout split_layout(const Geometry& g) {
  const int64_t sw = g.stride[2], W = g.padded[2], OW = g.out[2];
  const int64_t q_min = floor_div(-g.pad[2], sw), q_max = floor_div((g.kernel[2] - 1) * g.dil[2] - g.pad[2], sw);
  const int64_t margin = q_min < 0 ? -q_min : 0;
  const int64_t phase_len = (W + sw - 1) / sw;
  const int64_t cols = (OW + kLanes - 1) / kLanes * kLanes;  // every vector is loaded whole
  int64_t len = margin + (cols + (q_max > 0 ? q_max : 0) > phase_len ? cols + (q_max > 0 ? q_max : 0) : phase_len);
  len = (len + kLanes - 1) / kLanes * kLanes;
  return SplitLayout{sw, margin, len};
}

#ifdef COORDCONV_HAVE_AVX512_KERNEL

inline bool avx512_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// Pass 1: xs[(n * C + c) * H + ih] = the phase rows of x[n, c, ih, :].
inline void split_input(const Geometry& g, const SplitLayout& s, const float* x, float* xs) {
  const int64_t W = g.padded[2], rows = g.n * g.c_in * g.padded[1];
  at::parallel_for(0, rows, grain_for(s.floats_per_row()), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* src = x + r * W;
      float* dst = xs + r * s.floats_per_row();
      std::memset(dst, 0, sizeof(float) * s.floats_per_row());
      if (s.stride == 1) {
        std::memcpy(dst + s.margin, src, sizeof(float) * W);
      } else {
        for (int64_t p = 0; p < s.stride && p < W; ++p) {
          float* phase = dst + p * s.row_len + s.margin;
          const int64_t len = (W - p + s.stride - 1) / s.stride;
          for (int64_t q = 0; q < len; ++q) phase[q] = src[q * s.stride + p];
        }
      }
    }
  });
}

// One register tile (P may be null: no coordinate term, e.g. for an input gradient): output channels oc0 .. oc0 +
// kOcBlock - 1 (those >= C_out computed from zero weights and not stored), columns j0 .. j0 + 16 * VECS - 1 of output
// row oh of sample n; `tail` masks the last vector's lanes. wpack: [C_in * KH * KW][oc_padded], tap-major, zero-filled
// past C_out.
template <int VECS>
__attribute__((target("avx512f"), always_inline)) inline void direct_tile(const Geometry& g, const SplitLayout& s,
                                                                          const int64_t* tap_offsets, const float* xs,
                                                                          const float* wpack, int64_t oc_padded,
                                                                          const float* P, const float* bias, float* y,
                                                                          int64_t n, int64_t oh, int64_t oc0,
                                                                          int64_t j0, __mmask16 tail) {
  const int64_t H = g.padded[1], OH = g.out[1], OW = g.out[2];
  const int64_t KH = g.kernel[1], KW = g.kernel[2], C = g.c_in;
  const int64_t on = g.c_out - oc0 < kOcBlock ? g.c_out - oc0 : kOcBlock;
  // Start from the bias; P is added at the end, its lines prefetched now (read first, a P line from
  // L3 would hold up every FMA chain of the tile).
  __m512 acc[kOcBlock][VECS];
  const float* prow[kOcBlock];
#pragma GCC unroll 4
  for (int o = 0; o < kOcBlock; ++o) {
    const int64_t oc = oc0 + (o < on ? o : 0);
    prow[o] = P ? P + (oc * OH + oh) * OW + j0 : nullptr;
    const __m512 b = _mm512_set1_ps(bias ? bias[oc] : 0.0f);
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) {
      if (P) _mm_prefetch(reinterpret_cast<const char*>(prow[o] + kLanes * v), _MM_HINT_T0);
      acc[o][v] = b;
    }
  }
  for (int64_t ci = 0; ci < C; ++ci) {
    for (int64_t th = 0; th < KH; ++th) {
      const int64_t ih = oh * g.stride[1] - g.pad[1] + th * g.dil[1];
      if (ih < 0 || ih >= H) continue;  // a zero-padding row
      const float* rows = xs + ((n * C + ci) * H + ih) * s.floats_per_row() + j0;
      const float* wt = wpack + ((ci * KH + th) * KW) * oc_padded + oc0;
      for (int64_t tw = 0; tw < KW; ++tw, wt += oc_padded) {
        const float* row = rows + tap_offsets[tw];
        __m512 xv[VECS];
#pragma GCC unroll 4
        for (int v = 0; v < VECS; ++v) xv[v] = _mm512_loadu_ps(row + kLanes * v);
#pragma GCC unroll 4
        for (int o = 0; o < kOcBlock; ++o) {
          const __m512 w = _mm512_set1_ps(wt[o]);
#pragma GCC unroll 4
          for (int v = 0; v < VECS; ++v) acc[o][v] = _mm512_fmadd_ps(w, xv[v], acc[o][v]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int o = 0; o < kOcBlock; ++o) {
    if (o >= on) break;
    float* yrow = y + ((n * g.c_out + oc0 + o) * OH + oh) * OW + j0;
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) {
      const __mmask16 m = v == VECS - 1 ? tail : __mmask16(0xffff);
      if (P) acc[o][v] = _mm512_add_ps(acc[o][v], _mm512_maskz_loadu_ps(m, prow[o] + kLanes * v));
      _mm512_mask_storeu_ps(yrow + kLanes * v, m, acc[o][v]);
    }
  }
}

// Items [begin, end) of (sample, channel block, output row), each: full tiles along the row, then
// one narrower tile for the rest.
__attribute__((target("avx512f"))) inline void direct_items(const Geometry& g, const SplitLayout& s,
                                                            const int64_t* tap_offsets, const float* xs,
                                                            const float* wpack, int64_t oc_padded, const float* P,
                                                            const float* bias, float* y, int64_t begin, int64_t end) {
  const int64_t blocks = (g.c_out + kOcBlock - 1) / kOcBlock, OH = g.out[1], OW = g.out[2];
  static_assert(kVecs == 4, "the switch below covers rests of 1 to kVecs vectors");
  const int64_t full = OW / (kVecs * kLanes) * (kVecs * kLanes), rest = OW - full;
  const __mmask16 tail = static_cast<__mmask16>((1u << ((rest + kLanes - 1) % kLanes + 1)) - 1);
  for (int64_t item = begin; item < end; ++item) {
    // rows innermost: a thread streams through kOcBlock output planes (and the same planes of P) at a time
    const int64_t oh = item % OH, oc0 = (item / OH) % blocks * kOcBlock, n = item / (blocks * OH);
    for (int64_t j0 = 0; j0 < full; j0 += kVecs * kLanes)
      direct_tile<kVecs>(g, s, tap_offsets, xs, wpack, oc_padded, P, bias, y, n, oh, oc0, j0, __mmask16(0xffff));
    switch ((rest + kLanes - 1) / kLanes) {
      case 0:
        break;
      case 1:
        direct_tile<1>(g, s, tap_offsets, xs, wpack, oc_padded, P, bias, y, n, oh, oc0, full, tail);
        break;
      case 2:
        direct_tile<2>(g, s, tap_offsets, xs, wpack, oc_padded, P, bias, y, n, oh, oc0, full, tail);
        break;
      case 3:
        direct_tile<3>(g, s, tap_offsets, xs, wpack, oc_padded, P, bias, y, n, oh, oc0, full, tail);
        break;
      default:
        direct_tile<4>(g, s, tap_offsets, xs, wpack, oc_padded, P, bias, y, n, oh, oc0, full, tail);
        break;
    }
  }
}

// The whole output: (sample, channel block, row) items in parallel. xs: the pass-1 buffer.
inline void direct_forward_avx512(const Geometry& g, const SplitLayout& s, const float* x, float* xs,
                                  const float* wpack, int64_t oc_padded, const float* P, const float* bias, float* y) {
  // (a profiler event: tests and users see which layers take this kernel)
  RECORD_FUNCTION("coordconv_fused::avx512_direct", c10::ArrayRef<const c10::IValue>{});
  split_input(g, s, x, xs);
  std::vector<int64_t> tap_offsets(g.kernel[2]);
  for (int64_t tw = 0; tw < g.kernel[2]; ++tw) tap_offsets[tw] = s.tap_offset(g, tw);
  const int64_t items = g.n * g.out[1] * ((g.c_out + kOcBlock - 1) / kOcBlock);
  at::parallel_for(0, items, grain_for(kOcBlock * g.out[2] * g.k_data()), [&](int64_t begin, int64_t end) {
    direct_items(g, s, tap_offsets.data(), xs, wpack, oc_padded, P, bias, y, begin, end);
  });
}

#else

inline bool avx512_supported() { return false; }

inline void direct_forward_avx512(const Geometry&, const SplitLayout&, const float*, float*, const float*, int64_t,
                                  const float*, const float*, float*) {}

#endif

}  // namespace coordconv
