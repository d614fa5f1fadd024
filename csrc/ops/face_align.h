// rewardfl::face_align: shared declarations and the per-pixel math of the CPU and CUDA kernels.
//
// Conventions (OpenCV warpAffine's): pixel centres at integer coordinates, bilinear
// interpolation, taps outside the frame contribute zero. The kernels sample (x - input_low), so
// the zero border is black on the 0..255 scale, and write
//   crop[n, c, v, u] = scale[c] * sum_k w_k (frame[f, channel_map[c], y_k, x_k] - input_low) + bias[c]
// at frame position (x, y) = inverse_transforms[n] @ (u, v, 1), f = frame_index[n].
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace rewardfl {
namespace ops {

// Entry points through the dispatcher (csrc/ops/face_align.cpp).
at::Tensor face_align(const at::Tensor& frames, const at::Tensor& inverse_transforms, const at::Tensor& frame_index,
                      int64_t size, at::IntArrayRef channel_map, double input_low, at::ArrayRef<double> scale,
                      at::ArrayRef<double> bias);

at::Tensor face_align_backward(const at::Tensor& grad, const at::Tensor& inverse_transforms,
                               const at::Tensor& frame_index, int64_t num_frames, int64_t height, int64_t width,
                               at::IntArrayRef channel_map, at::ArrayRef<double> scale, at::ScalarType dtype);

namespace detail {

// Per-channel constants, passed by value to the kernels.
template <typename T>
struct FaceAlignParams {
  int64_t channel_map[3];  // crop channel c reads frame channel channel_map[c]
  T scale[3];
  T bias[3];
  T input_low;
};

// Element strides of the frames tensor (F, 3, H, W): the kernels read any strided layout, so a
// (T, C, H, W) view of a (B, C, T, H, W) video is not copied.
struct FrameStrides {
  int64_t frame, channel, row, col;
};

inline FrameStrides frame_strides(const at::Tensor& frames) {
  return {frames.stride(0), frames.stride(1), frames.stride(2), frames.stride(3)};
}

// The four bilinear taps of one sample: element offsets into one channel plane (row stride
// stride_h, column stride stride_w) and weights; zero weight (and offset 0, a safe address) for
// taps outside the frame.
template <typename T>
struct BilinearTaps {
  int64_t offset[4];
  T weight[4];
};

// Fills `taps` for frame position (x, y); false when no tap can touch the frame (also for NaN).
template <typename T>
C10_HOST_DEVICE inline bool bilinear_taps(T x, T y, int64_t height, int64_t width, int64_t stride_h,
                                          int64_t stride_w, BilinearTaps<T>& taps) {
  if (!(x > T(-1) && x < T(width) && y > T(-1) && y < T(height))) return false;
  // x, y > -1 here, so truncating x + 1 is floor(x) + 1: no floor() that differs host/device.
  const int64_t x0 = static_cast<int64_t>(x + T(1)) - 1;
  const int64_t y0 = static_cast<int64_t>(y + T(1)) - 1;
  const T wx = x - static_cast<T>(x0);
  const T wy = y - static_cast<T>(y0);
  const T wxs[2] = {T(1) - wx, wx};
  const T wys[2] = {T(1) - wy, wy};
  for (int j = 0; j < 2; ++j) {
    for (int i = 0; i < 2; ++i) {
      const int64_t xi = x0 + i, yj = y0 + j;
      const bool inside = xi >= 0 && xi < width && yj >= 0 && yj < height;
      taps.offset[2 * j + i] = inside ? yj * stride_h + xi * stride_w : 0;
      taps.weight[2 * j + i] = inside ? wys[j] * wxs[i] : T(0);
    }
  }
  return true;
}

// Argument checks shared by the CPU and CUDA kernels (the Python wrapper checks user input with
// friendlier errors first; these guard the raw op).
inline void check_face_args(const at::Device& device, const at::Tensor& inverse_transforms,
                            const at::Tensor& frame_index, int64_t size, at::IntArrayRef channel_map,
                            at::ArrayRef<double> scale) {
  TORCH_CHECK(inverse_transforms.dim() == 3 && inverse_transforms.size(1) == 2 && inverse_transforms.size(2) == 3,
              "face_align: inverse_transforms must be (N, 2, 3), got ", inverse_transforms.sizes());
  TORCH_CHECK(inverse_transforms.is_floating_point(), "face_align: inverse_transforms must be floating point");
  TORCH_CHECK(frame_index.dim() == 1 && frame_index.size(0) == inverse_transforms.size(0),
              "face_align: frame_index must be (N,) with N = ", inverse_transforms.size(0), ", got ",
              frame_index.sizes());
  TORCH_CHECK(frame_index.scalar_type() == at::kLong, "face_align: frame_index must be int64, got ",
              frame_index.scalar_type());
  TORCH_CHECK(inverse_transforms.device() == device && frame_index.device() == device,
              "face_align: all tensors must be on one device");
  TORCH_CHECK(size > 0, "face_align: size must be positive, got ", size);
  TORCH_CHECK(channel_map.size() == 3 && scale.size() == 3, "face_align: channel_map and scale need 3 entries each");
  for (int64_t c : channel_map) TORCH_CHECK(c >= 0 && c < 3, "face_align: channel_map entries must be 0, 1 or 2");
}

inline void check_forward_args(const at::Tensor& frames, const at::Tensor& inverse_transforms,
                               const at::Tensor& frame_index, int64_t size, at::IntArrayRef channel_map,
                               at::ArrayRef<double> scale, at::ArrayRef<double> bias) {
  TORCH_CHECK(frames.dim() == 4 && frames.size(1) == 3, "face_align: frames must be (F, 3, H, W), got ",
              frames.sizes());
  TORCH_CHECK(frames.is_floating_point(), "face_align: frames must be floating point, got ", frames.scalar_type());
  TORCH_CHECK(bias.size() == 3, "face_align: bias needs 3 entries");
  check_face_args(frames.device(), inverse_transforms, frame_index, size, channel_map, scale);
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& inverse_transforms,
                                const at::Tensor& frame_index, int64_t num_frames, int64_t height, int64_t width,
                                at::IntArrayRef channel_map, at::ArrayRef<double> scale, at::ScalarType dtype) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(1) == 3 && grad.size(2) == grad.size(3),
              "face_align_backward: grad must be (N, 3, size, size), got ", grad.sizes());
  TORCH_CHECK(grad.size(0) == inverse_transforms.size(0), "face_align_backward: grad has ", grad.size(0),
              " faces, inverse_transforms ", inverse_transforms.size(0));
  TORCH_CHECK(num_frames >= 0 && height > 0 && width > 0, "face_align_backward: bad frames shape (", num_frames,
              ", 3, ", height, ", ", width, ")");
  TORCH_CHECK(at::isFloatingType(dtype), "face_align_backward: dtype must be floating point, got ", dtype);
  check_face_args(grad.device(), inverse_transforms, frame_index, grad.size(2), channel_map, scale);
}

template <typename T>
inline FaceAlignParams<T> make_params(at::IntArrayRef channel_map, at::ArrayRef<double> scale,
                                      at::ArrayRef<double> bias, double input_low) {
  FaceAlignParams<T> p;
  for (int c = 0; c < 3; ++c) {
    p.channel_map[c] = channel_map[c];
    p.scale[c] = static_cast<T>(scale[c]);
    p.bias[c] = bias.empty() ? T(0) : static_cast<T>(bias[c]);
  }
  p.input_low = static_cast<T>(input_low);
  return p;
}

// Crops are float32, float64 for float64 frames (the kernels' accumulation type).
inline at::ScalarType crop_dtype(at::ScalarType frames_dtype) {
  return frames_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace detail
}  // namespace ops
}  // namespace rewardfl
