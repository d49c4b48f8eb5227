// The CUDA backend: the kernel bodies of coordconv.h as __global__ kernels (the epilogue with the
// coordinates evaluated in it, one thread per output offset and a few samples; for large filters the
// coordinate im2col matrix, one thread per element, and the GEMM path's epilogue, one thread per
// kEpilogueVec output elements), and the host logic of gpu_host.h (cuDNN for the data, cuBLAS for the
// coordinate filter's gradient and the large filters' term).
// Compiled in CI (FORCE_CUDA=1); run on the CPU by the emulation in testing/cuda_emulation.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gpu_host.h"

namespace coordconv {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void coord_cols_kernel(Geometry g, acc_t* cols, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < total) coord_cols_body<scalar_t, acc_t>(g, cols, idx);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void coord_epilogue_kernel(Geometry g, const scalar_t* __restrict__ cw, const scalar_t* __restrict__ bias,
                                      scalar_t* __restrict__ y, bool channels_last, int64_t per_thread,
                                      int64_t threads) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < threads) coord_epilogue_body<scalar_t, acc_t, V>(g, cw, bias, y, channels_last, per_thread, idx);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void sample_term_kernel(Geometry g, const scalar_t* __restrict__ cw, const scalar_t* __restrict__ bias,
                                   acc_t* __restrict__ term, bool channels_last, int64_t threads) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < threads) sample_term_body<scalar_t, acc_t, V>(g, cw, bias, term, channels_last, idx);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void add_sample_term_kernel(const acc_t* __restrict__ term, scalar_t* __restrict__ y, int64_t sample,
                                       int64_t threads) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < threads) add_sample_term_body<scalar_t, acc_t, V>(term, y, sample, idx);
}

template <typename scalar_t, typename acc_t>
__global__ void add_term_kernel(const acc_t* __restrict__ term, scalar_t* __restrict__ y, int64_t sample, int64_t total,
                                int64_t threads) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < threads) add_term_body<scalar_t, acc_t>(term, y, sample, total, idx);
}

unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>((total + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

struct CudaLaunch {
  // Threads the epilogue aims for (a few per SM slot on a large GPU) when sharing each term among
  // several samples.
  static int64_t target_threads() { return int64_t(1) << 18; }
  template <typename scalar_t, typename acc_t, int V>
  static void coord_epilogue(const Geometry& g, const scalar_t* cw, const scalar_t* bias, scalar_t* y,
                             bool channels_last, int64_t per_thread, int64_t threads) {
    coord_epilogue_kernel<scalar_t, acc_t, V>
        <<<blocks_for(threads), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(g, cw, bias, y, channels_last,
                                                                                         per_thread, threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename acc_t, int V>
  static void sample_term(const Geometry& g, const scalar_t* cw, const scalar_t* bias, acc_t* term, bool channels_last,
                          int64_t threads) {
    sample_term_kernel<scalar_t, acc_t, V>
        <<<blocks_for(threads), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(g, cw, bias, term,
                                                                                         channels_last, threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename acc_t, int V>
  static void add_sample_term(const acc_t* term, scalar_t* y, int64_t sample, int64_t threads) {
    add_sample_term_kernel<scalar_t, acc_t, V>
        <<<blocks_for(threads), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(term, y, sample, threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename acc_t>
  static void coord_cols(const Geometry& g, acc_t* cols, int64_t total) {
    coord_cols_kernel<scalar_t, acc_t>
        <<<blocks_for(total), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(g, cols, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename acc_t>
  static void add_term(const acc_t* term, scalar_t* y, int64_t sample, int64_t total, int64_t threads) {
    add_term_kernel<scalar_t, acc_t><<<blocks_for(threads), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        term, y, sample, total, threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& coord_weight,
                        const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                        at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r, bool separate) {
  const c10::cuda::CUDAGuard guard(input.device());
  return gpu_forward<CudaLaunch>(input, weight, coord_weight, bias, stride, padding, dilation, transposed,
                                 output_padding, groups, pre_pad, pre_pad_mode, with_r, separate);
}

at::Tensor coord_weight_grad_cuda(const at::Tensor& grad_sum, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& coord_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                                  int64_t groups, at::IntArrayRef pre_pad, c10::string_view pre_pad_mode, bool with_r,
                                  bool separate) {
  const c10::cuda::CUDAGuard guard(input.device());
  return gpu_coord_weight_grad<CudaLaunch>(grad_sum, input, weight, coord_weight, stride, padding, dilation, transposed,
                                           output_padding, groups, pre_pad, pre_pad_mode, with_r, separate);
}

}  // namespace

TORCH_LIBRARY_IMPL(coordconv_fused, CUDA, m) {
  m.impl("coord_conv_ext", &forward_cuda);
  m.impl("coord_conv_ext_coord_weight_grad", &coord_weight_grad_cuda);
}

}  // namespace coordconv
