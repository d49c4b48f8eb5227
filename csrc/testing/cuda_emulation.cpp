// CPU emulation of the CUDA backend: the host logic of gpu_host.h with a launch policy that runs
// the kernel bodies of coordconv.h for every (block, thread) of the grid CUDA would launch.
// Registered as coordconv_fused::coord_conv_cuda_emulated (+ its coord-weight gradient) so that the
// test suite can check the CUDA code against the reference on a machine without a GPU. Built as its
// own module, coordconv_fused._C_testing, which only the tests load (coordconv_fused.testing).
#include <torch/library.h>

#include "../autograd/coord_conv_autograd.h"
#include "../gpu_host.h"

namespace coordconv {
namespace {

struct EmulatedLaunch {
  template <class Body>
  static void grid(int64_t total, Body&& body) {
    const int64_t blocks = (total + kThreadsPerBlock - 1) / kThreadsPerBlock;
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t thread = 0; thread < kThreadsPerBlock; ++thread) {
        const int64_t idx = block * kThreadsPerBlock + thread;  // blockIdx.x * blockDim.x + threadIdx.x
        if (idx < total) body(idx);
      }
    }
  }
  // Small, so that the tests' batches exercise the sharing of a term among several samples.
  static int64_t target_threads() { return 64; }
  template <typename scalar_t, typename acc_t, int V>
  static void coord_epilogue(const Geometry& g, const scalar_t* cw, const scalar_t* bias, scalar_t* y,
                             bool channels_last, int64_t per_thread, int64_t threads) {
    grid(threads,
         [&](int64_t i) { coord_epilogue_body<scalar_t, acc_t, V>(g, cw, bias, y, channels_last, per_thread, i); });
  }
  template <typename scalar_t, typename acc_t, int V>
  static void sample_term(const Geometry& g, const scalar_t* cw, const scalar_t* bias, acc_t* term, bool channels_last,
                          int64_t threads) {
    grid(threads, [&](int64_t i) { sample_term_body<scalar_t, acc_t, V>(g, cw, bias, term, channels_last, i); });
  }
  template <typename scalar_t, typename acc_t, int V>
  static void add_sample_term(const acc_t* term, scalar_t* y, int64_t sample, int64_t threads) {
    grid(threads, [&](int64_t i) { add_sample_term_body<scalar_t, acc_t, V>(term, y, sample, i); });
  }
  template <typename scalar_t, typename acc_t>
  static void coord_cols(const Geometry& g, acc_t* cols, int64_t total) {
    grid(total, [&](int64_t i) { coord_cols_body<scalar_t, acc_t>(g, cols, i); });
  }
  template <typename scalar_t, typename acc_t>
  static void add_term(const acc_t* term, scalar_t* y, int64_t sample, int64_t total, int64_t threads) {
    grid(threads, [&](int64_t i) { add_term_body<scalar_t, acc_t>(term, y, sample, total, i); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(coordconv_fused, CPU, m) {
  m.impl("coord_conv_cuda_emulated", &gpu_forward<EmulatedLaunch>);
  m.impl("coord_conv_cuda_emulated_coord_weight_grad", &gpu_coord_weight_grad<EmulatedLaunch>);
}

namespace {
struct EmulatedOp {  // the cuda backend's autograd: no fused backward op
  static constexpr const char* name = "coordconv_fused::coord_conv_cuda_emulated";
  static constexpr bool fused_backward = false;
};
}  // namespace

TORCH_LIBRARY_IMPL(coordconv_fused, Autograd, m) {
  m.impl("coord_conv_cuda_emulated", &autograd::coord_conv_autograd<EmulatedOp>);
}

}  // namespace coordconv
