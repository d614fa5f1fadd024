#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace rewardfl {
namespace {

at::Tensor scale_shift_cpu(const at::Tensor& x, double scale, double shift) {
  TORCH_CHECK(x.device().is_cpu(), "scale_shift_cpu: x must be a CPU tensor");
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "scale_shift_cpu", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const float a = static_cast<float>(scale), b = static_cast<float>(shift);
    at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * a + b);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rewardfl, CPU, m) {
  m.impl("scale_shift", &scale_shift_cpu);
}

}  // namespace rewardfl
