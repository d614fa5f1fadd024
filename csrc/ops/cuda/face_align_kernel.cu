// CUDA kernels of rewardfl::face_align (see ../face_align.h for the math).
//
// Forward: one thread per crop pixel (face, v, u), all three channels, frames read through their
// strides (a video view is not copied). Neighbouring threads read neighbouring frame pixels, so
// the data-dependent bilinear gathers mostly hit L1/L2, and the crop writes are coalesced. Vector (float4 / bf16x2) loads do not pay here: the four taps
// of a sample start at an arbitrary, usually unaligned, column.
// Backward: one thread per crop pixel scattering into a float32 (float64 for float64 frames)
// gradient buffer with atomicAdd, cast to the frames' dtype at the end. The summation order is
// not fixed, so the gradient can differ in the last bits between runs: the op reports itself
// to torch.use_deterministic_algorithms(True). (The CPU backward is deterministic.)
// Faces whose frame_index lies outside [0, F) read nothing and get no gradient (the Python
// wrapper rejects them before; checking here would need a host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../face_align.h"

namespace rewardfl {
namespace ops {
namespace {

using detail::BilinearTaps;
using detail::FaceAlignParams;

constexpr int kThreads = 256;

int64_t num_blocks(int64_t work) {
  return std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20);
}

template <typename scalar_t, typename acc_t>
__global__ void face_align_forward_kernel(const scalar_t* __restrict__ frames, detail::FrameStrides st,
                                          const acc_t* __restrict__ inverse,
                                          const int64_t* __restrict__ frame_index, acc_t* __restrict__ crops,
                                          int64_t num_faces, int64_t num_frames, int64_t height, int64_t width,
                                          int64_t size, FaceAlignParams<acc_t> p) {
  const int64_t area = size * size;
  const int64_t total = num_faces * area;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / area, pixel = i % area;
    const int64_t v = pixel / size, u = pixel % size;
    const acc_t* m = inverse + n * 6;
    const acc_t x = m[0] * u + m[1] * v + m[2];
    const acc_t y = m[3] * u + m[4] * v + m[5];
    const int64_t f = frame_index[n];
    BilinearTaps<acc_t> taps;
    const bool any = f >= 0 && f < num_frames && detail::bilinear_taps(x, y, height, width, st.row, st.col, taps);
    acc_t* out = crops + n * 3 * area + pixel;
    for (int c = 0; c < 3; ++c) {
      acc_t sample = 0;
      if (any) {
        const scalar_t* src = frames + f * st.frame + p.channel_map[c] * st.channel;
        for (int k = 0; k < 4; ++k) {
          sample += taps.weight[k] * (static_cast<acc_t>(src[taps.offset[k]]) - p.input_low);
        }
      }
      out[c * area] = p.scale[c] * sample + p.bias[c];
    }
  }
}

template <typename acc_t>
__global__ void face_align_backward_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ inverse,
                                           const int64_t* __restrict__ frame_index, acc_t* __restrict__ grad_frames,
                                           int64_t num_faces, int64_t num_frames, int64_t height, int64_t width,
                                           int64_t size, FaceAlignParams<acc_t> p) {
  const int64_t area = size * size, plane = height * width;
  const int64_t total = num_faces * area;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / area, pixel = i % area;
    const int64_t f = frame_index[n];
    if (f < 0 || f >= num_frames) continue;
    const int64_t v = pixel / size, u = pixel % size;
    const acc_t* m = inverse + n * 6;
    const acc_t x = m[0] * u + m[1] * v + m[2];
    const acc_t y = m[3] * u + m[4] * v + m[5];
    BilinearTaps<acc_t> taps;
    if (!detail::bilinear_taps(x, y, height, width, width, 1, taps)) continue;
    const acc_t* g = grad + n * 3 * area + pixel;
    for (int c = 0; c < 3; ++c) {
      const acc_t go = p.scale[c] * g[c * area];
      acc_t* dst = grad_frames + (f * 3 + p.channel_map[c]) * plane;
      for (int k = 0; k < 4; ++k) {
        if (taps.weight[k] != acc_t(0)) atomicAdd(dst + taps.offset[k], taps.weight[k] * go);
      }
    }
  }
}

at::Tensor face_align_forward_cuda(const at::Tensor& frames, const at::Tensor& inverse_transforms,
                                   const at::Tensor& frame_index, int64_t size, at::IntArrayRef channel_map,
                                   double input_low, at::ArrayRef<double> scale, at::ArrayRef<double> bias) {
  detail::check_forward_args(frames, inverse_transforms, frame_index, size, channel_map, scale, bias);
  TORCH_CHECK(frames.is_cuda(), "face_align_forward_cuda: tensors must be on a CUDA device");
  c10::cuda::CUDAGuard device_guard(frames.device());
  const auto acc_dtype = detail::crop_dtype(frames.scalar_type());
  const auto inverse = inverse_transforms.to(acc_dtype).contiguous();
  const auto index = frame_index.contiguous();
  const int64_t num_faces = inverse.size(0), height = frames.size(2), width = frames.size(3);
  auto crops = at::empty({num_faces, 3, size, size}, frames.options().dtype(acc_dtype));
  if (num_faces == 0) return crops;
  const int64_t total = num_faces * size * size;
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, frames.scalar_type(), "face_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = detail::make_params<acc_t>(channel_map, scale, bias, input_low);
    face_align_forward_kernel<scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
        frames.const_data_ptr<scalar_t>(), detail::frame_strides(frames), inverse.data_ptr<acc_t>(),
        index.data_ptr<int64_t>(), crops.data_ptr<acc_t>(), num_faces, frames.size(0), height, width, size, params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return crops;
}

at::Tensor face_align_backward_cuda(const at::Tensor& grad, const at::Tensor& inverse_transforms,
                                    const at::Tensor& frame_index, int64_t num_frames, int64_t height, int64_t width,
                                    at::IntArrayRef channel_map, at::ArrayRef<double> scale, at::ScalarType dtype) {
  detail::check_backward_args(grad, inverse_transforms, frame_index, num_frames, height, width, channel_map, scale,
                              dtype);
  TORCH_CHECK(grad.is_cuda(), "face_align_backward_cuda: tensors must be on a CUDA device");
  at::globalContext().alertNotDeterministic("face_align_backward_cuda");
  c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t size = grad.size(2);
  const auto acc_dtype = detail::crop_dtype(dtype);
  const auto grad_c = grad.to(acc_dtype).contiguous();
  const auto inverse = inverse_transforms.to(acc_dtype).contiguous();
  const auto index = frame_index.contiguous();
  const int64_t num_faces = inverse.size(0);
  auto grad_frames = at::zeros({num_frames, 3, height, width}, grad.options().dtype(acc_dtype));
  if (num_faces == 0 || num_frames == 0) return grad_frames.to(dtype);
  const int64_t total = num_faces * size * size;
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "face_align_backward_cuda", [&] {
    const auto params = detail::make_params<scalar_t>(channel_map, scale, {}, 0.0);
    face_align_backward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        grad_c.data_ptr<scalar_t>(), inverse.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        grad_frames.data_ptr<scalar_t>(), num_faces, num_frames, height, width, size, params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_frames.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(rewardfl, CUDA, m) {
  m.impl("face_align", &face_align_forward_cuda);
  m.impl("face_align_backward", &face_align_backward_cuda);
}

}  // namespace ops
}  // namespace rewardfl
