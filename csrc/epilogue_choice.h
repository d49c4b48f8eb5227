// How the CUDA backend's epilogue (coord_epilogue_body) is launched on a layer, chosen by measurement
// the first time the layer is seen (the idea of torch.backends.cudnn.benchmark): elements per thread
// (16-byte accesses or one element) and samples per thread. Fewer threads, each adding its terms to
// more samples, compute fewer terms; more threads keep more memory accesses in flight; which balance
// is fastest depends on the layer and the GPU (on an H200, 16-byte accesses ran 0.69x to 1.47x the
// one-element kernel's time depending on the shape: docs/bench-cuda.md). The candidates give the same
// bits (each element's term is the same sum in the same order). Written over a launch policy, like
// gpu_host.h: CudaLaunch times with CUDA events, EmulatedLaunch with the CPU's clock.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "geometry.h"
#include "pick_measured.h"

namespace coordconv {

// One launch configuration: `vec` consecutive elements per thread, `per_thread` samples per thread,
// `threads` in all.
struct EpilogueConfig {
  int vec;
  int64_t per_thread, threads;
};

// The configuration that keeps about `target` threads busy with `vec` elements per thread: samples
// per thread as few as give that many threads.
inline EpilogueConfig epilogue_config(int64_t n, int64_t sample, int vec, int64_t target) {
  const int64_t slots = sample / vec;
  const int64_t chunks = std::clamp<int64_t>((target + slots - 1) / slots, 1, n);
  const int64_t per_thread = (n + chunks - 1) / chunks;
  return {vec, per_thread, slots * ((n + per_thread - 1) / per_thread)};
}

// The candidates, the fixed rule's pick first (16-byte accesses only where one sample's vectors alone
// give `target` threads, so that each term is computed once for the batch); then each width the
// output allows (`kvec` where `vec_ok`, and 1) aiming at target / 4, target and 4 * target threads,
// without duplicates.
inline std::vector<EpilogueConfig> epilogue_candidates(int64_t n, int64_t sample, int kvec, bool vec_ok,
                                                       int64_t target) {
  std::vector<EpilogueConfig> out{epilogue_config(n, sample, vec_ok && sample / kvec >= target ? kvec : 1, target)};
  for (const int vec : {1, kvec}) {
    if (vec > 1 && !vec_ok) continue;
    for (const int64_t t : {target / 4, target, target * 4}) {
      const EpilogueConfig c = epilogue_config(n, sample, vec, t);
      const auto same = [&](const EpilogueConfig& o) { return o.vec == c.vec && o.per_thread == c.per_thread; };
      if (std::none_of(out.begin(), out.end(), same)) out.push_back(c);
    }
  }
  return out;
}

// How the configuration is picked (coordconv_fused.backends.native.cuda_epilogue_policy): measured
// (the default), the fixed rule, or the rule's target with 16-byte accesses wherever the output
// allows them ("vectors") or nowhere ("scalars") -- the last three for timing the kernels side by side.
enum EpiloguePolicy : int { kMeasure = 0, kRule = 1, kVectors = 2, kScalars = 3 };
inline std::atomic<int>& epilogue_policy() {
  static std::atomic<int> policy{kMeasure};
  return policy;
}

// A layer's measured choice: its description, the candidates, their times (microseconds, best of the
// timed launches) and the index of the one kept.
struct EpilogueChoice {
  std::string layer;
  std::vector<EpilogueConfig> candidates;
  std::vector<double> micros;
  size_t chosen;
};

struct EpilogueChoices {
  std::mutex mutex;
  std::map<std::string, EpilogueChoice> by_key;
};
inline EpilogueChoices& epilogue_choice_store() {
  static EpilogueChoices store;
  return store;
}

inline std::vector<EpilogueChoice> epilogue_choices() {
  auto& s = epilogue_choice_store();
  std::lock_guard<std::mutex> lock(s.mutex);
  std::vector<EpilogueChoice> out;
  for (const auto& kv : s.by_key) out.push_back(kv.second);
  return out;
}

inline void clear_epilogue_choices() {
  auto& s = epilogue_choice_store();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.by_key.clear();
}

// The lookup key of a layer (every field of its geometry, field by field: no padding bytes) on a
// device, in a dtype and layout, with its output's 16-byte alignment; and its description.
inline std::string epilogue_key(const Geometry& g, const at::Tensor& y, bool channels_last, bool vec_ok) {
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
                         g.cw_cstride,
                         g.cw_tstride,
                         static_cast<int64_t>(y.scalar_type()),
                         y.device().index(),
                         channels_last,
                         vec_ok};
  for (int ax = 0; ax < 3; ++ax)
    f.insert(f.end(),
             {g.padded[ax], g.image[ax], g.before[ax], g.out[ax], g.stride[ax], g.pad[ax], g.dil[ax], g.kernel[ax]});
  return std::string(reinterpret_cast<const char*>(f.data()), f.size() * sizeof(int64_t));
}

inline std::string epilogue_layer(const Geometry& g, const at::Tensor& y, bool channels_last) {
  std::ostringstream s;
  s << "out=(" << g.n << "," << g.c_out;
  for (int ax = 3 - g.ndim; ax < 3; ++ax) s << "," << g.out[ax];
  s << ") k=";
  for (int ax = 3 - g.ndim; ax < 3; ++ax) s << g.kernel[ax] << (ax < 2 ? "x" : "");
  s << " d=" << g.num_coords << (g.separate ? " separate " : " ") << c10::toString(y.scalar_type())
    << (channels_last ? " channels_last" : "");
  return s.str();
}

// Timed launches per candidate, after one untimed warm-up launch each, interleaved round by round.
constexpr int kEpilogueRounds = 3;
// At most this many layers are remembered (then the store starts afresh).
constexpr size_t kMaxEpilogueChoices = 4096;
// Outputs larger than this are not measured (the candidates run on a copy of the output, which a
// layer near the device's memory may not have room for): the rule's pick, not remembered.
constexpr int64_t kMaxMeasuredBytes = int64_t(1) << 30;

// The configuration to launch: the layer's measured choice, measured now if it is new, its output
// (of `bytes`) within kMaxMeasuredBytes and the launch policy able to measure (not while a CUDA graph
// is being captured); otherwise the rule's pick, not remembered. `run(config)` launches one candidate
// on a scratch copy of the output (the epilogue adds in place).
template <class Launch>
EpilogueConfig choose_epilogue(const std::string& key, const std::function<std::string()>& layer,
                               const std::vector<EpilogueConfig>& candidates, int64_t bytes,
                               const std::function<void(const EpilogueConfig&)>& run) {
  if (candidates.size() == 1) return candidates.front();
  auto& store = epilogue_choice_store();
  {
    std::lock_guard<std::mutex> lock(store.mutex);
    const auto it = store.by_key.find(key);
    if (it != store.by_key.end()) return it->second.candidates[it->second.chosen];
  }
  if (bytes > kMaxMeasuredBytes || !Launch::can_measure()) return candidates.front();
  std::vector<double> micros =
      Launch::time_best(candidates.size(), kEpilogueRounds, [&](size_t i) { run(candidates[i]); });
  EpilogueChoice choice{layer(), candidates, std::move(micros), 0};
  choice.chosen = pick_measured(choice.micros, 0);
  const EpilogueConfig chosen = candidates[choice.chosen];
  std::lock_guard<std::mutex> lock(store.mutex);
  if (store.by_key.size() >= kMaxEpilogueChoices) store.by_key.clear();
  store.by_key.emplace(key, std::move(choice));
  return chosen;
}

}  // namespace coordconv
