"""The compiled extension rewardfl._C: it imports, registers its ops, and says whether CUDA is in."""

import pytest
import torch

import rewardfl

pytestmark = pytest.mark.skipif(not rewardfl.extension_available(), reason="rewardfl._C is not built")


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def test_cuda_compiled_agrees_with_registered_kernels():
    from rewardfl import _C

    compiled = _C.cuda_compiled()
    assert isinstance(compiled, bool)
    for op in ("rewardfl::scale_shift", "rewardfl::face_align", "rewardfl::face_align_backward"):
        assert _has_kernel(op, "CPU"), op
        assert _has_kernel(op, "CUDA") == compiled, op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scale_shift_cpu(dtype):
    x = torch.linspace(-3, 5, 257, dtype=torch.float64)
    got = torch.ops.rewardfl.scale_shift(x.to(dtype), 2.5, -0.75)
    assert got.dtype == dtype and got.shape == x.shape
    expected = x.to(dtype).double() * 2.5 - 0.75  # hand formula in float64
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2e-2)
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_scale_shift_non_contiguous_input():
    x = torch.arange(24.0).view(4, 6).t()
    torch.testing.assert_close(torch.ops.rewardfl.scale_shift(x, -1.0, 3.0), 3.0 - x)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and rewardfl.extension_available() and rewardfl._C.cuda_compiled()),
    reason="needs a CUDA device and rewardfl._C built with CUDA",
)
def test_scale_shift_cuda_matches_cpu():
    x = torch.randn(10_000)
    torch.testing.assert_close(
        torch.ops.rewardfl.scale_shift(x.cuda(), 0.5, 2.0).cpu(), torch.ops.rewardfl.scale_shift(x, 0.5, 2.0)
    )
