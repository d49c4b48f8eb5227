// AVX-512 direct CoordConv for shallow layers (float32, 2-D, NCHW, groups = 1).
//
// A network's first layer (C_in * kh * kw small) is memory-bound around its output: oneDNN
// convolves, then the coordinate term costs a second pass over the output. This kernel writes each
// output element once: a register tile of 16 output channels x 16 output columns starts from the
// coordinate term P (computed in closed form, see coordconv_cpu.cpp) plus the bias, accumulates the
// data taps with FMAs (one input vector load serves 16 FMAs; weights are broadcast from a packed
// [tap][C_out] copy), and is stored once. Zero padding and the ragged right edge are lane masks;
// stride 2 along W de-interleaves two masked loads with one permute; other strides gather.
//
// Compiled with a target attribute and selected at run time (`avx512_supported()`), so the
// extension still builds and runs on CPUs without AVX-512.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "../coordconv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define COORDCONV_HAVE_AVX512_KERNEL 1
#endif

namespace coordconv {

// Depth C_in * kh * kw up to which the AVX-512 direct kernel replaces oneDNN + epilogue. Measured
// interleaved on the 2-core AVX-512 CI machine (median ratio to nn.Conv2d, 2 threads; kernel vs
// oneDNN + epilogue): 1x1 3 -> 8 (the paper's ImageNet CoordConv layer) 0.51x vs 1.34x; 1x1 3 -> 32
// 1.06x vs 1.46x; 1x1 8 -> 32 1.24x vs 1.40x; 3x3 1 -> 32 1.38x vs 1.68x; 3x3 2 -> 32 1.26x vs 1.55x;
// 3x3 3 -> 32 1.56x vs 1.47x; 7x7/2 3 -> 64 1.37x vs 1.35x. It wins up to depth 18, where the
// output pass it saves outweighs oneDNN's better FMA scheduling.
constexpr int64_t kAvx512DirectMaxK = 20;

#ifdef COORDCONV_HAVE_AVX512_KERNEL

inline bool avx512_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

constexpr int64_t kOcBlock = 16;  // output channels per register tile
constexpr int64_t kLanes = 16;    // float32 lanes per zmm

// Lanes [lo, hi) set, 0 <= lo, hi <= 64.
inline uint64_t lane_range(int64_t lo, int64_t hi) {
  if (hi <= lo) return 0;
  const uint64_t upto_hi = hi >= 64 ? ~uint64_t{0} : (uint64_t{1} << hi) - 1;
  return upto_hi & ~((uint64_t{1} << lo) - 1);
}

// One vector of 16 input values for output columns j0..j0+15: lane l holds x[start + l * SW]
// (SW = 0: the stride `sw` at run time), zero outside [0, W) (zero padding) and in lanes >= `lanes`.
// Each stride has its own instantiation so that the tap loop holds no other path's registers (the
// 16 accumulators must stay in registers).
template <int SW>
__attribute__((target("avx512f"), always_inline)) inline __m512 load_taps(const float* row, int64_t start,
                                                                          int64_t sw, int64_t W, int64_t lanes) {
  // Masked-off lanes are not read (no fault), so the base pointer may lie before or after the row.
  const float* base = reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(row) +
                                                     start * static_cast<intptr_t>(sizeof(float)));
  if constexpr (SW == 1) {
    const uint64_t m = lane_range(start < 0 ? -start : 0, W - start < lanes ? W - start : lanes);
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), base);
  } else if constexpr (SW == 2) {
    // the 32 columns start..start+31, then the even ones
    const uint64_t m = lane_range(start < 0 ? -start : 0, W - start < 2 * lanes - 1 ? W - start : 2 * lanes - 1);
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), base);
    const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), base + 16);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutex2var_ps(a, even, b);
  } else {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(start)),
                                         _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(sw))));
    const __mmask16 m = _mm512_cmpge_epi32_mask(col, _mm512_setzero_si512()) &
                        _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(W))) &
                        static_cast<__mmask16>(lane_range(0, lanes));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, row, 4);
  }
}

// y[n, o, oh, :] for one image row and one block of <= 16 output channels.
// wpack: [C_in * KH * KW][oc_padded] (tap-major, zero-filled to a multiple of 16 channels).
template <int SW>
__attribute__((target("avx512f"))) void direct_row_avx512(const Geometry& g, const float* x, const float* wpack,
                                                          int64_t oc_padded, const float* P, const float* bias,
                                                          float* y, int64_t n, int64_t oh, int64_t oc0) {
  const int64_t H = g.padded[1], W = g.padded[2], OH = g.out[1], OW = g.out[2];
  const int64_t KH = g.kernel[1], KW = g.kernel[2], C = g.c_in;
  const int64_t sw = g.stride[2], dw = g.dil[2], pw = g.pad[2];
  const int64_t on = g.c_out - oc0 < kOcBlock ? g.c_out - oc0 : kOcBlock;
  for (int64_t j0 = 0; j0 < OW; j0 += kLanes) {
    const int64_t lanes = OW - j0 < kLanes ? OW - j0 : kLanes;
    const __mmask16 store = static_cast<__mmask16>(lane_range(0, lanes));
    // 16 named accumulators: held in an array, GCC stored all 16 to the stack after every tap.
#define COORDCONV_REPEAT16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
    // start: P + bias (channels past C_out in the last block compute a copy of channel oc0, never stored)
#define COORDCONV_OC(o) (oc0 + (o < on ? o : 0))
#define COORDCONV_INIT(o)                                                                        \
  __m512 acc##o = _mm512_add_ps(_mm512_maskz_loadu_ps(store, P + (COORDCONV_OC(o) * OH + oh) * OW + j0), \
                                _mm512_set1_ps(bias ? bias[COORDCONV_OC(o)] : 0.0f));
#define COORDCONV_FMA(o) acc##o = _mm512_fmadd_ps(_mm512_set1_ps(wt[o]), v, acc##o);
#define COORDCONV_STORE(o) \
  if (o < on) _mm512_mask_storeu_ps(y + ((n * g.c_out + oc0 + o) * OH + oh) * OW + j0, store, acc##o);
    COORDCONV_REPEAT16(COORDCONV_INIT)
    const int64_t col0 = j0 * sw - pw;
    for (int64_t ci = 0; ci < C; ++ci) {
      for (int64_t th = 0; th < KH; ++th) {
        const int64_t ih = oh * g.stride[1] - g.pad[1] + th * g.dil[1];
        if (ih < 0 || ih >= H) continue;  // a zero-padding row
        const float* row = x + ((n * C + ci) * H + ih) * W;
        const float* wt = wpack + ((ci * KH + th) * KW) * oc_padded + oc0;
        for (int64_t tw = 0; tw < KW; ++tw, wt += oc_padded) {
          const __m512 v = load_taps<SW>(row, col0 + tw * dw, sw, W, lanes);
          COORDCONV_REPEAT16(COORDCONV_FMA)
        }
      }
    }
    COORDCONV_REPEAT16(COORDCONV_STORE)
#undef COORDCONV_STORE
#undef COORDCONV_FMA
#undef COORDCONV_INIT
#undef COORDCONV_OC
#undef COORDCONV_REPEAT16
  }
}

// The whole output: rows x output-channel blocks in parallel.
inline void direct_forward_avx512(const Geometry& g, const float* x, const float* wpack, int64_t oc_padded,
                                  const float* P, const float* bias, float* y) {
  const int64_t blocks = oc_padded / kOcBlock, OH = g.out[1];
  auto row = g.stride[2] == 1 ? &direct_row_avx512<1> : g.stride[2] == 2 ? &direct_row_avx512<2> : &direct_row_avx512<0>;
  at::parallel_for(0, g.n * OH * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item % blocks, oh = (item / blocks) % OH, n = item / (blocks * OH);
      row(g, x, wpack, oc_padded, P, bias, y, n, oh, b * kOcBlock);
    }
  });
}

#else

inline bool avx512_supported() { return false; }

inline void direct_forward_avx512(const Geometry&, const float*, const float*, int64_t, const float*, const float*,
                                  float*) {}

#endif

}  // namespace coordconv
