// Choosing the `cpp` backend's implementation per layer by measurement (see kernel_choice.h).
#include "kernel_choice.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

namespace coordconv {
namespace {

enum class Mode { kMeasure, kHeuristic, kDirect, kForced };

constexpr Impl kAllImpls[] = {Impl::kAten,       Impl::kRowDirect,     Impl::kAvx512Direct,    Impl::kAvx512Direct6x4,
                              Impl::kAvx2Direct, Impl::kOnednnBlocked, Impl::kAvx512Direct3x6, Impl::kAvx2Direct3x4};

// The mode of COORDCONV_CPU_KERNEL, and for kForced the implementation it names ("aten" is one).
Mode mode(Impl* forced) {
  const char* v = std::getenv("COORDCONV_CPU_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "measure") == 0) return Mode::kMeasure;
  if (std::strcmp(v, "heuristic") == 0) return Mode::kHeuristic;
  if (std::strcmp(v, "direct") == 0) return Mode::kDirect;
  if (impl_from_name(v, forced)) return Mode::kForced;
  std::string names = "measure, heuristic, direct";
  for (Impl i : kAllImpls) names += std::string(", ") + impl_name(i);
  TORCH_CHECK(false, "COORDCONV_CPU_KERNEL must be one of ", names, "; got '", v, "'");
}

// The choices made so far, in order, and an index from a layer's lookup key into them (looked up on
// every call: a hash, not a scan).
struct Choices {
  std::vector<KernelChoice> list;
  std::unordered_map<std::string, size_t> index;
};

std::mutex& choices_mutex() {
  static std::mutex m;
  return m;
}

Choices& choices() {
  static Choices c;
  return c;
}

}  // namespace

// (field by field: no padding bytes in the key)
std::string layer_key(const char* op, const Geometry& g, at::ScalarType dtype, int threads) {
  std::vector<int64_t> f{g.n,
                         g.c_in,
                         g.c_out,
                         g.groups,
                         g.ndim,
                         g.num_coords,
                         g.pad_mode,
                         g.with_r,
                         g.separate,
                         g.has_bias,
                         static_cast<int64_t>(dtype),
                         threads};
  for (const int64_t* axis : {g.padded, g.image, g.before, g.out, g.stride, g.pad, g.dil, g.kernel})
    f.insert(f.end(), axis, axis + 3);
  std::string key(op);
  key.push_back('\0');
  key.append(reinterpret_cast<const char*>(f.data()), f.size() * sizeof(int64_t));
  return key;
}

namespace {

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

// After `done` measurements of a layer (counting from its first call), the calls until the next one;
// 0 when none is left.
int calls_to_next_measurement(int done) {
  if (done >= kMeasurements) return 0;
  return kConfirmAfterCalls[done - 1] - (done > 1 ? kConfirmAfterCalls[done - 2] : 0);
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
    case Impl::kAvx512Direct6x4:
      return "avx512_direct_6x4";
    case Impl::kOnednnBlocked:
      return "onednn_blocked";
    case Impl::kAvx512Direct3x6:
      return "avx512_direct_3x6";
    case Impl::kAvx2Direct3x4:
      return "avx2_direct_3x4";
  }
  return "?";
}

bool impl_from_name(const std::string& name, Impl* impl) {
  for (Impl i : kAllImpls) {
    if (name == impl_name(i)) {
      *impl = i;
      return true;
    }
  }
  return false;
}

Impl choose_impl(const char* op, const Geometry& g, at::ScalarType dtype, const std::vector<Impl>& candidates,
                 Impl heuristic, const std::function<void(Impl)>& run) {
  TORCH_INTERNAL_ASSERT(!candidates.empty() && candidates.front() == Impl::kAten);
  if (candidates.size() == 1) return candidates.front();
  const auto has = [&](Impl i) { return std::find(candidates.begin(), candidates.end(), i) != candidates.end(); };
  Impl forced = Impl::kAten;
  switch (mode(&forced)) {
    case Mode::kHeuristic:
      return heuristic;
    case Mode::kForced:
      return has(forced) ? forced : heuristic;
    case Mode::kDirect:  // a SIMD kernel (its first tile shape) before the row kernel
      for (Impl i : {Impl::kAvx512Direct, Impl::kAvx2Direct, Impl::kRowDirect})
        if (has(i)) return i;
      return Impl::kAten;
    case Mode::kMeasure:
      break;
  }
  const int threads = at::get_num_threads();
  std::string key = layer_key(op, g, dtype, threads);
  // (the fixed rule's pick among the candidates, -1 if absent: needed only when measuring)
  const auto heuristic_at = [&]() -> int64_t {
    const auto h = std::find(candidates.begin(), candidates.end(), heuristic) - candidates.begin();
    return h < static_cast<int64_t>(candidates.size()) ? h : -1;
  };
  {
    std::unique_lock<std::mutex> lock(choices_mutex());
    const auto it = choices().index.find(key);
    if (it != choices().index.end()) {
      KernelChoice& known = choices().list[it->second];
      // (a choice loaded from a file may name an implementation this process cannot run, e.g. one
      // saved with AVX-512 read under COORDCONV_NO_AVX512=1: then it is measured again)
      const bool runnable = std::find(candidates.begin(), candidates.end(), known.chosen) != candidates.end();
      if (runnable && (known.calls_left == 0 || --known.calls_left > 0)) return known.chosen;
      if (runnable) {  // a later measurement (kConfirmAfterCalls), outside the lock
        // (each candidate's best time so far; the candidates may have changed since, e.g. oneDNN's
        // blocked output given up for the layer: the times are matched by implementation)
        std::vector<double> best(candidates.size(), std::numeric_limits<double>::infinity());
        for (size_t i = 0; i < candidates.size(); ++i) {
          const auto was = std::find(known.candidates.begin(), known.candidates.end(), candidates[i]);
          if (was != known.candidates.end()) best[i] = known.micros[was - known.candidates.begin()];
        }
        const int measurements = known.measurements + 1;
        lock.unlock();
        const std::vector<double> again = time_micros(candidates, run);
        for (size_t i = 0; i < best.size(); ++i) best[i] = std::min(best[i], again[i]);
        const Impl now = candidates[pick_measured(best, heuristic_at())];
        lock.lock();
        const auto still = choices().index.find(key);  // (unless cleared meanwhile)
        if (still != choices().index.end()) {
          KernelChoice& c = choices().list[still->second];
          c.candidates = candidates;
          c.micros = best;
          c.chosen = now;
          c.measurements = measurements;
          c.calls_left = calls_to_next_measurement(measurements);
        }
        return now;
      }
    }
  }
  KernelChoice choice{key, op, describe(g, dtype, threads), Impl::kAten, candidates, time_micros(candidates, run)};
  choice.chosen = candidates[pick_measured(choice.micros, heuristic_at())];
  choice.calls_left = calls_to_next_measurement(1);
  std::lock_guard<std::mutex> lock(choices_mutex());
  Choices& c = choices();
  const auto it = c.index.find(key);
  if (it != c.index.end()) {  // replaces a loaded choice that did not apply
    c.list[it->second] = choice;
    return choice.chosen;
  }
  if (c.list.size() >= kMaxEntries) {
    c.list.clear();
    c.index.clear();
  }
  c.index.emplace(std::move(key), c.list.size());
  c.list.push_back(choice);
  return choice.chosen;
}

std::vector<KernelChoice> kernel_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  return choices().list;
}

bool add_kernel_choice(const KernelChoice& choice) {
  std::lock_guard<std::mutex> lock(choices_mutex());
  Choices& c = choices();
  if (c.index.count(choice.key) != 0 || c.list.size() >= kMaxEntries) return false;
  c.index.emplace(choice.key, c.list.size());
  c.list.push_back(choice);
  return true;
}

void clear_kernel_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  choices() = Choices{};
}

}  // namespace coordconv
