// rewardfl::face_align: fused face crop, similarity-warp and normalisation.
//
// Schema and dispatcher entry points (torchvision's ops/roi_align.cpp layout). Kernels:
// cpu/face_align_kernel.cpp, cuda/face_align_kernel.cu; autograd: autograd/face_align_autograd.cpp;
// fake (meta) kernels for torch.compile and the user-facing wrapper:
// rewardfl/ops/align.py.
//
// face_align(frames (F, 3, H, W) float/half/bf16/double, any strides, inverse_transforms (N, 2, 3) crop pixel
//            -> frame pixel, frame_index (N,) int64, size, channel_map [3], input_low, scale [3],
//            bias [3]) -> crops (N, 3, size, size) float32 (float64 for float64 frames)
// face_align_backward(grad (N, 3, size, size), inverse_transforms, frame_index, F, H, W,
//            channel_map, scale, frames dtype) -> grad_frames (F, 3, H, W)
#include "face_align.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace rewardfl {
namespace ops {

at::Tensor face_align(const at::Tensor& frames, const at::Tensor& inverse_transforms, const at::Tensor& frame_index,
                      int64_t size, at::IntArrayRef channel_map, double input_low, at::ArrayRef<double> scale,
                      at::ArrayRef<double> bias) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rewardfl::face_align", "").typed<decltype(face_align)>();
  return op.call(frames, inverse_transforms, frame_index, size, channel_map, input_low, scale, bias);
}

at::Tensor face_align_backward(const at::Tensor& grad, const at::Tensor& inverse_transforms,
                               const at::Tensor& frame_index, int64_t num_frames, int64_t height, int64_t width,
                               at::IntArrayRef channel_map, at::ArrayRef<double> scale, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rewardfl::face_align_backward", "")
                       .typed<decltype(face_align_backward)>();
  return op.call(grad, inverse_transforms, frame_index, num_frames, height, width, channel_map, scale, dtype);
}

TORCH_LIBRARY_FRAGMENT(rewardfl, m) {
  m.def(
      "face_align(Tensor frames, Tensor inverse_transforms, Tensor frame_index, int size, int[] channel_map, "
      "float input_low, float[] scale, float[] bias) -> Tensor");
  m.def(
      "face_align_backward(Tensor grad, Tensor inverse_transforms, Tensor frame_index, int num_frames, int height, "
      "int width, int[] channel_map, float[] scale, ScalarType dtype) -> Tensor");
}

}  // namespace ops
}  // namespace rewardfl
