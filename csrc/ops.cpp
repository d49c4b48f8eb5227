// The Python module coordconv_fused._C: loading it registers the CPU (cpu/) and CUDA (cuda/) kernels
// of the coord_conv_ext ops (TORCH_LIBRARY_IMPL). Their schemas are declared once, in Python
// (coordconv_fused/ops/schema.py, before this library is loaded); fake kernels and autograd are
// registered there too (coordconv_fused/backends/native.py).
#include <Python.h>
#include <ATen/Parallel.h>

#include <atomic>

#include "cpu/direct_avx512.h"

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
