// The Autograd kernel of coord_conv_ext (the `cpp` and `cuda` backends): coord_conv_autograd.h, with
// the fused backward op on CPU tensors.
#include <torch/library.h>

#include "coord_conv_autograd.h"

namespace coordconv {
namespace {

struct ExtOp {
  static constexpr const char* name = "coordconv_fused::coord_conv_ext";
  static constexpr bool fused_backward = true;  // coord_conv_ext_backward (CPU)
};

}  // namespace

TORCH_LIBRARY_IMPL(coordconv_fused, Autograd, m) { m.impl("coord_conv_ext", &autograd::coord_conv_autograd<ExtOp>); }

}  // namespace coordconv
