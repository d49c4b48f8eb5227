// The `cpp` backend's input gradient: the direct kernel per stride phase for layers on few input
// channels, ATen's convolution_backward otherwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../geometry.h"
#include "coord_term.h"
#include "cpu_ops.h"
#include "direct_simd.h"
#include "kernel_choice.h"

namespace coordconv {
namespace {

// ---- gradient of the input ---------------------------------------------------------------------

// For a layer on few input channels (a network's first layer), the input gradient is a convolution
// of grad_output with the flipped, transposed weight onto those few channels (per stride phase),
// where oneDNN's backward-data is slow; where it pays was measured in AVX-512 on one machine
// (docs/tuning.md), and holds for the AVX2 kernel on the layers measured since (docs/tuning.md).
inline bool input_grad_kernel_pays(int64_t c_in, int64_t c_out, int64_t taps, bool strided) {
  if (strided) return c_in <= 4;
  return c_in <= 8 || (c_in <= 16 && c_out * taps <= 300);
}

// One stride phase r of one axis of the input gradient: the input positions r, r + s, r + 2s, ...
// receive the taps t with (r + pad - t * dil) divisible by s, from grad_output positions
// a + (r + pad - t * dil) / s: a stride-1 correlation with the sub-kernel of those taps taken in
// descending order (`first_tap`, then every `step`-th below it), dilation `dil`, padding `pad`.
struct AxisPhase {
  int64_t out = 0, taps = 0, first_tap = 0, step = 1, dil = 1, pad = 0;
};

inline AxisPhase axis_phase(int64_t r, int64_t size, int64_t s, int64_t pad, int64_t dil, int64_t kernel) {
  AxisPhase ph;
  ph.out = r < size ? (size - r + s - 1) / s : 0;
  ph.first_tap = -1;
  for (int64_t t = kernel - 1; t >= 0; --t) {
    if (((r + pad - t * dil) % s + s) % s != 0) continue;
    if (ph.first_tap < 0) ph.first_tap = t;
    ++ph.taps;
  }
  if (ph.taps == 0) return ph;
  ph.step = s / std::gcd(dil, s);
  ph.dil = dil / std::gcd(dil, s);
  ph.pad = -((r + pad - ph.first_tap * dil) / s);  // exact: divisible by s
  return ph;
}

// The ISA in which the SIMD kernel can compute this input gradient, if any (float32, 1-D/2-D,
// groups 1, NCHW, on few input channels: a candidate for the measurement)...
std::optional<Isa> input_grad_kernel_isa(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                         bool transposed, int64_t groups) {
  const int64_t nd = input.dim() - 2;
  const auto isa = direct_isa();
  const bool ok = isa.has_value() && !transposed && groups == 1 && input.scalar_type() == at::kFloat &&
                  grad.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && (nd == 1 || nd == 2) &&
                  input.numel() > 0 && input.size(1) <= 32 &&
                  conv_output_format(input, weight) == at::MemoryFormat::Contiguous;
  return ok ? isa : std::nullopt;
}

// ...and whether the fixed rule of docs/tuning.md takes it (COORDCONV_CPU_KERNEL=heuristic; under
// measurement, the pick that another candidate must beat clearly), in either ISA.
bool input_grad_by_kernel(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, bool transposed, int64_t groups) {
  const bool strided = std::any_of(stride.begin(), stride.end(), [](int64_t v) { return v != 1; });
  int64_t taps = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) taps *= weight.size(d);
  return input_grad_kernel_isa(grad, input, weight, transposed, groups).has_value() &&
         input_grad_kernel_pays(input.size(1), weight.size(0), taps, strided);
}

// The stride-1 correlation of one stride phase (ph[ax] per axis D, H, W as in Geometry) of the input
// gradient: grad_output [N, C_out, *out] -> those input positions [N, C_in, *phase].
Geometry phase_geometry(const at::Tensor& grad, const at::Tensor& weight, const AxisPhase ph[3]) {
  const int64_t nd = grad.dim() - 2;
  Geometry g{};
  g.n = grad.size(0);
  g.c_in = weight.size(0);
  g.c_out = weight.size(1);
  g.groups = 1;
  g.ndim = static_cast<int32_t>(nd);
  for (int ax = 0; ax < 3; ++ax) {
    const int64_t k = ax - (3 - nd);  // index among the op's spatial axes, < 0 for lifted ones
    g.padded[ax] = g.image[ax] = k >= 0 ? grad.size(2 + k) : 1;
    g.kernel[ax] = ph[ax].taps;
    g.dil[ax] = ph[ax].dil;
    g.stride[ax] = 1;
    g.pad[ax] = ph[ax].pad;
    g.out[ax] = ph[ax].out;
  }
  return g;
}

// The phase's sub-kernel, transposed: w[ci, co, a, b] = weight[co, ci, h_a, w_b] over the phase's
// taps in descending order (h_a = first_tap - a * step on H, likewise on W); float32.
at::Tensor phase_weight(const at::Tensor& weight, const AxisPhase ph[3]) {
  const at::Tensor src = weight.contiguous();
  const int64_t nd = weight.dim() - 2, c_out = weight.size(0), c_in = weight.size(1);
  const int64_t KH = nd == 2 ? weight.size(2) : 1, KW = weight.size(nd + 1);
  const AxisPhase &h = ph[1], &wd = ph[2];
  std::vector<int64_t> sizes{c_in, c_out};
  if (nd == 2) sizes.push_back(h.taps);
  sizes.push_back(wd.taps);
  at::Tensor out = at::empty(sizes, weight.options());
  const float* s = src.data_ptr<float>();
  float* d = out.data_ptr<float>();
  for (int64_t ci = 0; ci < c_in; ++ci)
    for (int64_t co = 0; co < c_out; ++co)
      for (int64_t a = 0; a < h.taps; ++a)
        for (int64_t b = 0; b < wd.taps; ++b)
          *d++ = s[((co * c_in + ci) * KH + h.first_tap - a * h.step) * KW + wd.first_tap - b * wd.step];
  return out;
}

// The input gradient by the direct kernel, one stride phase (rh, rw) at a time: grad_output
// (C_out channels) -> those input positions (C_in channels), the phase's taps flipped.
at::Tensor input_grad_kernel(Impl impl, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nd = input.dim() - 2;
  const int64_t sh = nd == 2 ? stride[0] : 1, sw = stride[nd - 1];
  at::Tensor out = at::empty(input.sizes(), input.options());
  const at::Tensor grad_c = grad.contiguous();
  for (int64_t rh = 0; rh < sh; ++rh) {
    for (int64_t rw = 0; rw < sw; ++rw) {
      AxisPhase ph[3];  // D (unused), H, W as in Geometry
      ph[0].out = ph[0].taps = 1;
      ph[1] = nd == 2 ? axis_phase(rh, input.size(2), sh, padding[0], dilation[0], weight.size(2))
                      : AxisPhase{1, 1, 0, 1, 1, 0};
      ph[2] = axis_phase(rw, input.size(nd + 1), sw, padding[nd - 1], dilation[nd - 1], weight.size(nd + 1));
      if (ph[1].out == 0 || ph[2].out == 0) continue;
      at::Tensor target = out;  // this phase's positions of the input gradient
      if (nd == 2) target = target.slice(2, rh, c10::nullopt, sh);
      target = target.slice(nd + 1, rw, c10::nullopt, sw);
      if (ph[1].taps == 0 || ph[2].taps == 0) {
        target.zero_();
        continue;
      }
      const at::Tensor w = phase_weight(weight, ph);
      const Geometry g = phase_geometry(grad, weight, ph);
      if (sh == 1 && sw == 1) {
        run_direct_simd(impl, g, grad_c, w, nullptr, at::Tensor(), out);
      } else {
        at::Tensor part = at::empty(target.sizes(), input.options());
        run_direct_simd(impl, g, grad_c, w, nullptr, at::Tensor(), part);
        target.copy_(part);
      }
    }
  }
  return out;
}

// What the input gradient's choice for a layer starts from: the candidates (none where the direct
// kernel does not apply: then ATen's call is the one way), the fixed rule's pick, and the layer as
// the key of the measured choice (the convolution's geometry, nothing pre-padded). The candidates:
// ATen, the kernel's first tile shape, and its 3-channel tile where the input gradient has at most
// 3 channels (an RGB input layer).
struct InputGradChoice {
  std::vector<Impl> candidates;
  Impl heuristic = Impl::kAten;
  Geometry layer{};
};

InputGradChoice input_grad_choice(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  bool transposed, int64_t groups) {
  InputGradChoice c;
  const auto isa = input_grad_kernel_isa(grad, input, weight, transposed, groups);
  if (!isa) return c;
  c.candidates = {Impl::kAten, simd_impl(*isa)};
  if (input.size(1) <= kOcBlockNarrow) c.candidates.push_back(narrow_impl(*isa));
  c.heuristic = input_grad_by_kernel(grad, input, weight, stride, transposed, groups) ? simd_impl(*isa) : Impl::kAten;
  const std::vector<int64_t> no_pre_pad(2 * (input.dim() - 2), 0);
  c.layer = make_geometry(input, weight, c10::nullopt, stride, padding, dilation, transposed, groups, no_pre_pad,
                          "zeros", false, false);
  return c;
}

}  // namespace

Impl input_grad_impl(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                     int64_t groups) {
  const InputGradChoice c = input_grad_choice(grad, input, weight, stride, padding, dilation, transposed, groups);
  if (c.candidates.empty()) return Impl::kAten;
  return choose_impl("input_grad", c.layer, input.scalar_type(), c.candidates, c.heuristic, [&](Impl impl) {
    input_grad_by(impl, grad, input, weight, stride, padding, dilation, transposed, output_padding, groups);
  });
}

Impl backward_impl(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                   int64_t groups, bool need_b) {
  InputGradChoice c = input_grad_choice(grad, input, weight, stride, padding, dilation, transposed, groups);
  if (c.candidates.empty()) return Impl::kAten;
  c.layer.has_bias = need_b;  // (timed with the bias gradient where it is asked for)
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  return choose_impl("backward", c.layer, input.scalar_type(), c.candidates, c.heuristic, [&](Impl impl) {
    if (impl == Impl::kAten) {  // nn.Conv2d's call
      at::convolution_backward(grad, input, weight, need_b ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt, stride,
                               padding, dilation, transposed, output_padding, groups, {true, true, need_b});
    } else {
      input_grad_by(impl, grad, input, weight, stride, padding, dilation, transposed, output_padding, groups);
      at::convolution_backward(grad, input, weight, c10::nullopt, stride, padding, dilation, transposed, output_padding,
                               groups, {false, true, false});
    }
  });
}

at::Tensor input_grad_by(Impl impl, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                         at::IntArrayRef output_padding, int64_t groups) {
  const AutocastOff autocast_off;
  if (is_simd(impl)) return input_grad_kernel(impl, grad, input, weight, stride, padding, dilation);
  return std::get<0>(at::convolution_backward(grad, input, weight, c10::nullopt, stride, padding, dilation, transposed,
                                              output_padding, groups, {true, false, false}));
}

at::Tensor input_grad_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                          at::IntArrayRef output_padding, int64_t groups) {
  const Impl impl = input_grad_impl(grad, input, weight, stride, padding, dilation, transposed, output_padding, groups);
  return input_grad_by(impl, grad, input, weight, stride, padding, dilation, transposed, output_padding, groups);
}

}  // namespace coordconv
