// The Python module coordconv_fused._C: loading it registers the CPU (cpu/) and CUDA (cuda/) kernels
// of the coord_conv_ext ops and their autograd (autograd/), all TORCH_LIBRARY_IMPL. Their schemas are
// declared once, in Python (coordconv_fused/ops/schema.py, before this library is loaded); fake
// kernels are registered there too (coordconv_fused/backends/native.py). Which kernel a call took is
// visible in the PyTorch profiler (events named coordconv_fused::*).
#include <Python.h>

#include "cpu/direct_simd.h"
#include "cpu/kernel_choice.h"

namespace {
// Whether the CPU backend's AVX-512 direct kernel can run on this CPU (for tests and reports).
PyObject* avx512_direct_available(PyObject*, PyObject*) {
  if (coordconv::isa_supported(coordconv::Isa::kAvx512)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// The same for its AVX2 build (what CPUs without AVX-512, or COORDCONV_NO_AVX512=1, run).
PyObject* avx2_direct_available(PyObject*, PyObject*) {
  if (coordconv::isa_supported(coordconv::Isa::kAvx2)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// The cpp backend's measured choices: a list of dicts {op, layer, chosen, candidates: {name: us}}.
PyObject* kernel_choices(PyObject*, PyObject*) {
  const auto choices = coordconv::kernel_choices();
  PyObject* list = PyList_New(0);
  for (const auto& c : choices) {
    PyObject* times = PyDict_New();
    for (size_t i = 0; i < c.candidates.size(); ++i) {
      PyObject* us = PyFloat_FromDouble(c.micros[i]);
      PyDict_SetItemString(times, coordconv::impl_name(c.candidates[i]), us);
      Py_DECREF(us);
    }
    PyObject* item = Py_BuildValue("{s:s,s:s,s:s,s:N}", "op", c.op.c_str(), "layer", c.layer.c_str(), "chosen",
                                   coordconv::impl_name(c.chosen), "candidates_us", times);
    PyList_Append(list, item);
    Py_DECREF(item);
  }
  return list;
}

PyObject* clear_kernel_choices(PyObject*, PyObject*) {
  coordconv::clear_kernel_choices();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"kernel_choices", kernel_choices, METH_NOARGS, "The cpp backend's kernel choices measured so far."},
    {"clear_kernel_choices", clear_kernel_choices, METH_NOARGS, "Forget the measured kernel choices."},
    {"avx512_direct_available", avx512_direct_available, METH_NOARGS,
     "True when the cpp backend's AVX-512 direct kernel (shallow float32 layers) can run on this CPU."},
    {"avx2_direct_available", avx2_direct_available, METH_NOARGS,
     "True when the cpp backend's AVX2 direct kernel can run on this CPU."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing coordconv_fused._C loads this library and so registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "coordconv-fused C++/CUDA ops", -1, methods};
  return PyModule_Create(&module);
}
