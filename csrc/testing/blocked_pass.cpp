// The pass of csrc/cpu/blocked_pass.h on a given channel-blocked buffer (test-only): oneDNN picks
// one block size per machine, so the tests run the pass on every block size here, against
// permute + add. Registered as coordconv_fused::blocked_output_pass.
#include <torch/library.h>

#include "../cpu/blocked_pass.h"

namespace coordconv {
namespace {

// blocked: [N, C/b, OH, OW, b] float32; P: [C, OH, OW]; uv: [2, C, OW] (U, V of rows [lo, hi)) or none.
at::Tensor blocked_output_pass(const at::Tensor& blocked, const at::Tensor& P, const c10::optional<at::Tensor>& uv,
                               int64_t lo, int64_t hi) {
  TORCH_CHECK(
      blocked.dim() == 5 && blocked.scalar_type() == at::kFloat && P.dim() == 3 && P.scalar_type() == at::kFloat,
      "blocked_output_pass: blocked [N, C/b, OH, OW, b] and P [C, OH, OW], float32");
  const int64_t block = blocked.size(4);
  const OutputShape s{blocked.size(0), blocked.size(1) * block, blocked.size(2), blocked.size(3)};
  TORCH_CHECK(P.sizes() == at::IntArrayRef({s.c, s.oh, s.ow}), "blocked_output_pass: P must be [C, OH, OW]");
  const at::Tensor src = blocked.contiguous(), p = P.contiguous();
  const at::Tensor tables = uv.has_value() ? uv->contiguous() : at::Tensor();
  TORCH_CHECK(!tables.defined() || tables.sizes() == at::IntArrayRef({2, s.c, s.ow}),
              "blocked_output_pass: uv must be [2, C, OW]");
  at::Tensor y = at::empty({s.n, s.c, s.oh, s.ow}, blocked.options());
  run_blocked_pass({s, block, src.const_data_ptr<float>(), p.const_data_ptr<float>(),
                    tables.defined() ? tables.const_data_ptr<float>() : nullptr, lo, hi, y.data_ptr<float>()});
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(coordconv_fused, CPU, m) { m.impl("blocked_output_pass", &blocked_output_pass); }

}  // namespace coordconv
