// The CUDA epilogue's policy (gpu_host.h's EpiloguePolicy) as a Python method, for
// coordconv_fused._C (the CUDA kernels) and coordconv_fused._C_testing (their CPU emulation). Built
// with GCC, the two modules' switches are one variable (the static of an inline function is a GNU
// unique symbol, merged across libraries): setting either sets both.
#pragma once

#include <Python.h>

#include "gpu_host.h"

namespace coordconv {

// Sets the policy to `arg` unless that is -1; returns the previous one.
inline PyObject* py_epilogue_policy(PyObject*, PyObject* arg) {
  const long policy = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (policy < -1 || policy > kSplit) {
    PyErr_Format(PyExc_ValueError, "epilogue_policy: no policy %ld", policy);
    return nullptr;
  }
  auto& current = epilogue_policy();
  return PyLong_FromLong(policy == -1 ? current.load() : current.exchange(static_cast<int>(policy)));
}

}  // namespace coordconv
