// The Python module coordconv_fused._C: loading it registers the CPU (cpu/) and CUDA (cuda/) kernels
// of the coord_conv_ext ops and their autograd (autograd/), all TORCH_LIBRARY_IMPL. Their schemas are
// declared once, in Python (coordconv_fused/ops/schema.py, before this library is loaded); fake
// kernels are registered there too (coordconv_fused/backends/native.py). Which kernel a call took is
// visible in the PyTorch profiler (events named coordconv_fused::*).
#include <Python.h>

#include <iterator>
#include <string>

#include "cpu/direct_simd.h"
#include "epilogue_policy_py.h"
#include "cpu/blocked_output.h"
#include "cpu/kernel_choice.h"
#include "prepared_call.h"

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

std::string to_hex(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char b : bytes) {
    hex.push_back(digits[b >> 4]);
    hex.push_back(digits[b & 15]);
  }
  return hex;
}

bool from_hex(const std::string& hex, std::string* bytes) {
  auto nibble = [](char ch) { return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1; };
  if (hex.size() % 2 != 0) return false;
  bytes->clear();
  for (size_t i = 0; i < hex.size(); i += 2) {
    const int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    bytes->push_back(static_cast<char>(hi * 16 + lo));
  }
  return true;
}

// The cpp backend's measured choices: a list of dicts {key, op, layer, chosen, candidates_us: {name: us},
// measurements} (key: the lookup key in hex, what add_kernel_choices needs to restore a choice).
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
    PyObject* item = Py_BuildValue("{s:s,s:s,s:s,s:s,s:N,s:i}", "key", to_hex(c.key).c_str(), "op", c.op.c_str(),
                                   "layer", c.layer.c_str(), "chosen", coordconv::impl_name(c.chosen), "candidates_us",
                                   times, "measurements", c.measurements);
    PyList_Append(list, item);
    Py_DECREF(item);
  }
  return list;
}

// A str item of a dict, or nullptr (with a Python error set).
const char* str_item(PyObject* dict, const char* name) {
  PyObject* v = PyDict_GetItemString(dict, name);  // borrowed
  if (v == nullptr || !PyUnicode_Check(v)) {
    PyErr_Format(PyExc_ValueError, "a kernel choice needs a str '%s'", name);
    return nullptr;
  }
  return PyUnicode_AsUTF8(v);
}

// Restores choices in kernel_choices()'s format; returns how many were added (a key already known
// is kept as it is).
PyObject* add_kernel_choices(PyObject*, PyObject* list) {
  if (!PyList_Check(list)) {
    PyErr_SetString(PyExc_TypeError, "add_kernel_choices takes a list of dicts");
    return nullptr;
  }
  long added = 0;
  for (Py_ssize_t i = 0; i < PyList_Size(list); ++i) {
    PyObject* d = PyList_GetItem(list, i);
    if (!PyDict_Check(d)) {
      PyErr_SetString(PyExc_TypeError, "add_kernel_choices takes a list of dicts");
      return nullptr;
    }
    const char *key = str_item(d, "key"), *op = key ? str_item(d, "op") : nullptr;
    const char *layer = op ? str_item(d, "layer") : nullptr, *chosen = layer ? str_item(d, "chosen") : nullptr;
    if (chosen == nullptr) return nullptr;
    coordconv::KernelChoice c;
    if (!from_hex(key, &c.key) || !coordconv::impl_from_name(chosen, &c.chosen)) {
      PyErr_Format(PyExc_ValueError, "not a kernel choice: key '%s', chosen '%s'", key, chosen);
      return nullptr;
    }
    c.op = op;
    c.layer = layer;
    PyObject* times = PyDict_GetItemString(d, "candidates_us");
    if (times != nullptr && PyDict_Check(times)) {
      PyObject *name, *us;
      Py_ssize_t pos = 0;
      while (PyDict_Next(times, &pos, &name, &us)) {
        coordconv::Impl impl;
        if (PyUnicode_Check(name) && PyFloat_Check(us) && coordconv::impl_from_name(PyUnicode_AsUTF8(name), &impl)) {
          c.candidates.push_back(impl);
          c.micros.push_back(PyFloat_AsDouble(us));
        }
      }
    }
    PyObject* measurements = PyDict_GetItemString(d, "measurements");  // (absent in older files)
    if (measurements != nullptr && PyLong_Check(measurements)) c.measurements = PyLong_AsLong(measurements);
    added += coordconv::add_kernel_choice(c) ? 1 : 0;
  }
  return PyLong_FromLong(added);
}

PyObject* clear_kernel_choices(PyObject*, PyObject*) {
  coordconv::clear_kernel_choices();
  coordconv::clear_blocked_formats();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"kernel_choices", kernel_choices, METH_NOARGS, "The cpp backend's kernel choices measured so far."},
    {"clear_kernel_choices", clear_kernel_choices, METH_NOARGS,
     "Forget the measured kernel choices (and the oneDNN output formats recognised)."},
    {"add_kernel_choices", add_kernel_choices, METH_O, "Restore kernel choices (kernel_choices()'s format)."},
    {"avx512_direct_available", avx512_direct_available, METH_NOARGS,
     "True when the cpp backend's AVX-512 direct kernel (shallow float32 layers) can run on this CPU."},
    {"cuda_epilogue_policy", coordconv::py_epilogue_policy, METH_O,
     "Get (-1) or set the CUDA epilogue's policy: 0 rule, 1 vectors, 2 scalars, 3 split; returns the previous."},
    {"avx2_direct_available", avx2_direct_available, METH_NOARGS,
     "True when the cpp backend's AVX2 direct kernel can run on this CPU."},
    {"prepare_call", coordconv::py_prepare_call, METH_VARARGS,
     "A handle for call_prepared: the op's name and its arguments after the tensors, converted once."},
    {"call_prepared", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(coordconv::py_call_prepared)),
     METH_FASTCALL, "call_prepared(handle, input, weight, coord_weight, bias): the prepared op's output."},
    {"prepare_aten_call", coordconv::py_prepare_aten_call, METH_VARARGS,
     "A handle for call_aten: the torch backend's convolution arguments, converted once."},
    {"call_aten", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(coordconv::py_call_aten)), METH_FASTCALL,
     "call_aten(handle, input, weight, coord_weight, bias): the torch backend's output by ATen calls."},
    {"set_aten_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(coordconv::py_set_aten_entry)),
     METH_FASTCALL, "set_aten_entry(handle, input, weight, coord_weight, coords, columns, columns_last, out)."},
    {"call_signature", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(coordconv::py_call_signature)),
     METH_FASTCALL, "call_signature(input, weight, coord_weight, bias): the tensors' shapes, dtypes, devices."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing coordconv_fused._C loads this library and so registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "coordconv-fused C++/CUDA ops", -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* confirm = PyTuple_New(std::size(coordconv::kConfirmAfterCalls));
  for (size_t i = 0; confirm != nullptr && i < std::size(coordconv::kConfirmAfterCalls); ++i)
    PyTuple_SET_ITEM(confirm, i, PyLong_FromLong(coordconv::kConfirmAfterCalls[i]));
  if (confirm == nullptr || PyModule_AddObject(m, "KERNEL_CHOICE_CONFIRM_CALLS", confirm) != 0) {
    Py_XDECREF(confirm);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
