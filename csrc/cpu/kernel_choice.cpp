// Choosing the `cpp` backend's implementation per layer by measurement (see kernel_choice.h).
#include "kernel_choice.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

namespace coordconv {
namespace {

enum class Mode { kMeasure, kHeuristic, kDirect, kAten };

Mode mode() {
  const char* v = std::getenv("COORDCONV_CPU_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "measure") == 0) return Mode::kMeasure;
  if (std::strcmp(v, "heuristic") == 0) return Mode::kHeuristic;
  if (std::strcmp(v, "direct") == 0) return Mode::kDirect;
  if (std::strcmp(v, "aten") == 0) return Mode::kAten;
  TORCH_CHECK(false, "COORDCONV_CPU_KERNEL must be one of measure, heuristic, direct, aten; got '", v, "'");
}

struct Entry {
  std::string op;
  Geometry key;
  at::ScalarType dtype;
  int threads;
  KernelChoice choice;
};

std::mutex& choices_mutex() {
  static std::mutex m;
  return m;
}

std::vector<Entry>& entries() {
  static std::vector<Entry> e;
  return e;
}

constexpr size_t kMaxEntries = 1024;
constexpr int kRounds = 3;  // timed rounds, candidates interleaved, after one warm-up call each

std::string describe(const Geometry& g, at::ScalarType dtype, int threads) {
  std::ostringstream s;
  s << "N=" << g.n << " C_in=" << g.c_in << " C_out=" << g.c_out << " in=";
  for (int ax = 3 - g.ndim; ax < 3; ++ax) s << g.padded[ax] << (ax < 2 ? "x" : "");
  s << " k=";
  for (int ax = 3 - g.ndim; ax < 3; ++ax) s << g.kernel[ax] << (ax < 2 ? "x" : "");
  s << " stride=";
  for (int ax = 3 - g.ndim; ax < 3; ++ax) s << g.stride[ax] << (ax < 2 ? "x" : "");
  s << " groups=" << g.groups << " " << c10::toString(dtype) << " threads=" << threads;
  return s.str();
}

double micros_of(Impl impl, const std::function<void(Impl)>& run) {
  const auto t0 = std::chrono::steady_clock::now();
  run(impl);
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

// The best time of each candidate over interleaved rounds (a transient load hits every candidate
// alike rather than the one being timed then), after one untimed warm-up call each (allocations,
// oneDNN's primitive creation). A candidate more than kHopeless times slower than the fastest in the
// first timed round is not timed further, so that a hopeless one costs the first call of a layer two
// slow runs, not four.
constexpr double kHopeless = 3.0;

std::vector<double> time_micros(const std::vector<Impl>& candidates, const std::function<void(Impl)>& run) {
  for (Impl c : candidates) run(c);  // warm-up
  std::vector<double> best(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) best[i] = micros_of(candidates[i], run);
  const double fastest = *std::min_element(best.begin(), best.end());
  for (int r = 1; r < kRounds; ++r) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (best[i] <= kHopeless * fastest) best[i] = std::min(best[i], micros_of(candidates[i], run));
    }
  }
  return best;
}

}  // namespace

const char* impl_name(Impl impl) {
  switch (impl) {
    case Impl::kAten:
      return "aten";
    case Impl::kRowDirect:
      return "row_direct";
    case Impl::kAvx512Direct:
      return "avx512_direct";
    case Impl::kAvx2Direct:
      return "avx2_direct";
  }
  return "?";
}

Impl choose_impl(const char* op, const Geometry& g, at::ScalarType dtype, const std::vector<Impl>& candidates,
                 Impl heuristic, const std::function<void(Impl)>& run) {
  TORCH_INTERNAL_ASSERT(!candidates.empty() && candidates.front() == Impl::kAten);
  if (candidates.size() == 1) return candidates.front();
  switch (mode()) {
    case Mode::kHeuristic:
      return heuristic;
    case Mode::kAten:
      return Impl::kAten;
    case Mode::kDirect:
      return *std::max_element(candidates.begin(), candidates.end());  // a SIMD kernel before the row kernel
    case Mode::kMeasure:
      break;
  }
  Geometry key = g;
  std::memset(key.ystride, 0, sizeof(key.ystride));  // the output's strides follow from the rest
  const int threads = at::get_num_threads();
  {
    std::lock_guard<std::mutex> lock(choices_mutex());
    for (const Entry& e : entries()) {
      if (e.dtype == dtype && e.threads == threads && e.op == op && std::memcmp(&e.key, &key, sizeof(Geometry)) == 0) {
        return e.choice.chosen;
      }
    }
  }
  KernelChoice choice{op, describe(g, dtype, threads), Impl::kAten, candidates, time_micros(candidates, run)};
  const auto best = std::min_element(choice.micros.begin(), choice.micros.end()) - choice.micros.begin();
  choice.chosen = candidates[best];
  std::lock_guard<std::mutex> lock(choices_mutex());
  if (entries().size() >= kMaxEntries) entries().clear();
  entries().push_back(Entry{op, key, dtype, threads, choice});
  return choice.chosen;
}

std::vector<KernelChoice> kernel_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  std::vector<KernelChoice> out;
  for (const Entry& e : entries()) out.push_back(e.choice);
  return out;
}

void clear_kernel_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  entries().clear();
}

}  // namespace coordconv
