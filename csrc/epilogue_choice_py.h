// Python access to epilogue_choice.h's policy and measured choices, as methods of coordconv_fused._C
// (the CUDA kernels') and of coordconv_fused._C_testing (their CPU emulation's): each module has its own.
#pragma once

#include <Python.h>

#include <string>

#include "epilogue_choice.h"

namespace coordconv {

// Sets the policy (EpiloguePolicy) unless `arg` is -1; returns the previous one.
inline PyObject* py_epilogue_policy(PyObject*, PyObject* arg) {
  const long policy = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (policy < -1 || policy > kScalars) {
    PyErr_Format(PyExc_ValueError, "epilogue_policy: no policy %ld", policy);
    return nullptr;
  }
  auto& current = epilogue_policy();
  return PyLong_FromLong(policy == -1 ? current.load() : current.exchange(static_cast<int>(policy)));
}

inline std::string epilogue_config_name(const EpilogueConfig& c) {
  return std::to_string(c.vec) + " el. x " + std::to_string(c.per_thread) + " samples";
}

// The measured choices: [{layer, chosen, candidates_us: {name: us}}], names as epilogue_config_name.
inline PyObject* py_epilogue_choices(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  for (const auto& c : epilogue_choices()) {
    PyObject* times = PyDict_New();
    for (size_t i = 0; i < c.candidates.size(); ++i) {
      PyObject* us = PyFloat_FromDouble(c.micros[i]);
      PyDict_SetItemString(times, epilogue_config_name(c.candidates[i]).c_str(), us);
      Py_DECREF(us);
    }
    PyObject* item = Py_BuildValue("{s:s,s:s,s:N}", "layer", c.layer.c_str(), "chosen",
                                   epilogue_config_name(c.candidates[c.chosen]).c_str(), "candidates_us", times);
    PyList_Append(list, item);
    Py_DECREF(item);
  }
  return list;
}

inline PyObject* py_clear_epilogue_choices(PyObject*, PyObject*) {
  clear_epilogue_choices();
  Py_RETURN_NONE;
}

}  // namespace coordconv

// The three methods, for a module's PyMethodDef table.
#define COORDCONV_EPILOGUE_METHODS                                                                 \
  {"epilogue_policy", coordconv::py_epilogue_policy, METH_O,                                       \
   "Get (-1) or set the CUDA epilogue's launch policy: 0 measure, 1 rule, 2 vectors, 3 scalars."}, \
      {"epilogue_choices", coordconv::py_epilogue_choices, METH_NOARGS,                            \
       "The CUDA epilogue's measured launch choices."},                                            \
      {"clear_epilogue_choices", coordconv::py_clear_epilogue_choices, METH_NOARGS, "Forget the epilogue's choices."}
