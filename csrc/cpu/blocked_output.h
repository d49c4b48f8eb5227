// The forward through oneDNN's own output layout (the implementation `onednn_blocked` of
// kernel_choice.h): oneDNN's convolution into the channel-blocked layout it computes in, then one
// pass that writes NCHW with the coordinate term added.
//
// ATen's NCHW convolution is already two passes: oneDNN convolves into a blocked layout (`aBcd8b`:
// [N][C/8][H][W][8], with AVX2; `aBcd16b` with AVX-512) and reorders that into NCHW. The coordinate
// epilogue of the `aten` implementation is then a third pass over the output; on a batch-1 stem,
// whose output is 20x its input, that pass alone costs ~10% (docs/tuning.md). Here oneDNN's reorder
// and the epilogue are one pass: it reads the blocked buffer (8 pixels x 8 channels per register
// transpose), adds the coordinate term (from its affine rows where it has them) and writes NCHW.
//
// The input is handed to oneDNN without a copy: a oneDNN tensor over the input's own memory, made by
// PyTorch's stable C shim from the serialized oneDNN description of a plain tensor of its shape (the
// way AOTInductor loads oneDNN constants; checked once per layer to read back as the input exactly,
// else the input is copied). oneDNN then reorders it into its blocked input layout, as it does in
// ATen's NCHW convolution: the passes over memory are those of `nn.Conv2d`, the epilogue in one of
// them. The blocked output is reached through the same shim (`aoti_torch_get_data_ptr`, which
// returns a oneDNN tensor's buffer); its format is oneDNN's choice, not declared in any header a wheel
// ships. So the format is recognised, per layer and thread count, on the layer's first call: of the
// channel-blocked formats [N][C/b][H][W][b] with b in {1, 8, 16, C} that divide C (b = 1 is NCHW,
// b = C is NHWC; none of them is larger than the output, so reading any of them stays inside the
// buffer), the one whose reading equals oneDNN's own reorder (`to_dense`) exactly, if exactly one
// does. Where none or several do (a format not among these, or data that cannot tell them apart),
// the call computes through the `aten` implementation and the next call tries again; a layer whose
// output read as none of them 3 times, or on which oneDNN's convolution fails, is not tried further
// (nor measured). oneDNN's primitive (and so the format) is a function of the shapes, the CPU and
// the thread count, all in the key.
#pragma once

#include <ATen/ATen.h>

#include "../geometry.h"
#include "coord_term.h"

namespace coordconv {

// Whether this implementation is a candidate for the layer: float32, 2-D, NCHW in and out, groups 1,
// C_out a multiple of 8 (oneDNN pads a last partial block of 8 or 16 channels: no format read here),
// a PyTorch built with oneDNN (and not disabled by torch.backends.mkldnn.enabled = False) and an x86
// CPU with AVX2.
bool blocked_output_eligible(const Geometry& g, const at::Tensor& input, at::MemoryFormat format);

// The output [N, C_out, OH, OW] computed this way (conv + bias in oneDNN, the coordinate term in the
// pass), or an undefined tensor where the layer's output format is not (yet) known: the caller then
// computes the layer another way.
at::Tensor forward_blocked(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const CoordTerm& coord, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation);

// The formats recognised so far (tests): forgotten with the kernel choices.
void clear_blocked_formats();

}  // namespace coordconv
