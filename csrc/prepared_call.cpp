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
#include <utility>
#include <vector>

#include "autograd/coord_conv_autograd.h"
#include "autograd/device_term.h"

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

// ---- the `torch` backend's steady state -----------------------------------------------------------
// The same ATen calls as coordconv_fused/ops/aten.py's prepare_forward, made from C++ after the first
// call of an input signature (the Python path makes the coordinates then and hands them over,
// set_aten_entry). Autograd is ATen's (the calls are made above the Autograd key), so second order
// comes for free; the device path's term is one node of its own (autograd/device_term.h).
//  * The CPU path: the data convolution with its bias, plus the batch-of-one coordinate term
//    P = conv(coords, coord_weight), added in place; P kept by the values of coord_weight where no
//    gradient of it is wanted.
//  * The device path (off the CPU; tests run it on CPU tensors): the data convolution without its
//    bias, then P plus the bias by one small GEMM of the coordinate filter with the signature's
//    im2col matrix, added in place in one pass over the output seen in its memory order, recorded as
//    one autograd node whose backward reduces the output's gradient over the batch once for both
//    gradients. Nothing read from device memory: no synchronisation.

constexpr const char* kAtenCapsule = "coordconv_fused.aten_call";

// What an input signature keeps: its coordinates (CPU path) or their im2col matrix (device path).
struct AtenEntry {
  std::vector<int64_t> signature;
  at::Tensor coords;   // [1, d, ...] in the output's memory format (CPU path)
  at::Tensor columns;  // [k, points], or [points, k] where `columns_last` (device path)
  bool columns_last = false;
  bool out_contiguous = true;  // the output's layout the columns were made for
};

// The CPU path's term P of the coord_weight values `weight`, made from `coords`.
struct KeptTerm {
  at::Tensor coords, weight, term;
};

struct AtenCall {
  std::vector<int64_t> stride, padding, dilation, output_padding;
  bool transposed = false;
  int64_t groups = 1;
  std::vector<int64_t> t_stride, t_padding, t_dilation, t_output_padding;  // the term's convolution
  bool t_transposed = false;
  bool cpu_path = true;  // whether CPU tensors take the CPU path
  // Guards what follows: calls from several threads share a layer. Held only to copy or swap these
  // pointers, never while a tensor is released: releasing one may drop a Python object, whose
  // finalizers may release the GIL, which a thread waiting for `mu` could hold.
  std::mutex mu;
  std::shared_ptr<const AtenEntry> entry;
  std::shared_ptr<const KeptTerm> kept;
};

namespace {

bool int64_list(PyObject* seq, const char* name, std::vector<int64_t>* out) {
  std::vector<c10::SymInt> v;
  if (!int_list(seq, name, &v)) return false;
  out->clear();
  for (const auto& s : v) out->push_back(s.expect_int());
  return true;
}

// Whether `coord_weight` is a channels-last (not contiguous) filter: flattened in its memory order
// (C_out, *taps, d) it is a view (ops/aten.py's _channels_last_filter).
bool channels_last_filter(const at::Tensor& coord_weight, bool transposed) {
  if (transposed || coord_weight.is_contiguous()) return false;
  if (coord_weight.dim() == 4) return coord_weight.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (coord_weight.dim() == 5) return coord_weight.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// What the kept coordinates depend on beyond the layer: the input's sizes, dtype and device, the
// memory formats from which ATen lays out the output, and (device path) the filter's layout.
std::vector<int64_t> aten_signature(const at::Tensor& input, const at::Tensor& weight, bool cw_last) {
  std::vector<int64_t> s(input.sizes().begin(), input.sizes().end());
  s.push_back(static_cast<int64_t>(input.scalar_type()));
  s.push_back((static_cast<int64_t>(input.device().type()) << 16) | (input.device().index() + 1));
  s.push_back(static_cast<int64_t>(input.suggest_memory_format()));
  s.push_back(static_cast<int64_t>(weight.suggest_memory_format()));
  s.push_back(cw_last ? 1 : 0);
  return s;
}

// The CPU path's output after the data convolution `out` (with its bias).
at::Tensor cpu_path_output(AtenCall* call, at::Tensor out, const at::Tensor& coords, const at::Tensor& coord_weight) {
  auto make_term = [&] {
    return at::convolution(coords, coord_weight, std::nullopt, call->t_stride, call->t_padding, call->t_dilation,
                           call->t_transposed, call->t_output_padding, 1);
  };
  if (coord_weight.requires_grad() && at::GradMode::is_enabled()) return out.add_(make_term());
  // P of the last coord_weight values, compared by value: `param.data.copy_(...)` changes a
  // parameter without bumping its version.
  std::shared_ptr<const KeptTerm> kept;
  {
    const std::lock_guard<std::mutex> lock(call->mu);
    kept = call->kept;
  }
  if (kept != nullptr && kept->coords.is_same(coords) && kept->weight.sizes() == coord_weight.sizes() &&
      kept->weight.scalar_type() == coord_weight.scalar_type() && at::equal(kept->weight, coord_weight))
    return out.add_(kept->term);
  auto fresh = std::make_shared<const KeptTerm>(KeptTerm{coords, coord_weight.detach().clone(), make_term()});
  out.add_(fresh->term);
  std::shared_ptr<const KeptTerm> replaced;  // (released after the lock)
  {
    const std::lock_guard<std::mutex> lock(call->mu);
    replaced = std::exchange(call->kept, std::move(fresh));
  }
  return out;
}

}  // namespace

PyObject* py_prepare_aten_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *stride, *padding, *dilation, *output_padding, *t_stride, *t_padding, *t_dilation, *t_output_padding;
  int transposed = 0, t_transposed = 0, cpu_path = 1;
  long long groups = 1;
  if (!PyArg_ParseTuple(args, "OOOpOLOOOpOp:prepare_aten_call", &stride, &padding, &dilation, &transposed,
                        &output_padding, &groups, &t_stride, &t_padding, &t_dilation, &t_transposed, &t_output_padding,
                        &cpu_path))
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
  call->cpu_path = cpu_path != 0;
  return to_capsule(call, kAtenCapsule);
  END_HANDLE_TH_ERRORS
}

PyObject* py_set_aten_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args(nargs, 8, "set_aten_entry(handle, input, weight, coord_weight, coords, columns, columns_last, out)"))
    return nullptr;
  auto* call = static_cast<AtenCall*>(PyCapsule_GetPointer(args[0], kAtenCapsule));
  if (call == nullptr) return nullptr;
  PyObject* columns = args[5];
  if (!plain_tensor(args[1]) || !plain_tensor(args[2]) || !plain_tensor(args[3]) || !plain_tensor(args[4]) ||
      !plain_tensor(args[7]) || (columns != Py_None && !plain_tensor(columns)))
    Py_RETURN_NONE;  // (nothing kept: such calls take the Python path)
  const at::Tensor& input = THPVariable_Unpack(args[1]);
  const bool host = input.is_cpu() && call->cpu_path;
  if (host == (columns != Py_None)) {
    PyErr_SetString(PyExc_ValueError, "set_aten_entry: columns are kept on the device path, and only there");
    return nullptr;
  }
  auto entry = std::make_shared<AtenEntry>();
  entry->signature = aten_signature(input, THPVariable_Unpack(args[2]),
                                    !host && channels_last_filter(THPVariable_Unpack(args[3]), call->transposed));
  entry->coords = THPVariable_Unpack(args[4]);
  if (!host) {
    entry->columns = THPVariable_Unpack(columns);
    entry->columns_last = PyObject_IsTrue(args[6]) == 1;
    entry->out_contiguous = THPVariable_Unpack(args[7]).is_contiguous();
  }
  std::shared_ptr<const AtenEntry> old;
  {
    const std::lock_guard<std::mutex> lock(call->mu);
    old = std::exchange(call->entry, std::move(entry));  // (released after the lock)
  }
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
  if (input.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) Py_RETURN_NOTIMPLEMENTED;
  const bool host = input.is_cpu() && call->cpu_path;
  const bool cw_last = !host && channels_last_filter(coord_weight, call->transposed);
  std::shared_ptr<const AtenEntry> entry;
  {
    const auto signature = aten_signature(input, weight, cw_last);
    const std::lock_guard<std::mutex> lock(call->mu);
    if (call->entry == nullptr || signature != call->entry->signature) Py_RETURN_NOTIMPLEMENTED;
    entry = call->entry;
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    // (off the CPU the bias goes into the term: cuDNN adds a bias in a pass of its own)
    out = at::convolution(input, weight, host ? bias : std::nullopt, call->stride, call->padding, call->dilation,
                          call->transposed, call->output_padding, call->groups);
    if (host) {
      out = cpu_path_output(call, std::move(out), entry->coords, coord_weight);
    } else if (out.is_contiguous() == entry->out_contiguous) {
      out = autograd::add_device_term(std::move(out), coord_weight, bias, entry->columns,
                                      {entry->columns_last, call->transposed, cw_last});
    } else {
      out = at::Tensor();  // (a layout the signature did not foresee: the Python path, never seen)
    }
  }
  if (!out.defined()) Py_RETURN_NOTIMPLEMENTED;
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
