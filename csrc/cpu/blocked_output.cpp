// oneDNN's convolution into its blocked layout + one pass to NCHW with the coordinate term
// (blocked_output.h).
#include "blocked_output.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "blocked_pass.h"
#include "direct_simd.h"
#include "kernel_choice.h"

namespace coordconv {
namespace {

// A layer's output format: `block` channels per block (0: not known), and the calls that found none;
// and the serialized oneDNN description of its input's plain layout (see input_view), empty until
// made (or where it cannot be: the input is then copied).
struct Format {
  int64_t block = 0;
  int misses = 0;
  std::shared_ptr<const std::vector<uint8_t>> input_md;
  bool input_md_failed = false;
};
constexpr int kMaxMisses = 3;

// Whether some layer has reached kMaxMisses: until one has, a call's eligibility looks nothing up.
std::atomic<bool>& any_given_up() {
  static std::atomic<bool> v{false};
  return v;
}

std::mutex& formats_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<std::string, Format>& formats() {
  static std::unordered_map<std::string, Format> f;
  return f;
}

std::string format_key(const Geometry& g) { return layer_key("blocked_output", g, at::kFloat, at::get_num_threads()); }

// The buffer of a oneDNN tensor, through PyTorch's stable C shim; null where it has none.
const float* onednn_buffer(at::Tensor& t) {
  void* ptr = nullptr;
  if (aoti_torch_get_data_ptr(torch::aot_inductor::tensor_pointer_to_tensor_handle(&t), &ptr) != AOTI_TORCH_SUCCESS)
    return nullptr;
  return static_cast<const float*>(ptr);
}

// The serialized oneDNN memory description of a plain (NCHW) float32 tensor of `sizes`: the one
// oneDNN gives an empty oneDNN tensor of that shape (`mkldnn::_get_mkldnn_serialized_md`, which
// AOTInductor uses to save oneDNN constants). Null where that op is not there.
std::shared_ptr<const std::vector<uint8_t>> plain_md(at::IntArrayRef sizes) {
  const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_get_mkldnn_serialized_md", ""});
  if (!op.has_value()) return nullptr;
  const at::Tensor empty = at::empty(sizes, at::TensorOptions().dtype(at::kFloat).layout(at::kMkldnn));
  const at::Tensor blob = op->typed<at::Tensor(const at::Tensor&)>().call(empty).contiguous();
  if (blob.scalar_type() != at::kByte || blob.numel() == 0) return nullptr;
  const uint8_t* b = blob.const_data_ptr<uint8_t>();
  return std::make_shared<const std::vector<uint8_t>>(b, b + blob.numel());
}

// A oneDNN tensor over `input`'s own memory (contiguous NCHW float32), described by `md`, through
// the stable C shim's tensor-from-blob (the path AOTInductor takes for oneDNN constants): no copy.
// Undefined where the shim refuses. The view does not own the memory: `input` outlives its use.
at::Tensor input_view(const at::Tensor& input, const std::vector<uint8_t>& md) {
  AtenTensorHandle handle = nullptr;
  if (aoti_torch_create_tensor_from_blob_v2(const_cast<void*>(input.const_data_ptr()), input.dim(),
                                            input.sizes().data(), input.strides().data(), 0, aoti_torch_dtype_float32(),
                                            aoti_torch_device_type_cpu(), 0, &handle, aoti_torch_layout__mkldnn(),
                                            md.data(), static_cast<int64_t>(md.size())) != AOTI_TORCH_SUCCESS)
    return at::Tensor();
  at::Tensor view = *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle);
  aoti_torch_delete_tensor_object(handle);
  return view;
}

// plain_md for `x`'s shape, once a view of `x` by it reads back as `x` bit for bit (oneDNN's own
// reorder to dense; NaNs included): null where it cannot be made or does not.
std::shared_ptr<const std::vector<uint8_t>> checked_plain_md(const at::Tensor& x) {
  try {
    auto md = plain_md(x.sizes());
    if (!md) return nullptr;
    const at::Tensor view = input_view(x, *md);
    if (!view.defined()) return nullptr;
    const at::Tensor dense = view.to_dense().contiguous();
    return dense.sizes() == x.sizes() && std::memcmp(dense.const_data_ptr(), x.const_data_ptr(), x.nbytes()) == 0
               ? md
               : nullptr;
  } catch (const c10::Error&) {
    return nullptr;
  }
}

// Offset of element (n, c, h, w) in the format of `block` channels per block: [N][C/b][H][W][b].
inline int64_t blocked_offset(const OutputShape& s, int64_t block, int64_t n, int64_t c, int64_t hw) {
  return ((n * (s.c / block) + c / block) * s.oh * s.ow + hw) * block + c % block;
}

// Whether `src` read in the format of `block` equals `dense` (NCHW) bit for bit.
bool reads_as(const OutputShape& s, const float* src, int64_t block, const float* dense) {
  const int64_t hw = s.oh * s.ow;
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c) {
      const float* d = dense + (n * s.c + c) * hw;
      for (int64_t i = 0; i < hw; ++i)
        if (std::memcmp(src + blocked_offset(s, block, n, c, i), d + i, sizeof(float)) != 0) return false;
    }
  return true;
}

// The block of `ym`'s format among those blocked_output.h names, by its reading against oneDNN's own
// reorder: 0 where none reads as it, -1 where several do (data that cannot tell them apart, e.g. all
// zeros). (Every format read has C a multiple of its block, so none is larger than the NCHW output:
// no read leaves oneDNN's buffer, whatever its format.)
constexpr int64_t kAmbiguous = -1;

int64_t recognise(const OutputShape& s, const float* src, const at::Tensor& ym) {
  const at::Tensor dense = ym.to_dense().contiguous();
  std::vector<int64_t> blocks;
  for (int64_t b : {int64_t{1}, int64_t{8}, int64_t{16}, s.c})
    if (s.c % b == 0 && std::find(blocks.begin(), blocks.end(), b) == blocks.end()) blocks.push_back(b);
  int64_t found = 0;
  for (int64_t b : blocks) {
    if (!reads_as(s, src, b, dense.const_data_ptr<float>())) continue;
    if (found != 0) return kAmbiguous;
    found = b;
  }
  return found;
}

}  // namespace

bool blocked_output_eligible(const Geometry& g, const at::Tensor& input, at::MemoryFormat format) {
#if defined(COORDCONV_HAVE_SIMD_KERNEL)
  if (!(at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && isa_supported(Isa::kAvx2) &&
        input.scalar_type() == at::kFloat && format == at::MemoryFormat::Contiguous && g.ndim == 2 && g.groups == 1 &&
        g.c_out % 8 == 0))
    return false;
  if (!any_given_up().load(std::memory_order_relaxed)) return true;
  std::lock_guard<std::mutex> lock(formats_mutex());
  const auto it = formats().find(format_key(g));
  return it == formats().end() || it->second.misses < kMaxMisses;
#else
  (void)g, (void)input, (void)format;
  return false;
#endif
}

at::Tensor forward_blocked(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const CoordTerm& coord, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
#if defined(COORDCONV_HAVE_SIMD_KERNEL)
  const std::string key = format_key(g);
  Format known;
  {
    std::lock_guard<std::mutex> lock(formats_mutex());
    const auto it = formats().find(key);
    if (it != formats().end()) known = it->second;
  }
  if (known.block == 0 && known.misses >= kMaxMisses) return at::Tensor();
  at::Tensor ym;
  const float* src = nullptr;
  try {
    // The input as a oneDNN tensor: a view of its memory where its description could be made (then
    // oneDNN reorders it into its blocked input layout, as in ATen's NCHW convolution), else a copy.
    const at::Tensor x = input.contiguous();
    if (!known.input_md && !known.input_md_failed) {
      known.input_md = checked_plain_md(x);
      std::lock_guard<std::mutex> lock(formats_mutex());
      Format& f = formats()[key];
      f.input_md = known.input_md;
      f.input_md_failed = !known.input_md;
    }
    at::Tensor xm = known.input_md ? input_view(x, *known.input_md) : at::Tensor();
    if (!xm.defined()) xm = x.to_mkldnn();
    ym = at::mkldnn_convolution(xm, weight.contiguous(), bias, padding, stride, dilation, /*groups=*/1);
    src = onednn_buffer(ym);
  } catch (const c10::Error&) {  // (a layer oneDNN refuses here: computed by ATen's path, and not tried again)
  }
  if (src == nullptr) {
    std::lock_guard<std::mutex> lock(formats_mutex());
    formats()[key].misses = kMaxMisses;
    any_given_up() = true;
    return at::Tensor();
  }
  const OutputShape s{g.n, g.c_out, g.out[1], g.out[2]};
  if (known.block == 0) {
    const int64_t block = recognise(s, src, ym);
    if (block == kAmbiguous) return at::Tensor();  // (not a miss: the next call's data may tell)
    std::lock_guard<std::mutex> lock(formats_mutex());
    Format& f = formats()[key];
    f.block = block;
    f.misses += block == 0;
    if (f.misses >= kMaxMisses) any_given_up() = true;
    if (block == 0) return at::Tensor();
    known = f;
  }
  at::Tensor y = at::empty(output_sizes(g), input.options());
  const AffineRows& a = coord.affine;
  const BlockedPass pass{s,
                         known.block,
                         src,
                         coord.P.const_data_ptr<float>(),
                         a.uv.defined() ? a.uv.const_data_ptr<float>() : nullptr,
                         a.lo,
                         a.hi,
                         y.data_ptr<float>()};
  RECORD_FUNCTION("coordconv_fused::onednn_blocked", c10::ArrayRef<const c10::IValue>{});
  run_blocked_pass(pass);
  return y;
#else
  (void)g, (void)input, (void)weight, (void)bias, (void)coord, (void)stride, (void)padding, (void)dilation;
  return at::Tensor();
#endif
}

void clear_blocked_formats() {
  std::lock_guard<std::mutex> lock(formats_mutex());
  formats().clear();
  any_given_up() = false;
}

}  // namespace coordconv
