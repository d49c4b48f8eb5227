// The schemas of the C++/CUDA ops, declared once. Implementations: cpu/ (CPU) and cuda/ (CUDA);
// fake kernels and autograd are registered from Python (coordconv_fused/extension.py).
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/direct_avx512.h"

// The same argument list as the Python-defined ops (see coordconv_fused/ops.py).
#define COORD_CONV_ARGS                                                                                  \
  "Tensor input, Tensor weight, Tensor coord_weight, Tensor? bias, SymInt[] stride, SymInt[] padding, " \
  "SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, SymInt[] coord_pad, "     \
  "str coord_pad_mode, bool with_r, bool separate"
#define COORD_GRAD_ARGS                                                                                       \
  "Tensor grad_sum, Tensor input, Tensor weight, Tensor coord_weight, SymInt[] stride, SymInt[] padding, " \
  "SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, SymInt[] coord_pad, "        \
  "str coord_pad_mode, bool with_r, bool separate"

TORCH_LIBRARY(coordconv_fused, m) {
  // Backends `cpp` (CPU implementation) and `cuda` (CUDA implementation).
  m.def("coord_conv_ext(" COORD_CONV_ARGS ") -> Tensor");
  m.def("coord_conv_ext_coord_weight_grad(" COORD_GRAD_ARGS ") -> Tensor");
  // The data convolution's input gradient (CPU: a direct kernel for stride-1 layers on few channels).
  m.def("coord_conv_ext_input_grad(Tensor grad, Tensor input, Tensor weight, SymInt[] stride, SymInt[] padding, "
        "SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups) -> Tensor");
  // The whole backward of coord_conv_ext on the CPU: the gradients of (input, weight, coord_weight,
  // bias) where output_mask asks, undefined (None) elsewhere, like aten::convolution_backward.
  m.def("coord_conv_ext_backward(Tensor grad, Tensor input, Tensor weight, Tensor coord_weight, SymInt[] stride, "
        "SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, "
        "SymInt[] coord_pad, str coord_pad_mode, bool with_r, bool separate, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The CUDA backend's host code and kernel bodies, emulated on the CPU (for tests).
  m.def("coord_conv_cuda_emulated(" COORD_CONV_ARGS ") -> Tensor");
  m.def("coord_conv_cuda_emulated_coord_weight_grad(" COORD_GRAD_ARGS ") -> Tensor");
}

namespace {
// Whether the CPU backend's AVX-512 direct kernel can run on this CPU (for tests and reports).
PyObject* avx512_direct_available(PyObject*, PyObject*) {
  if (coordconv::avx512_supported()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// How many threads the extension's at::parallel_for loops really use: 1 when it was compiled
// without OpenMP (ATen inlines parallel_for from its headers, and runs it serially then).
PyObject* parallel_for_threads(PyObject*, PyObject*) {
  std::atomic<int> threads{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { threads += 1; });
  return PyLong_FromLong(threads.load());
}

PyObject* avx512_direct_calls(PyObject*, PyObject*) {
  return PyLong_FromLongLong(coordconv::avx512_direct_calls().load());
}

PyMethodDef methods[] = {
    {"avx512_direct_calls", avx512_direct_calls, METH_NOARGS,
     "How many forward calls the AVX-512 direct kernel has run (for tests)."},
    {"parallel_for_threads", parallel_for_threads, METH_NOARGS,
     "Number of threads at::parallel_for runs in this extension (for tests)."},
    {"avx512_direct_available", avx512_direct_available, METH_NOARGS,
     "True when the cpp backend's AVX-512 direct kernel (shallow float32 layers) can run on this CPU."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing coordconv_fused._C loads this library and so registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "coordconv-fused C++/CUDA ops", -1, methods};
  return PyModule_Create(&module);
}
