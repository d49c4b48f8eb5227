// The rule both measured kernel choices keep (the cpp backend's, cpu/kernel_choice.h, and the cuda
// backend's epilogue, gpu_host.h): the fastest measured candidate, unless the fixed rule's pick is
// within the measurement's noise of it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace coordconv {

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

}  // namespace coordconv
