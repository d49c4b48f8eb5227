// The per-call fast path of the `cpp` and `cuda` backends (coordconv_fused/backends/native.py): a
// call of coordconv_fused::coord_conv_ext whose non-tensor arguments were converted once, when the
// layer's call was prepared, instead of on every call by torch.ops' generic argument matching (and
// OpOverload.__call__'s Python frame). On the Xeon that matching costs ~5 us for aten::convolution's 9
// arguments (torch.ops.aten.convolution 14.8 us against torch.convolution's own binding 9.5 us on a
// (1,3,8,8) input); for this op's 14, a tiny layer's forward went from 27.0 to 14.1 us (docs/tuning.md).
// The call goes through the dispatcher as torch.ops' does (autograd, tracing, fake tensors and
// dispatch modes see the same op), with the GIL released like ATen's bindings release it.
#include "prepared_call.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/grad_mode.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "autograd/coord_conv_autograd.h"

namespace coordconv {
namespace {

using autograd::ConvArgs;
using autograd::ForwardSig;

constexpr const char* kCapsule = "coordconv_fused.prepared_call";

struct PreparedCall {
  c10::TypedOperatorHandle<ForwardSig> op;
  ConvArgs args;
};

// A Python sequence of ints as SymInts; false (with a Python error set) otherwise.
bool int_list(PyObject* seq, const char* name, std::vector<c10::SymInt>* out) {
  PyObject* fast = PySequence_Fast(seq, name);
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out->clear();
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    if (v == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return false;
    }
    out->emplace_back(static_cast<int64_t>(v));
  }
  Py_DECREF(fast);
  return true;
}

// Whether `obj` is a tensor that torch.ops would hand to the op as it is: a torch.Tensor or an
// nn.Parameter (other subclasses may override __torch_function__), no torch function mode on.
bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj) && !at::impl::torch_function_mode_enabled(); }

// Whether a fast-call function got `expected` arguments; false with a TypeError naming `usage`.
bool expect_args(Py_ssize_t nargs, Py_ssize_t expected, const char* usage) {
  if (nargs == expected) return true;
  PyErr_SetString(PyExc_TypeError, usage);
  return false;
}

// `object` handed to a new capsule that deletes it; nullptr (and `object` still owned) on failure.
template <typename T>
PyObject* to_capsule(std::unique_ptr<T>& object, const char* name) {
  PyObject* capsule = PyCapsule_New(
      object.get(), name, [](PyObject* c) { delete static_cast<T*>(PyCapsule_GetPointer(c, PyCapsule_GetName(c))); });
  if (capsule != nullptr) object.release();
  return capsule;
}

// A call's tensors (input, weight, coord_weight, bias or None) from args[0..3], if all are plain.
struct CallTensors {
  const at::Tensor& input;
  const at::Tensor& weight;
  const at::Tensor& coord_weight;
  std::optional<at::Tensor> bias;
};

std::optional<CallTensors> call_tensors(PyObject* const* args) {
  PyObject* bias = args[3];
  if (!plain_tensor(args[0]) || !plain_tensor(args[1]) || !plain_tensor(args[2]) ||
      (bias != Py_None && !plain_tensor(bias)))
    return std::nullopt;
  return CallTensors{THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]),
                     bias == Py_None ? std::nullopt : std::optional<at::Tensor>(THPVariable_Unpack(bias))};
}

}  // namespace

PyObject* py_prepare_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char *name = nullptr, *mode = nullptr;
  PyObject *stride, *padding, *dilation, *output_padding, *pre_pad;
  int transposed = 0, with_r = 0, separate = 0;
  long long groups = 1;
  if (!PyArg_ParseTuple(args, "sOOOpOLOspp:prepare_call", &name, &stride, &padding, &dilation, &transposed,
                        &output_padding, &groups, &pre_pad, &mode, &with_r, &separate))
    return nullptr;
  auto call = std::make_unique<PreparedCall>(
      PreparedCall{c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<ForwardSig>(), ConvArgs{}});
  ConvArgs& a = call->args;
  if (!int_list(stride, "stride", &a.stride) || !int_list(padding, "padding", &a.padding) ||
      !int_list(dilation, "dilation", &a.dilation) || !int_list(output_padding, "output_padding", &a.output_padding) ||
      !int_list(pre_pad, "pre_pad", &a.pre_pad))
    return nullptr;
  a.transposed = transposed != 0;
  a.groups = c10::SymInt(static_cast<int64_t>(groups));
  a.pre_pad_mode = mode;
  a.with_r = with_r != 0;
  a.separate = separate != 0;
  return to_capsule(call, kCapsule);
  END_HANDLE_TH_ERRORS
}

PyObject* py_call_prepared(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args(nargs, 5, "call_prepared(call, input, weight, coord_weight, bias)")) return nullptr;
  const auto* call = static_cast<const PreparedCall*>(PyCapsule_GetPointer(args[0], kCapsule));
  if (call == nullptr) return nullptr;
  const auto tensors = call_tensors(args + 1);
  if (!tensors) Py_RETURN_NOTIMPLEMENTED;  // (the caller then takes torch.ops' path, which handles the rest)
  const auto& [input, weight, coord_weight, bias] = *tensors;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = autograd::with_args(call->args,
                              [&](auto... a) { return call->op.call(input, weight, coord_weight, bias, a...); });
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// ---- the `torch` backend on CPU tensors ---------------------------------------------------------
// The same ATen calls as coordconv_fused/ops/aten.py's prepare_forward (its CPU path): the data
// convolution with its bias, plus the batch-of-one coordinate term P = conv(coords, coord_weight),
// added in place; P kept by the values of coord_weight where no gradient of it is wanted. Autograd
// is ATen's (the calls are made above the Autograd key), so second order comes for free. Here only
// the steady state: the coordinates of an input signature are made, the first time, in Python
// (set_aten_coords).

constexpr const char* kAtenCapsule = "coordconv_fused.aten_call";

struct AtenCall {
  std::vector<int64_t> stride, padding, dilation, output_padding;
  bool transposed = false;
  int64_t groups = 1;
  std::vector<int64_t> t_stride, t_padding, t_dilation, t_output_padding;  // the term's convolution
  bool t_transposed = false;
  std::mutex mu;  // guards what follows (calls from several threads share a layer)
  std::vector<int64_t> signature;
  at::Tensor coords;                          // [1, d, ...] of `signature`
  at::Tensor kept_coords, kept_weight, term;  // P of the coord_weight values `kept_weight`
};

namespace {

bool int64_list(PyObject* seq, const char* name, std::vector<int64_t>* out) {
  std::vector<c10::SymInt> v;
  if (!int_list(seq, name, &v)) return false;
  out->clear();
  for (const auto& s : v) out->push_back(s.expect_int());
  return true;
}

// What the coordinates depend on beyond the layer: the input's sizes, dtype and device, and the
// memory formats from which ATen lays out the output (coords are kept in the output's format).
std::vector<int64_t> aten_signature(const at::Tensor& input, const at::Tensor& weight) {
  std::vector<int64_t> s(input.sizes().begin(), input.sizes().end());
  s.push_back(static_cast<int64_t>(input.scalar_type()));
  s.push_back(static_cast<int64_t>(input.suggest_memory_format()));
  s.push_back(static_cast<int64_t>(weight.suggest_memory_format()));
  return s;
}

}  // namespace

PyObject* py_prepare_aten_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *stride, *padding, *dilation, *output_padding, *t_stride, *t_padding, *t_dilation, *t_output_padding;
  int transposed = 0, t_transposed = 0;
  long long groups = 1;
  if (!PyArg_ParseTuple(args, "OOOpOLOOOpO:prepare_aten_call", &stride, &padding, &dilation, &transposed,
                        &output_padding, &groups, &t_stride, &t_padding, &t_dilation, &t_transposed, &t_output_padding))
    return nullptr;
  auto call = std::make_unique<AtenCall>();
  if (!int64_list(stride, "stride", &call->stride) || !int64_list(padding, "padding", &call->padding) ||
      !int64_list(dilation, "dilation", &call->dilation) ||
      !int64_list(output_padding, "output_padding", &call->output_padding) ||
      !int64_list(t_stride, "term stride", &call->t_stride) ||
      !int64_list(t_padding, "term padding", &call->t_padding) ||
      !int64_list(t_dilation, "term dilation", &call->t_dilation) ||
      !int64_list(t_output_padding, "term output_padding", &call->t_output_padding))
    return nullptr;
  call->transposed = transposed != 0;
  call->t_transposed = t_transposed != 0;
  call->groups = groups;
  return to_capsule(call, kAtenCapsule);
  END_HANDLE_TH_ERRORS
}

PyObject* py_set_aten_coords(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args(nargs, 4, "set_aten_coords(handle, input, weight, coords)")) return nullptr;
  auto* call = static_cast<AtenCall*>(PyCapsule_GetPointer(args[0], kAtenCapsule));
  if (call == nullptr) return nullptr;
  if (!plain_tensor(args[1]) || !plain_tensor(args[2]) || !plain_tensor(args[3])) Py_RETURN_NONE;
  auto signature = aten_signature(THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]));
  const std::lock_guard<std::mutex> lock(call->mu);
  call->signature = std::move(signature);
  call->coords = THPVariable_Unpack(args[3]);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* py_call_aten(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args(nargs, 5, "call_aten(handle, input, weight, coord_weight, bias)")) return nullptr;
  auto* call = static_cast<AtenCall*>(PyCapsule_GetPointer(args[0], kAtenCapsule));
  if (call == nullptr) return nullptr;
  const auto tensors = call_tensors(args + 1);
  if (!tensors) Py_RETURN_NOTIMPLEMENTED;
  const auto& [input, weight, coord_weight, bias] = *tensors;
  if (!input.is_cpu() || input.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor coords;
  {
    const auto signature = aten_signature(input, weight);
    const std::lock_guard<std::mutex> lock(call->mu);
    if (signature != call->signature) Py_RETURN_NOTIMPLEMENTED;
    coords = call->coords;
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = at::convolution(input, weight, bias, call->stride, call->padding, call->dilation, call->transposed,
                          call->output_padding, call->groups);
    auto make_term = [&] {
      return at::convolution(coords, coord_weight, std::nullopt, call->t_stride, call->t_padding, call->t_dilation,
                             call->t_transposed, call->t_output_padding, 1);
    };
    if (coord_weight.requires_grad() && at::GradMode::is_enabled()) {
      out.add_(make_term());
    } else {
      // P of the last coord_weight values, compared by value: `param.data.copy_(...)` changes a
      // parameter without bumping its version.
      at::Tensor term;
      {
        const std::lock_guard<std::mutex> lock(call->mu);
        if (call->kept_coords.is_same(coords) && call->kept_weight.sizes() == coord_weight.sizes() &&
            call->kept_weight.scalar_type() == coord_weight.scalar_type() && at::equal(call->kept_weight, coord_weight))
          term = call->term;
      }
      if (!term.defined()) {
        term = make_term();
        auto kept = coord_weight.detach().clone();
        const std::lock_guard<std::mutex> lock(call->mu);
        call->kept_coords = coords;
        call->kept_weight = std::move(kept);
        call->term = term;
      }
      out.add_(term);
    }
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* py_call_signature(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args(nargs, 4, "call_signature(input, weight, coord_weight, bias)")) return nullptr;
  // Per tensor: its rank, its sizes, its dtype and its device; -1 for an absent bias. (A plan's
  // tensors are at most 5-D; room for 8.)
  std::array<int64_t, 4 * (1 + 8 + 2)> words{};
  size_t n = 0;
  for (Py_ssize_t i = 0; i < 4; ++i) {
    if (i == 3 && args[i] == Py_None) {
      words[n++] = -1;
      continue;
    }
    if (!plain_tensor(args[i])) Py_RETURN_NOTIMPLEMENTED;
    const at::Tensor& t = THPVariable_Unpack(args[i]);
    if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || t.dim() > 8) Py_RETURN_NOTIMPLEMENTED;
    words[n++] = t.dim();
    for (const int64_t s : t.sizes()) words[n++] = s;
    words[n++] = static_cast<int64_t>(t.scalar_type());
    words[n++] = (static_cast<int64_t>(t.device().type()) << 16) | (t.device().index() + 1);
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(n * sizeof(int64_t)));
  END_HANDLE_TH_ERRORS
}

}  // namespace coordconv
