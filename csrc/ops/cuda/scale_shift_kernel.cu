#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rewardfl {
namespace {

template <typename scalar_t>
__global__ void scale_shift_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n,
                                   float a, float b) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * a + b);
  }
}

at::Tensor scale_shift_cuda(const at::Tensor& x, double scale, double shift) {
  TORCH_CHECK(x.is_cuda(), "scale_shift_cuda: x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "scale_shift_cuda", [&] {
    scale_shift_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, static_cast<float>(scale), static_cast<float>(shift));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rewardfl, CUDA, m) {
  m.impl("scale_shift", &scale_shift_cuda);
}

}  // namespace rewardfl
