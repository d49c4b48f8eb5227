// coordconv_fused._C.prepare_call / call_prepared: the `cpp` and `cuda` backends' per-call path
// (prepared_call.cpp).
#pragma once

#include <Python.h>

namespace coordconv {

// prepare_call(op_name, stride, padding, dilation, transposed, output_padding, groups, pre_pad,
// pre_pad_mode, with_r, separate) -> an opaque handle (a capsule) for call_prepared.
PyObject* py_prepare_call(PyObject* self, PyObject* args);

// call_prepared(handle, input, weight, coord_weight, bias) -> the op's output, or NotImplemented
// where an argument is not a plain tensor (a __torch_function__ override or mode: torch.ops then).
PyObject* py_call_prepared(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

// prepare_aten_call(stride, padding, dilation, transposed, output_padding, groups, term_stride,
// term_padding, term_dilation, term_transposed, term_output_padding, cpu_path) -> a handle (a capsule)
// for call_aten and set_aten_entry: the `torch` backend's per-call path (coordconv_fused/backends/
// aten.py); `cpu_path` false runs the device path on CPU tensors too (tests).
PyObject* py_prepare_aten_call(PyObject* self, PyObject* args);

// call_aten(handle, input, weight, coord_weight, bias) -> the layer's output by ATen calls, or
// NotImplemented where the Python path must run (not plain tensors, symbolic sizes, or nothing kept
// for this input's signature yet).
PyObject* py_call_aten(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

// set_aten_entry(handle, input, weight, coord_weight, coords, columns, columns_last, out): keep, for
// the signature of this call, its coordinates and (device path; None on the CPU path) their im2col
// matrix, [points, k] where `columns_last` else [k, points], made for the layout of `out`.
PyObject* py_set_aten_entry(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

// call_signature(input, weight, coord_weight, bias) -> bytes: the shapes, dtypes and devices of the
// tensors (bias may be None), packed, for the key of a call's plan (functional.py); NotImplemented
// where an argument is not a plain tensor, a size is symbolic, or a torch function mode is on.
PyObject* py_call_signature(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace coordconv
