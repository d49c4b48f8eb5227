// The Python module coordconv_fused._C: loading it registers the CPU (cpu/) and CUDA (cuda/) kernels
// of the coord_conv_ext ops and their autograd (autograd/), all TORCH_LIBRARY_IMPL. Their schemas are
// declared once, in Python (coordconv_fused/ops/schema.py, before this library is loaded); fake
// kernels are registered there too (coordconv_fused/backends/native.py). Which kernel a call took is
// visible in the PyTorch profiler (events named coordconv_fused::*).
#include <Python.h>

#include "cpu/direct_avx512.h"

namespace {
// Whether the CPU backend's AVX-512 direct kernel can run on this CPU (for tests and reports).
PyObject* avx512_direct_available(PyObject*, PyObject*) {
  if (coordconv::avx512_supported()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"avx512_direct_available", avx512_direct_available, METH_NOARGS,
     "True when the cpp backend's AVX-512 direct kernel (shallow float32 layers) can run on this CPU."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing coordconv_fused._C loads this library and so registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "coordconv-fused C++/CUDA ops", -1, methods};
  return PyModule_Create(&module);
}
