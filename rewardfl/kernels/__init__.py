"""Fused Triton kernels of the sampler, each with a pure-torch reference beside it.

* :func:`flow_step`: one flow-matching Euler step with guidance, cast and
  first-frame injection in one pass (``flow_step.py``).
* :func:`velocity_kl`: the velocity regulariser ``mean((v - v_ref)^2) / (2 sigma^2)``
  reduced in fp32 in one pass (``velocity_kl.py``).
* :func:`sde_step`: one stochastic flow step (the SDE with the flow's marginals) and the
  log-probability of its Gaussian transition per sample, for policy-gradient training
  (``sde_step.py``; :func:`sde_coefficients` gives the step's coefficients, :func:`cps_coefficients`
  those of coefficients-preserving sampling).

Dispatch: Triton for CUDA tensors, the torch reference otherwise. Force either
with ``set_backend("triton" | "torch" | "auto")``, ``with use_backend(...)``, the
``REWARDFL_KERNELS`` environment variable, or a call's ``backend=`` keyword.

Where the code lives: the kernels' modules are the files of the checkout's top-level ``kernels/``
folder (beside ``csrc/``). That folder has no ``__init__.py``, so running Python from the checkout
root never makes it the top-level package ``kernels`` (a name that Hugging Face's ``kernels``
distribution, a dependency of transformers, owns). This package is their front door: a wheel
copies the folder's modules in here (setup.py), a source checkout or an editable install reads
them in place through ``__path__``. lint-imports therefore never analyses them: what they may import
(torch, triton, the standard library and each other) is checked by ``tests/test_kernels_imports.py``.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE.parents[1] / "kernels"
if not (_HERE / "flow_step.py").is_file() and _SOURCE.is_dir():
    __path__.append(str(_SOURCE))  # noqa: F821  (a package's __path__)

from ._utils import BACKENDS, get_backend, interpreting, set_backend, use_backend  # noqa: E402
from .flow_step import flow_step, flow_step_reference  # noqa: E402
from .sde_step import SdeCoefficients, cps_coefficients, sde_coefficients, sde_step, sde_step_reference  # noqa: E402
from .velocity_kl import velocity_kl, velocity_kl_reference  # noqa: E402

__all__ = [
    "BACKENDS",
    "flow_step",
    "flow_step_reference",
    "velocity_kl",
    "velocity_kl_reference",
    "SdeCoefficients",
    "sde_coefficients",
    "cps_coefficients",
    "sde_step",
    "sde_step_reference",
    "get_backend",
    "set_backend",
    "use_backend",
    "interpreting",
]
