// rewardfl::scale_shift(x, scale, shift) = x * scale + shift, elementwise.
// The smallest op with a CPU and a CUDA kernel: it proves the build and the
// dispatcher registration end to end. Real ops follow the same layout.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rewardfl, m) {
  m.def("scale_shift(Tensor x, float scale, float shift) -> Tensor");
}
