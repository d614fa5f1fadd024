"""The compiled extension rewardfl._C: it imports, registers its ops, and says whether CUDA is in."""

import pytest
import torch

from rewardfl.ops import cuda_compiled, extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="rewardfl._C is not built")


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def test_cuda_compiled_agrees_with_registered_kernels():
    compiled = cuda_compiled()
    assert isinstance(compiled, bool)
    for op in ("rewardfl::face_align", "rewardfl::face_align_backward"):
        assert _has_kernel(op, "CPU"), op
        assert _has_kernel(op, "CUDA") == compiled, op

