// Which implementation the `cpp` backend runs for a layer, chosen by measurement (the idea of
// torch.backends.cudnn.benchmark): the first time a layer (geometry, batch, dtype, thread count) is
// seen, every eligible implementation is timed on it (one warm-up and three timed calls each,
// interleaved; a candidate over 3x slower than the fastest in the first round is not timed further)
// and the fastest is kept for the process -- the fixed rule's pick where it is within 5% of the
// fastest (pick_measured). Thresholds tuned on one CPU pick the slower path on others
// (docs/tuning.md); a measurement holds on any CPU. The candidates compute the same sums, so the choice changes results
// by floating-point reassociation at most.
//
// COORDCONV_CPU_KERNEL (read on every call, so tests and benchmarks can switch it):
//   measure    (default) choose by measurement, cached per layer
//   heuristic  the fixed thresholds of docs/tuning.md, no measurement
//   direct     force the direct kernels where eligible (AVX-512 or AVX2 in their first tile shape,
//              else the row kernel)
//   aten       force ATen/oneDNN plus the coordinate epilogue
//   an implementation's name (impl_name, e.g. avx512_direct_6x4, onednn_blocked): force it where it
//              is a candidate,
//              the fixed rule's pick elsewhere
// What was chosen, with the times measured: coordconv_fused.backends.native.kernel_choices(); saved
// to and loaded from a file by save_kernel_choices / load_kernel_choices there (a loaded choice is
// used only while its implementation is still a candidate for the layer: otherwise it is measured).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include "../geometry.h"

namespace coordconv {

// (kAvx512Direct, kAvx512Direct6x4 and kAvx512Direct3x6: the AVX-512 kernel with tiles of 4 or 6
// output channels x 4 vectors, or 3 x 6 for at most 3 output channels; kAvx2Direct and
// kAvx2Direct3x4: the AVX2 kernel, 4 x 3 or 3 x 4; direct_simd.h)
// kOnednnBlocked: oneDNN into its blocked layout + one pass to NCHW with the coordinate term
// (blocked_output.h).
enum class Impl : int {
  kAten = 0,
  kRowDirect = 1,
  kAvx512Direct = 2,
  kAvx2Direct = 3,
  kAvx512Direct6x4 = 4,
  kOnednnBlocked = 5,
  kAvx512Direct3x6 = 6,
  kAvx2Direct3x4 = 7
};
const char* impl_name(Impl impl);
// The implementation named `name` (impl_name's inverse); false if there is none.
bool impl_from_name(const std::string& name, Impl* impl);

// One measured choice: the op ("forward", "input_grad"), the layer, what won, and the time of each
// candidate (microseconds, the best of the timed calls), in the order of `candidates`; `key` is the
// lookup key (bytes: the op and the layer's fields, dtype and thread count); `measurements`, how
// many times the candidates were timed (1, then up to kMeasurements: kConfirmAfterCalls);
// `calls_left`, the calls of the layer until the next timing (0: none pending).
struct KernelChoice {
  std::string key, op, layer;
  Impl chosen;
  std::vector<Impl> candidates;
  std::vector<double> micros;
  int measurements = 1;
  int calls_left = 0;
};

// A layer's first call may find the machine busy, or a candidate's memory cold, for the few
// milliseconds its measurement takes: seen on a 2-core EPYC, the AVX2 input-gradient kernel of the
// input layer (32,3,64,64)->32 timed 11.8 ms there (6.7-7.8 ms in eight later measurements), so
// the slower ATen path (9.8 ms) was kept and the layer ran at 1.06x nn.Conv2d's time instead of
// 0.93x. So the candidates are timed again 8 calls after the first, and once more 64 calls after it
// (a slow spell can outlast 8 calls: on a 2-core Xeon capped at AVX2, the same layer's backward with
// the kernel timed 6.8-7.5 ms for seconds at a time, 5.1-5.9 ms otherwise, docs/tuning.md), each
// keeping its best time of all the measurements, and the choice is made again from those.
constexpr int kConfirmAfterCalls[] = {8, 64};  // calls after the first, increasing
constexpr int kMeasurements = 1 + static_cast<int>(sizeof(kConfirmAfterCalls) / sizeof(int));

// A measured candidate replaces the fixed rule's pick only when it is faster by more than this
// factor: a tie within the measurement's noise (the best of three single calls, on a machine that may
// be busy) must not flip a layer to a kernel that is slower in steady state. Seen on a 2-core EPYC:
// the stem's forward measured 1,511 us (oneDNN + epilogue) against 1,518 us (the AVX-512 kernel),
// and ran at 1.07x against 0.93x nn.Conv2d's time once chosen.
constexpr double kClearlyFaster = 1.05;

// Which of the measured candidates to keep: the fastest, unless the fixed rule's pick (index
// `heuristic`, -1 when it is not among them) is within kClearlyFaster of it.
inline size_t pick_measured(const std::vector<double>& micros, int64_t heuristic) {
  size_t best = 0;
  for (size_t i = 1; i < micros.size(); ++i)
    if (micros[i] < micros[best]) best = i;
  if (heuristic >= 0 && static_cast<size_t>(heuristic) < micros.size() &&
      micros[heuristic] <= kClearlyFaster * micros[best])
    return static_cast<size_t>(heuristic);
  return best;
}

// The implementation to run for `op` on the layer `g` (its batch included) in `dtype`, among
// `candidates` (eligible ones, ATen first); `heuristic` is the fixed rule's pick, and `run(impl)`
// computes the op with `impl` (its result discarded) for the measurement.
Impl choose_impl(const char* op, const Geometry& g, at::ScalarType dtype, const std::vector<Impl>& candidates,
                 Impl heuristic, const std::function<void(Impl)>& run);

// The lookup key of `op` on the layer `g` (its batch included) in `dtype` with `threads` threads:
// every field of the geometry but the output's strides (they follow from the rest), as bytes.
std::string layer_key(const char* op, const Geometry& g, at::ScalarType dtype, int threads);

// The choices measured so far in this process, and forgetting them (tests, benchmarks).
std::vector<KernelChoice> kernel_choices();
void clear_kernel_choices();
// Adds a choice made earlier (e.g. loaded from a file) unless its key is already known; returns
// whether it was added.
bool add_kernel_choice(const KernelChoice& choice);

}  // namespace coordconv
