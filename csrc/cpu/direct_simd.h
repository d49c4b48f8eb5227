// Direct CoordConv for shallow layers (float32, 1-D/2-D, NCHW, groups = 1), in AVX-512 and AVX2.
//
// A network's first layer (C_in * kh * kw small) is bound by its output: oneDNN convolves, then the
// coordinate term costs a second pass over the output. This kernel writes each output element once.
//
// Two passes:
//  1. The input is copied into a zero-margined, stride-phase-split layout: every input row becomes
//     `sw` phase rows, phase p holding the columns p, p + sw, p + 2 sw, ... with zeros on both sides.
//     Then the input column read by tap tw for output column j, j * sw + tw * dw - pw, is column
//     j + floor(d / sw) of phase (d mod sw), d = tw * dw - pw: a tap reads a vector of consecutive
//     output columns with one unmasked load, whatever the stride, and zero padding costs nothing.
//  2. Register tiles of OCB output channels x VECS vectors of columns start from the bias,
//     accumulate the data taps (VECS loads and OCB weight broadcasts feed OCB * VECS FMAs), add
//     the coordinate term (closed form, see coord_term.h: from two small tables on the rows where
//     it is affine, from the output-sized P on the border rows) and are stored once. A row's last
//     tile is narrower and its last vector partial; output rows go in bands across channel blocks.
//     The tile's arithmetic runs at ~85% of the FMA peak from L1; what it loses beyond that is
//     memory (the input rows that miss L1, docs/tuning.md), hence the bands and the small tables.
//
// The tile is written once, over GCC vector types (`F32x16`, `F32x8`), and compiled for each ISA and
// tile shape by an entry function with that target (`direct_items_avx512`, `direct_items_avx512_6x4`,
// `direct_items_avx2`, ...), selected at run time: the extension builds and runs on any x86-64 CPU.
// AVX-512 has three tile shapes, 4 and 6 channels x 4 vectors, and 3 channels x 6 vectors for
// convolutions of at most 3 output channels: which is faster depends on the microarchitecture and
// the layer (4 x 4 on a Zen 4's 3->32 layer, 6 x 4 on a Xeon's 7x7 stem, docs/tuning.md), so each is
// a candidate of the measured choice where it applies (kernel_choice.h). AVX2 has half the
// registers: 4 channels x 3 vectors (measured, docs/tuning.md), and 3 x 4 for at most 3 output
// channels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../geometry.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define COORDCONV_HAVE_SIMD_KERNEL 1
#endif

namespace coordconv {

// The instruction sets the kernel is compiled for (and a direct implementation of kernel_choice.h).
enum class Isa { kAvx512, kAvx2 };

constexpr int64_t kOcBlock = 4;      // output channels per register tile (AVX2, and AVX-512's first shape)
constexpr int64_t kOcBlockWide = 6;  // ...per tile of AVX-512's second shape (24 accumulators)
// ...per tile of the 3-channel shapes, AVX-512's 3 x 6 vectors (18 accumulators) and AVX2's 3 x 4 (12):
// for convolutions with at most 3 output channels, chiefly the input gradient of an RGB input layer,
// where a 4-channel tile leaves a quarter of its FMAs idle (docs/tuning.md)
constexpr int64_t kOcBlockNarrow = 3;
constexpr int kNarrowVecs = 6;  // (AVX-512)
constexpr int kNarrowVecsAvx2 = 4;
constexpr int64_t kLanes = 16;  // the layout's vector unit: float32 lanes of a zmm (two ymm)

// Where the AVX-512 kernel beats oneDNN + the coordinate epilogue, as measured on one machine
// (docs/tuning.md): the fixed rule of COORDCONV_CPU_KERNEL=heuristic.
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

#ifdef COORDCONV_HAVE_SIMD_KERNEL

inline bool isa_supported(Isa isa) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == Isa::kAvx512 ? avx512 : avx2;
}

// Pass 1: xs[(n * C + c) * H + ih] = the phase rows of x[n, c, ih, :]: each phase row its zero
// margin, its columns, zeros to the end (only the margins are cleared; strides 1 and 2, the common
// ones, copy with constant strides the compiler vectorises).
inline void split_input(const Geometry& g, const SplitLayout& s, const float* x, float* xs) {
  const int64_t W = g.padded[2], rows = g.n * g.c_in * g.padded[1], sw = s.stride;
  at::parallel_for(0, rows, grain_for(s.floats_per_row()), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict src = x + r * W;
      float* dst = xs + r * s.floats_per_row();
      for (int64_t p = 0; p < sw; ++p) {
        float* phase = dst + p * s.row_len;
        const int64_t len = p < W ? (W - p + sw - 1) / sw : 0;
        std::memset(phase, 0, sizeof(float) * s.margin);
        std::memset(phase + s.margin + len, 0, sizeof(float) * (s.row_len - s.margin - len));
      }
      float* __restrict p0 = dst + s.margin;
      if (sw == 1) {
        std::memcpy(p0, src, sizeof(float) * W);
      } else if (sw == 2) {
        float* __restrict p1 = p0 + s.row_len;
        for (int64_t q = 0; q < W / 2; ++q) {
          p0[q] = src[2 * q];
          p1[q] = src[2 * q + 1];
        }
        if (W % 2 != 0) p0[W / 2] = src[W - 1];
      } else {
        for (int64_t p = 0; p < sw && p < W; ++p) {
          float* phase = p0 + p * s.row_len;
          const int64_t len = (W - p + sw - 1) / sw;
          for (int64_t q = 0; q < len; ++q) phase[q] = src[q * sw + p];
        }
      }
    }
  });
}

// Vectors of float32, loaded from and stored to any float address by memcpy (unaligned moves; an
// aligned(4) typedef would lose its attribute as a template argument).
typedef float F32x16 __attribute__((vector_size(64)));
typedef float F32x8 __attribute__((vector_size(32)));

template <typename V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// The arguments every tile of one call shares.
struct DirectArgs {
  const Geometry* g;
  const SplitLayout* s;
  const int64_t* tap_offsets;
  const float *xs, *wpack;
  // The coordinate term, if any (none e.g. for an input gradient): output rows [lo, hi) add
  // U + (oh - lo) V (uv: [2, C_out, OW], coord_term.h's AffineRows; may be null), the others P's
  // row (P: [C_out, OH, OW]; null: no coordinate term).
  const float *P, *uv;
  int64_t lo, hi;
  const float* bias;
  float* y;
};

// One register tile: output channels oc0 .. oc0 + OCB - 1 (those >= C_out computed from zero
// weights and not stored), columns j0 .. j0 + VECS * lanes - 1 of output row oh of sample n, of which
// the first `width` are stored. wpack: [C_out / BLOCK (rounded up)][C_in * KH * KW][BLOCK], each
// channel block's weights together, tap-major, zero past C_out; a tile computes the first OCB
// channels of its block (OCB < BLOCK: the narrower tile of a last block with few channels left).
template <typename V, int VECS, int OCB, int BLOCK = OCB>
__attribute__((always_inline)) inline void direct_tile(const DirectArgs& a, int64_t n, int64_t oh, int64_t oc0,
                                                       int64_t j0, int64_t width) {
  constexpr int64_t lanes = sizeof(V) / sizeof(float);
  const Geometry& g = *a.g;
  const int64_t H = g.padded[1], OH = g.out[1], OW = g.out[2];
  const int64_t KH = g.kernel[1], KW = g.kernel[2], C = g.c_in;
  const int64_t on = g.c_out - oc0 < OCB ? g.c_out - oc0 : OCB;
  const bool affine = a.uv != nullptr && oh >= a.lo && oh < a.hi;
  const float* P = affine ? nullptr : a.P;
  // Start from the bias; the coordinate term is added at the end, P's lines prefetched now (read
  // first, a P line from L3 would hold up every FMA chain of the tile).
  V acc[OCB][VECS];
#pragma GCC unroll 8
  for (int o = 0; o < OCB; ++o) {
    const int64_t oc = oc0 + (o < on ? o : 0);
    const float b = a.bias != nullptr ? a.bias[oc] : 0.0f;
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) {
      if (P != nullptr) __builtin_prefetch(P + (oc * OH + oh) * OW + j0 + lanes * v);
      acc[o][v] = V{} + b;
    }
  }
  const float* wblock = a.wpack + oc0 * g.k_data();  // = (oc0 / BLOCK) * K * BLOCK
  const int64_t fpr = a.s->floats_per_row();
  for (int64_t ci = 0; ci < C; ++ci) {
    for (int64_t th = 0; th < KH; ++th) {
      const int64_t ih = oh * g.stride[1] - g.pad[1] + th * g.dil[1];
      if (ih < 0 || ih >= H) continue;  // a zero-padding row
      const float* rows = a.xs + ((n * C + ci) * H + ih) * fpr + j0;
      const float* wt = wblock + ((ci * KH + th) * KW) * BLOCK;
      for (int64_t tw = 0; tw < KW; ++tw, wt += BLOCK) {
        const float* row = rows + a.tap_offsets[tw];
        V xv[VECS];
#pragma GCC unroll 8
        for (int v = 0; v < VECS; ++v) xv[v] = load<V>(row + lanes * v);
#pragma GCC unroll 8
        for (int o = 0; o < OCB; ++o) {
#pragma GCC unroll 8
          for (int v = 0; v < VECS; ++v) acc[o][v] += wt[o] * xv[v];  // contracted to FMAs
        }
      }
    }
  }
  const float t = static_cast<float>(oh - a.lo);
#pragma GCC unroll 8
  for (int o = 0; o < OCB; ++o) {  // (constant indices: the accumulators stay in registers)
    if (o >= on) break;
    const int64_t plane = (n * g.c_out + oc0 + o) * OH + oh;
    const float* prow = P != nullptr ? P + ((oc0 + o) * OH + oh) * OW + j0 : nullptr;
    const float* urow = affine ? a.uv + (oc0 + o) * OW + j0 : nullptr;
    const float* vrow = affine ? urow + g.c_out * OW : nullptr;
    float* yrow = a.y + plane * OW + j0;
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) {
      const int64_t left = width - lanes * v;  // columns of this vector to store
      V out = acc[o][v];
      if (left >= lanes) {
        if (affine) {
          out += load<V>(urow + lanes * v) + t * load<V>(vrow + lanes * v);
        } else if (prow != nullptr) {
          out += load<V>(prow + lanes * v);
        }
        store<V>(yrow + lanes * v, out);
      } else {  // the row's partial last vector (the tables and y end there), through a buffer
        float part[lanes];
        store<V>(part, out);
        for (int64_t l = 0; l < left; ++l) {
          const int64_t j = lanes * v + l;
          yrow[j] = part[l] + (affine ? urow[j] + t * vrow[j] : prow != nullptr ? prow[j] : 0.0f);
        }
      }
    }
  }
}

// The narrower tile of a row's rest: `vecs` (1 .. VECS) vectors.
template <typename V, int VECS, int OCB, int BLOCK = OCB>
__attribute__((always_inline)) inline void rest_tile(const DirectArgs& a, int64_t n, int64_t oh, int64_t oc0,
                                                     int64_t j0, int64_t width, int64_t vecs) {
  if constexpr (VECS > 0) {
    if (vecs == VECS) return direct_tile<V, VECS, OCB, BLOCK>(a, n, oh, oc0, j0, width);
    rest_tile<V, VECS - 1, OCB, BLOCK>(a, n, oh, oc0, j0, width, vecs);
  }
}

// One output row of one channel block: full tiles along the row, then one narrower tile for the rest.
template <typename V, int VECS, int OCB, int BLOCK = OCB>
__attribute__((always_inline)) inline void direct_row(const DirectArgs& a, int64_t n, int64_t oh, int64_t oc0) {
  constexpr int64_t lanes = sizeof(V) / sizeof(float), tile = VECS * lanes;
  const int64_t OW = a.g->out[2], full = OW / tile * tile, rest = OW - full;
  for (int64_t j0 = 0; j0 < full; j0 += tile) direct_tile<V, VECS, OCB, BLOCK>(a, n, oh, oc0, j0, tile);
  if (rest > 0) rest_tile<V, VECS, OCB, BLOCK>(a, n, oh, oc0, full, rest, (rest + lanes - 1) / lanes);
}

// Output rows per band (see direct_items).
constexpr int64_t kBandRows = 16;

// Items [begin, end) of (sample, channel block, output row), each one row of one block (direct_row),
// in the order sample, band of kBandRows output rows, channel block, row: every channel block of a
// band reads the band's input rows while they are in cache (about kBandRows * stride + kh rows of
// C_in channels; rows innermost had each block stream the whole input through the cache again), and
// a thread's rows are in one part of the input.
template <typename V, int VECS, int OCB>
__attribute__((always_inline)) inline void direct_items(const DirectArgs& a, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const int64_t blocks = (g.c_out + OCB - 1) / OCB, OH = g.out[1];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / (blocks * OH), i = item % (blocks * OH);
    const int64_t band = i / (blocks * kBandRows), rows = std::min(kBandRows, OH - band * kBandRows);
    const int64_t k = i - band * blocks * kBandRows, oc0 = k / rows * OCB, oh = band * kBandRows + k % rows;
    if constexpr (OCB > kOcBlock) {
      // a last block of at most kOcBlock channels in a tile of kOcBlock (e.g. 64 = 10 x 6 + 4)
      if (g.c_out - oc0 <= kOcBlock) {
        direct_row<V, VECS, kOcBlock, OCB>(a, n, oh, oc0);
        continue;
      }
    }
    direct_row<V, VECS, OCB>(a, n, oh, oc0);
  }
}

// The entry points, one per ISA and tile shape: the tile compiled for its registers (32 zmm: 4 x 4 or
// 6 x 4 accumulators of 16 floats beside the 4 input vectors and a broadcast weight, or 3 x 6 beside
// 6 input vectors; 16 ymm: 4 x 3 of 8, with the 3 input vectors and the broadcast weight all 16, no
// spill, or 3 x 4, 12 accumulators: faster than 4 x 3 on 3 channels, docs/tuning.md).
__attribute__((target("avx512f"))) inline void direct_items_avx512(const DirectArgs& a, int64_t begin, int64_t end) {
  direct_items<F32x16, 4, kOcBlock>(a, begin, end);
}
__attribute__((target("avx512f"))) inline void direct_items_avx512_6x4(const DirectArgs& a, int64_t begin,
                                                                       int64_t end) {
  direct_items<F32x16, 4, kOcBlockWide>(a, begin, end);
}
__attribute__((target("avx512f"))) inline void direct_items_avx512_3x6(const DirectArgs& a, int64_t begin,
                                                                       int64_t end) {
  direct_items<F32x16, kNarrowVecs, kOcBlockNarrow>(a, begin, end);
}
__attribute__((target("avx2,fma"))) inline void direct_items_avx2(const DirectArgs& a, int64_t begin, int64_t end) {
  direct_items<F32x8, 3, kOcBlock>(a, begin, end);
}
__attribute__((target("avx2,fma"))) inline void direct_items_avx2_3x4(const DirectArgs& a, int64_t begin, int64_t end) {
  direct_items<F32x8, kNarrowVecsAvx2, kOcBlockNarrow>(a, begin, end);
}

// The whole output: (sample, channel block, row) items in parallel, in tiles of `oc_block` (kOcBlock,
// or kOcBlockWide or kOcBlockNarrow in AVX-512) channels. xs: the pass-1 buffer; wpack: the weights,
// [block][tap][oc_block] (pack_weights); P, uv, lo, hi: the coordinate term as in DirectArgs.
inline void direct_forward_simd(Isa isa, int64_t oc_block, const Geometry& g, const SplitLayout& s, const float* x,
                                float* xs, const float* wpack, const float* P, const float* uv, int64_t lo, int64_t hi,
                                const float* bias, float* y) {
  // (a profiler event: tests and users see which layers take which kernel)
  RECORD_FUNCTION(isa == Isa::kAvx512 ? "coordconv_fused::avx512_direct" : "coordconv_fused::avx2_direct",
                  c10::ArrayRef<const c10::IValue>{});
  split_input(g, s, x, xs);
  std::vector<int64_t> tap_offsets(g.kernel[2]);
  for (int64_t tw = 0; tw < g.kernel[2]; ++tw) tap_offsets[tw] = s.tap_offset(g, tw);
  const DirectArgs args{&g, &s, tap_offsets.data(), xs, wpack, P, uv, lo, hi, bias, y};
  TORCH_INTERNAL_ASSERT(oc_block == kOcBlock || oc_block == kOcBlockNarrow ||
                        (isa == Isa::kAvx512 && oc_block == kOcBlockWide));
  const int64_t items = g.n * g.out[1] * ((g.c_out + oc_block - 1) / oc_block);
  at::parallel_for(0, items, grain_for(oc_block * g.out[2] * g.k_data()), [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) {
      if (oc_block == kOcBlockWide) {
        direct_items_avx512_6x4(args, begin, end);
      } else if (oc_block == kOcBlockNarrow) {
        direct_items_avx512_3x6(args, begin, end);
      } else {
        direct_items_avx512(args, begin, end);
      }
    } else if (oc_block == kOcBlockNarrow) {
      direct_items_avx2_3x4(args, begin, end);
    } else {
      direct_items_avx2(args, begin, end);
    }
  });
}

#else

inline bool isa_supported(Isa) { return false; }

inline void direct_forward_simd(Isa, int64_t, const Geometry&, const SplitLayout&, const float*, float*, const float*,
                                const float*, const float*, int64_t, int64_t, const float*, float*) {}

#endif

// Whether the AVX-512 kernel runs here (for tests and reports).
inline bool avx512_supported() { return isa_supported(Isa::kAvx512); }

}  // namespace coordconv
