// rewardfl._C: the Python module that loads the op library.
//
// Ops are declared with TORCH_LIBRARY_FRAGMENT(rewardfl, m) in csrc/ops/<op>.cpp
// and implemented per device in csrc/ops/cpu/ and csrc/ops/cuda/, torchvision style.
// Importing rewardfl._C (after torch) registers them as torch.ops.rewardfl.*.
#include <torch/extension.h>

namespace rewardfl {

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rewardfl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rewardfl C++/CUDA ops (registered under torch.ops.rewardfl)";
  m.def("cuda_compiled", &rewardfl::cuda_compiled, "True when the CUDA kernels were compiled in");
}
