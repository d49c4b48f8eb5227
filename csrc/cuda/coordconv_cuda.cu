// The CUDA backend: the kernel bodies of coordconv.h as __global__ kernels, one thread per output
// (or gradient) element, and the host logic of gpu_host.h. Compiled in CI (FORCE_CUDA=1); run on
// the CPU by the emulation in cpu/cuda_emulation.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gpu_host.h"

namespace coordconv {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void direct_forward_kernel(Geometry g, const scalar_t* x, const scalar_t* w, const scalar_t* cw,
                                      const scalar_t* b, scalar_t* y, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < total) direct_forward_body<scalar_t, acc_t>(g, x, w, cw, b, y, idx);
}

template <typename scalar_t, typename acc_t>
__global__ void coord_epilogue_kernel(Geometry g, const scalar_t* cw, scalar_t* y, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < total) coord_epilogue_body<scalar_t, acc_t>(g, cw, y, idx);
}

template <typename scalar_t, typename acc_t>
__global__ void coord_weight_grad_kernel(Geometry g, const acc_t* gs, scalar_t* out, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < total) coord_weight_grad_body<scalar_t, acc_t>(g, gs, out, idx);
}

unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>((total + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

struct CudaLaunch {
  template <typename scalar_t, typename acc_t>
  static void direct_forward(const Geometry& g, const scalar_t* x, const scalar_t* w, const scalar_t* cw,
                             const scalar_t* b, scalar_t* y, int64_t total) {
    direct_forward_kernel<scalar_t, acc_t>
        <<<blocks_for(total), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(g, x, w, cw, b, y, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename acc_t>
  static void coord_epilogue(const Geometry& g, const scalar_t* cw, scalar_t* y, int64_t total) {
    coord_epilogue_kernel<scalar_t, acc_t>
        <<<blocks_for(total), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(g, cw, y, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename acc_t>
  static void coord_weight_grad(const Geometry& g, const acc_t* gs, scalar_t* out, int64_t total) {
    coord_weight_grad_kernel<scalar_t, acc_t>
        <<<blocks_for(total), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(g, gs, out, total);
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
