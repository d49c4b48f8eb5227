// The pass of blocked_output.h: a channel-blocked output [N][C/b][OH][OW][b] read back into NCHW
// with the coordinate term added (header-only: the test extension runs it on buffers of every
// block size, whichever oneDNN produces on the machine at hand).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "../geometry.h"
#include "direct_simd.h"

#if defined(COORDCONV_HAVE_SIMD_KERNEL)
#include <immintrin.h>
#endif

namespace coordconv {

// The output's shape, as the pass reads and writes it.
struct OutputShape {
  int64_t n, c, oh, ow;
};

// The pass, over tasks (n, channel block, output row): y[n, c, oh, :] = the blocked row + the
// coordinate row of channel c (U + t V on the affine rows [lo, hi), else P's row).
struct BlockedPass {
  OutputShape s;
  int64_t block;
  const float* src;
  const float* P;   // [C, OH * OW]
  const float* uv;  // [2, C, OW] or null
  int64_t lo, hi;
  float* y;
};

#if defined(COORDCONV_HAVE_SIMD_KERNEL)
// Tasks [begin, end): channels in groups of 8 through an 8 x 8 register transpose (8 pixels' 8
// channels in, 8 channels' 8 pixels out), the rest (b = 1, or NHWC with C not a multiple of 8) one
// channel at a time.
__attribute__((target("avx2,fma"))) inline void blocked_pass_avx2(const BlockedPass& p, int64_t begin, int64_t end) {
  const OutputShape& s = p.s;
  const int64_t b = p.block, blocks = s.c / b, OW = s.ow, plane = s.oh * s.ow;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t oh = task % s.oh, nb = task / s.oh, cb = nb % blocks, n = nb / blocks;
    const float* row = p.src + (nb * plane + oh * OW) * b;
    const bool affine = p.uv != nullptr && oh >= p.lo && oh < p.hi;
    const float t = static_cast<float>(oh - p.lo);
    // channel c's coordinate row: u (+ t v where affine), and its output row
    const auto u_of = [&](int64_t c) { return affine ? p.uv + c * OW : p.P + c * plane + oh * OW; };
    const auto v_of = [&](int64_t c) { return p.uv + (s.c + c) * OW; };
    const auto y_of = [&](int64_t c) { return p.y + (n * s.c + c) * plane + oh * OW; };
    int64_t q = 0;
    for (; q + 8 <= b; q += 8) {
      const int64_t c0 = cb * b + q;
      const float* u[8];
      const float* v[8];
      float* yr[8];
      for (int k = 0; k < 8; ++k) {
        u[k] = u_of(c0 + k);
        v[k] = affine ? v_of(c0 + k) : nullptr;
        yr[k] = y_of(c0 + k);
      }
      const __m256 tv = _mm256_set1_ps(t);
      int64_t w = 0;
      for (; w + 8 <= OW; w += 8) {
        const float* r = row + w * b + q;
        const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + b), r2 = _mm256_loadu_ps(r + 2 * b),
                     r3 = _mm256_loadu_ps(r + 3 * b), r4 = _mm256_loadu_ps(r + 4 * b), r5 = _mm256_loadu_ps(r + 5 * b),
                     r6 = _mm256_loadu_ps(r + 6 * b), r7 = _mm256_loadu_ps(r + 7 * b);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
        const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        const __m256 ch[8] = {_mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
                              _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
                              _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
                              _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
        for (int k = 0; k < 8; ++k) {
          const __m256 coord = affine ? _mm256_fmadd_ps(tv, _mm256_loadu_ps(v[k] + w), _mm256_loadu_ps(u[k] + w))
                                      : _mm256_loadu_ps(u[k] + w);
          _mm256_storeu_ps(yr[k] + w, _mm256_add_ps(ch[k], coord));
        }
      }
      for (; w < OW; ++w)
        for (int k = 0; k < 8; ++k) yr[k][w] = row[w * b + q + k] + (affine ? u[k][w] + t * v[k][w] : u[k][w]);
    }
    for (; q < b; ++q) {
      const int64_t c = cb * b + q;
      const float* __restrict uc = u_of(c);
      float* __restrict yc = y_of(c);
      if (affine) {
        const float* __restrict vc = v_of(c);
        for (int64_t w = 0; w < OW; ++w) yc[w] = row[w * b + q] + (uc[w] + t * vc[w]);
      } else {
        for (int64_t w = 0; w < OW; ++w) yc[w] = row[w * b + q] + uc[w];
      }
    }
  }
}
#endif

// The pass over the whole output, in parallel (an x86 CPU with AVX2: blocked_output_eligible).
inline void run_blocked_pass(const BlockedPass& p) {
#if defined(COORDCONV_HAVE_SIMD_KERNEL)
  at::parallel_for(0, p.s.n * (p.s.c / p.block) * p.s.oh, grain_for(p.block * p.s.ow),
                   [&](int64_t begin, int64_t end) { blocked_pass_avx2(p, begin, end); });
#else
  TORCH_CHECK(false, "the blocked output pass needs an x86 CPU with AVX2");
#endif
}

}  // namespace coordconv
