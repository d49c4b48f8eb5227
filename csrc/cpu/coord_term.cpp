// The process-wide caches of coordinate terms and of the backward's tables (see coord_term.h).
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

std::vector<GradTablesEntry>& grad_tables_cache() {
  static std::vector<GradTablesEntry> c;
  return c;
}

}  // namespace coordconv
