// The process-wide cache of coordinate terms (see coord_term.h).
#include "coord_term.h"

namespace coordconv {

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<const c10::TensorImpl*, CacheEntry>& cache() {
  static std::unordered_map<const c10::TensorImpl*, CacheEntry> c;
  return c;
}

}  // namespace coordconv
