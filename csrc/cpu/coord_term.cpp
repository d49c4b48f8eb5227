// The process-wide caches of coordinate terms and of the backward's tables (see coord_term.h), and
// the coordinate term as an op of its own (coord_conv_ext_term).
#include "coord_term.h"

#include "cpu_ops.h"

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

at::Tensor coord_term_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                          at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef pre_pad,
                          c10::string_view pre_pad_mode, bool with_r, bool separate) {
  const AutocastOff autocast_off;
  Geometry g = make_geometry(input, weight, c10::nullopt, stride, padding, dilation, transposed, groups, pre_pad,
                             pre_pad_mode, with_r, separate);
  std::vector<int64_t> sizes = output_sizes(g);
  sizes[0] = 1;
  at::Tensor out = at::empty(sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  CoordTerm coord;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "coord_term_cpu", [&] {
    coord = cached_coord_term<scalar_t, at::opmath_type<scalar_t>>(g, coord_weight);
  });
  // Written afresh (the caller owns what an op returns; the cached P is shared), from P's affine
  // rows where it has them: the small tables are in cache where the output-sized P is not.
  g.n = 1;
  write_coord_term(g, coord, out);
  return out;
}

}  // namespace coordconv
