// The Python module coordconv_fused._C_testing (test builds only): loading it registers the emulated
// CUDA ops (cuda_emulation.cpp), and it holds diagnostics of the build.
#include <Python.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "../cpu/kernel_choice.h"
#include "../epilogue_policy_py.h"

namespace {
// How many threads an at::parallel_for loop compiled with the extensions' flags really uses: 1 when
// they lack OpenMP (ATen inlines parallel_for from its headers, and runs it serially then). The
// test extension is built with the same flags as coordconv_fused._C (setup.py).
PyObject* parallel_for_threads(PyObject*, PyObject*) {
  std::atomic<int> threads{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { threads += 1; });
  return PyLong_FromLong(threads.load());
}

// coordconv::pick_measured(times, heuristic): which measured candidate the cpp backend keeps.
PyObject* pick_measured(PyObject*, PyObject* args) {
  PyObject* times;
  long long heuristic;
  if (!PyArg_ParseTuple(args, "OL", &times, &heuristic) || !PyList_Check(times)) {
    PyErr_SetString(PyExc_TypeError, "pick_measured(times: list[float], heuristic: int)");
    return nullptr;
  }
  std::vector<double> micros;
  for (Py_ssize_t i = 0; i < PyList_Size(times); ++i) micros.push_back(PyFloat_AsDouble(PyList_GetItem(times, i)));
  if (PyErr_Occurred()) return nullptr;
  return PyLong_FromSize_t(coordconv::pick_measured(micros, heuristic));
}

PyMethodDef methods[] = {
    {"parallel_for_threads", parallel_for_threads, METH_NOARGS,
     "Number of threads at::parallel_for runs with the extensions' build flags."},
    {"pick_measured", pick_measured, METH_VARARGS,
     "Index of the measured candidate the cpp backend keeps (kernel_choice.h)."},
    {"epilogue_policy", coordconv::py_epilogue_policy, METH_O,
     "The emulated CUDA epilogue's policy (as _C.cuda_epilogue_policy): get (-1) or set; returns the previous."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyObject* PyInit__C_testing(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_testing", "coordconv-fused test-only ops", -1,
                                      methods};
  return PyModule_Create(&module);
}
