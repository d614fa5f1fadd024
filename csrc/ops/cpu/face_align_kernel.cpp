// CPU kernels of rewardfl::face_align (see ../face_align.h for the math).
//
// Forward: at::parallel_for over crop rows (face, v); frames are read through their strides, so a
// (T, C, H, W) view of a video is not copied.
// Backward: deterministic. Faces are grouped by frame (in face order) and at::parallel_for runs
// over frames, so one thread owns each frame's gradient and adds its faces in a fixed order:
// the result does not depend on the thread count. Accumulation is in float32 (float64 for
// float64 frames), cast to the frames' dtype at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../face_align.h"

namespace rewardfl {
namespace ops {
namespace {

using detail::BilinearTaps;
using detail::FaceAlignParams;

void check_frame_index_cpu(const int64_t* frame_index, int64_t num_faces, int64_t num_frames) {
  for (int64_t n = 0; n < num_faces; ++n) {
    TORCH_CHECK_INDEX(frame_index[n] >= 0 && frame_index[n] < num_frames, "face_align: frame_index[", n, "] = ",
                      frame_index[n], " is outside [0, ", num_frames, ")");
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* frames, detail::FrameStrides st, const acc_t* inverse, const int64_t* frame_index,
                  acc_t* crops, int64_t height, int64_t width, int64_t size, const FaceAlignParams<acc_t>& p,
                  int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / size, v = row % size;
    const acc_t* m = inverse + n * 6;
    const scalar_t* frame = frames + frame_index[n] * st.frame;
    acc_t* out = crops + n * 3 * size * size + v * size;
    for (int64_t u = 0; u < size; ++u) {
      const acc_t x = m[0] * u + m[1] * v + m[2];
      const acc_t y = m[3] * u + m[4] * v + m[5];
      BilinearTaps<acc_t> taps;
      const bool any = detail::bilinear_taps(x, y, height, width, st.row, st.col, taps);
      for (int c = 0; c < 3; ++c) {
        acc_t sample = 0;
        if (any) {
          const scalar_t* src = frame + p.channel_map[c] * st.channel;
          for (int k = 0; k < 4; ++k) {
            sample += taps.weight[k] * (static_cast<acc_t>(src[taps.offset[k]]) - p.input_low);
          }
        }
        out[c * size * size + u] = p.scale[c] * sample + p.bias[c];
      }
    }
  }
}

at::Tensor face_align_forward_cpu(const at::Tensor& frames, const at::Tensor& inverse_transforms,
                                  const at::Tensor& frame_index, int64_t size, at::IntArrayRef channel_map,
                                  double input_low, at::ArrayRef<double> scale, at::ArrayRef<double> bias) {
  detail::check_forward_args(frames, inverse_transforms, frame_index, size, channel_map, scale, bias);
  TORCH_CHECK(frames.device().is_cpu(), "face_align_forward_cpu: tensors must be on the CPU");
  const auto acc_dtype = detail::crop_dtype(frames.scalar_type());
  const auto inverse = inverse_transforms.to(acc_dtype).contiguous();
  const auto index = frame_index.contiguous();
  const int64_t num_faces = inverse.size(0), height = frames.size(2), width = frames.size(3);
  auto crops = at::empty({num_faces, 3, size, size}, frames.options().dtype(acc_dtype));
  if (num_faces == 0) return crops;
  check_frame_index_cpu(index.data_ptr<int64_t>(), num_faces, frames.size(0));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, frames.scalar_type(), "face_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = detail::make_params<acc_t>(channel_map, scale, bias, input_low);
    const scalar_t* src = frames.const_data_ptr<scalar_t>();
    const auto strides = detail::frame_strides(frames);
    const acc_t* m = inverse.data_ptr<acc_t>();
    const int64_t* fi = index.data_ptr<int64_t>();
    acc_t* dst = crops.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (3 * size));
    at::parallel_for(0, num_faces * size, grain, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t, acc_t>(src, strides, m, fi, dst, height, width, size, params, begin, end);
    });
  });
  return crops;
}

at::Tensor face_align_backward_cpu(const at::Tensor& grad, const at::Tensor& inverse_transforms,
                                   const at::Tensor& frame_index, int64_t num_frames, int64_t height, int64_t width,
                                   at::IntArrayRef channel_map, at::ArrayRef<double> scale, at::ScalarType dtype) {
  TORCH_CHECK(grad.device().is_cpu(), "face_align_backward_cpu: tensors must be on the CPU");
  detail::check_backward_args(grad, inverse_transforms, frame_index, num_frames, height, width, channel_map, scale,
                              dtype);
  const int64_t size = grad.size(2);
  const auto acc_dtype = detail::crop_dtype(dtype);
  const auto grad_c = grad.to(acc_dtype).contiguous();
  const auto inverse = inverse_transforms.to(acc_dtype).contiguous();
  const auto index = frame_index.contiguous();
  const int64_t num_faces = inverse.size(0);
  auto grad_frames = at::zeros({num_frames, 3, height, width}, grad.options().dtype(acc_dtype));
  if (num_faces == 0) return grad_frames.to(dtype);
  const int64_t* fi = index.data_ptr<int64_t>();
  check_frame_index_cpu(fi, num_faces, num_frames);

  // Faces of frame f: order[start[f] .. start[f + 1]), in face order (counting sort).
  std::vector<int64_t> start(num_frames + 1, 0), order(num_faces);
  for (int64_t n = 0; n < num_faces; ++n) ++start[fi[n] + 1];
  for (int64_t f = 0; f < num_frames; ++f) start[f + 1] += start[f];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < num_faces; ++n) order[fill[fi[n]]++] = n;
  }

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "face_align_backward_cpu", [&] {
    using acc_t = scalar_t;
    const auto params = detail::make_params<acc_t>(channel_map, scale, {}, 0.0);
    const acc_t* g = grad_c.data_ptr<acc_t>();
    const acc_t* m_all = inverse.data_ptr<acc_t>();
    acc_t* gf = grad_frames.data_ptr<acc_t>();
    const int64_t plane = height * width;
    at::parallel_for(0, num_frames, 1, [&](int64_t f_begin, int64_t f_end) {
      for (int64_t f = f_begin; f < f_end; ++f) {
        acc_t* frame_grad = gf + f * 3 * plane;
        for (int64_t i = start[f]; i < start[f + 1]; ++i) {
          const int64_t n = order[i];
          const acc_t* m = m_all + n * 6;
          const acc_t* gn = g + n * 3 * size * size;
          for (int64_t v = 0; v < size; ++v) {
            for (int64_t u = 0; u < size; ++u) {
              const acc_t x = m[0] * u + m[1] * v + m[2];
              const acc_t y = m[3] * u + m[4] * v + m[5];
              BilinearTaps<acc_t> taps;
              if (!detail::bilinear_taps(x, y, height, width, width, 1, taps)) continue;
              for (int c = 0; c < 3; ++c) {
                const acc_t go = params.scale[c] * gn[c * size * size + v * size + u];
                acc_t* dst = frame_grad + params.channel_map[c] * plane;
                for (int k = 0; k < 4; ++k) dst[taps.offset[k]] += taps.weight[k] * go;
              }
            }
          }
        }
      }
    });
  });
  return grad_frames.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(rewardfl, CPU, m) {
  m.impl("face_align", &face_align_forward_cpu);
  m.impl("face_align_backward", &face_align_backward_cpu);
}

}  // namespace ops
}  // namespace rewardfl
