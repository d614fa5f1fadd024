"""The front door of the package's C++/CUDA ops (sources in the checkout's top-level ``csrc/``).

torchvision's ``ops`` layout: each op has one module here holding its Python wrapper (argument
checks, the choice between the compiled kernel and the torch reference), its pure-torch reference
and the fake (meta) kernels ``torch.compile`` needs; ``_extension`` loads ``rewardfl._C``.
The Triton kernels have their own front door, ``rewardfl.kernels``.

* ``align``: :func:`face_align` (crop, align and normalise faces for a recognizer) and its
  helpers :func:`landmark_problems`, :func:`arcface_template`, :func:`similarity_transforms`.

A foundation: it imports torch and the extension only, so any plugin or the planner may use it.
"""

from ._extension import cuda_compiled, extension_available
from .align import ARCFACE_TEMPLATE, arcface_template, face_align, landmark_problems, similarity_transforms

__all__ = [
    "ARCFACE_TEMPLATE",
    "arcface_template",
    "cuda_compiled",
    "extension_available",
    "face_align",
    "landmark_problems",
    "similarity_transforms",
]
