// Autograd of rewardfl::face_align (torchvision's autograd/roi_align_kernel.cpp layout).
//
// Gradient flows to `frames` only: the transforms come from detector landmarks computed without
// gradient (face_align's docstring in rewardfl/ops/align.py says so).
// face_align_backward is linear in its grad but has no double backward.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../face_align.h"

namespace rewardfl {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class FaceAlignFunction : public torch::autograd::Function<FaceAlignFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& frames, const Variable& inverse_transforms,
                               const Variable& frame_index, int64_t size, c10::IntArrayRef channel_map,
                               double input_low, c10::ArrayRef<double> scale, c10::ArrayRef<double> bias) {
    ctx->saved_data["num_frames"] = frames.size(0);
    ctx->saved_data["height"] = frames.size(2);
    ctx->saved_data["width"] = frames.size(3);
    ctx->saved_data["dtype"] = frames.scalar_type();
    ctx->saved_data["channel_map"] = channel_map.vec();
    ctx->saved_data["scale"] = scale.vec();
    ctx->save_for_backward({inverse_transforms, frame_index});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {face_align(frames, inverse_transforms, frame_index, size, channel_map, input_low, scale, bias)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    const auto channel_map = ctx->saved_data["channel_map"].toIntVector();
    const auto scale = ctx->saved_data["scale"].toDoubleVector();
    auto grad_frames = face_align_backward(grad_output[0], saved[0], saved[1], ctx->saved_data["num_frames"].toInt(),
                                           ctx->saved_data["height"].toInt(), ctx->saved_data["width"].toInt(),
                                           channel_map, scale, ctx->saved_data["dtype"].toScalarType());
    return {grad_frames, Variable(), Variable(), Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

class FaceAlignBackwardFunction : public torch::autograd::Function<FaceAlignBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad, const Variable& inverse_transforms,
                               const Variable& frame_index, int64_t num_frames, int64_t height, int64_t width,
                               c10::IntArrayRef channel_map, c10::ArrayRef<double> scale, at::ScalarType dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {face_align_backward(grad, inverse_transforms, frame_index, num_frames, height, width, channel_map, scale,
                                dtype)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    TORCH_CHECK(false, "rewardfl::face_align has no double backward");
  }
};

at::Tensor face_align_autograd(const at::Tensor& frames, const at::Tensor& inverse_transforms,
                               const at::Tensor& frame_index, int64_t size, c10::IntArrayRef channel_map,
                               double input_low, c10::ArrayRef<double> scale, c10::ArrayRef<double> bias) {
  return FaceAlignFunction::apply(frames, inverse_transforms, frame_index, size, channel_map, input_low, scale,
                                  bias)[0];
}

at::Tensor face_align_backward_autograd(const at::Tensor& grad, const at::Tensor& inverse_transforms,
                                        const at::Tensor& frame_index, int64_t num_frames, int64_t height,
                                        int64_t width, c10::IntArrayRef channel_map, c10::ArrayRef<double> scale,
                                        at::ScalarType dtype) {
  return FaceAlignBackwardFunction::apply(grad, inverse_transforms, frame_index, num_frames, height, width,
                                          channel_map, scale, dtype)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(rewardfl, Autograd, m) {
  m.impl("face_align", &face_align_autograd);
  m.impl("face_align_backward", &face_align_backward_autograd);
}

}  // namespace ops
}  // namespace rewardfl
