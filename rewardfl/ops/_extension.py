"""The compiled extension ``rewardfl._C`` (built from ``csrc/`` by setup.py), loaded once.

Importing it registers the ``torch.ops.rewardfl.*`` ops and their CPU, CUDA and autograd
kernels. A checkout without a build has no ``_C``: every op then runs its pure-torch twin.
"""

import torch  # noqa: F401  (must precede rewardfl._C: it provides libc10/libtorch)

try:
    from rewardfl import _C
except ImportError:
    _C = None

__all__ = ["extension_available", "cuda_compiled"]


def extension_available() -> bool:
    """True when the compiled ``rewardfl._C`` extension imports."""
    return _C is not None


def cuda_compiled() -> bool:
    """True when ``rewardfl._C`` imports and was built with its CUDA kernels."""
    return _C is not None and _C.cuda_compiled()
