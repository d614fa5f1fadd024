"""Fused Triton kernels of the sampler, each with a pure-torch reference beside it.

* :func:`flow_step`: one flow-matching Euler step with guidance, cast and
  first-frame injection in one pass (``flow_step.py``).
* :func:`velocity_kl`: the velocity regulariser ``mean((v - v_ref)^2) / (2 sigma^2)``
  reduced in fp32 in one pass (``velocity_kl.py``).

Dispatch: Triton for CUDA tensors, the torch reference otherwise. Force either
with ``set_backend("triton" | "torch" | "auto")``, ``with use_backend(...)``, the
``REWARDFL_KERNELS`` environment variable, or a call's ``backend=`` keyword.
Installed as ``rewardfl.kernels`` (setup.py maps this folder there).
"""

from ._utils import BACKENDS, get_backend, interpreting, set_backend, use_backend
from .flow_step import flow_step, flow_step_reference
from .velocity_kl import velocity_kl, velocity_kl_reference

__all__ = [
    "BACKENDS",
    "flow_step",
    "flow_step_reference",
    "velocity_kl",
    "velocity_kl_reference",
    "get_backend",
    "set_backend",
    "use_backend",
    "interpreting",
]
