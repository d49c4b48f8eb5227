// The CPU kernels of the coord_conv_ext ops.
#include <torch/library.h>

#include "cpu_ops.h"

namespace coordconv {

TORCH_LIBRARY_IMPL(coordconv_fused, CPU, m) {
  m.impl("coord_conv_ext", &forward_cpu);
  m.impl("coord_conv_ext_coord_weight_grad", &coord_weight_grad_cpu);
  m.impl("coord_conv_ext_input_grad", &input_grad_cpu);
  m.impl("coord_conv_ext_backward", &backward_cpu);
}

}  // namespace coordconv
