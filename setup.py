"""Build rewardfl's compiled parts; the metadata (name, version, dependencies, entry points) is
``pyproject.toml``'s ``[project]`` table.

Needs torch installed first (``pip install --no-build-isolation -e .``): the
extension ``rewardfl._C`` is compiled against the installed torch with
``torch.utils.cpp_extension`` and ninja.

* ``CUDAExtension`` (CPU + CUDA kernels) when torch is a CUDA build and a CUDA
  toolkit is found (``CUDA_HOME``, ``nvcc`` on PATH or /usr/local/cuda). With no
  GPU visible, ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` (A100, H100).
* ``CppExtension`` (CPU kernels only) otherwise.
* ``REWARDFL_CUDA=0|1`` forces either; ``REWARDFL_CUDA=1`` without a toolkit fails.
"""

import glob
import os
import site

from setuptools import setup
from setuptools.command.build_py import build_py

import torch
from torch.utils import cpp_extension

DEFAULT_ARCHS = "8.0;9.0"


def _cuda_home():
    """CUDA_HOME if set, else /usr/local/cuda, else torch's guess (from nvcc on PATH).

    /usr/local/cuda comes before torch's guess: with nvcc symlinked into
    /usr/local/bin, torch guesses /usr/local, which has no lib64/libcudart."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return cpp_extension.CUDA_HOME


def _want_cuda():
    forced = os.environ.get("REWARDFL_CUDA")
    available = torch.version.cuda is not None and _cuda_home() is not None
    if forced == "0":
        return False
    if forced == "1":
        if not available:
            raise RuntimeError(
                "REWARDFL_CUDA=1 but no CUDA build: torch.version.cuda=%r, CUDA_HOME=%r. "
                "Install a CUDA build of torch and set CUDA_HOME to the toolkit." % (torch.version.cuda, _cuda_home())
            )
        return True
    if forced not in (None, ""):
        raise RuntimeError("REWARDFL_CUDA must be 0 or 1, got %r" % forced)
    return available


def _pip_cuda_includes():
    """Headers of the CUDA libraries torch's wheel brings (nvidia/cu*/include), which a
    bare toolkit may lack (e.g. cusparse.h); harmless where the toolkit has them."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
    return dirs


def extensions():
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # No -std flag: torch.utils.cpp_extension picks the standard the installed
    # torch needs (C++20 for torch >= 2.13, C++17 before).
    cxx = ["-O3"]
    if _want_cuda():
        home = _cuda_home()
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        print("rewardfl: building CUDAExtension (CUDA_HOME=%s, archs=%s)" % (home, os.environ.get("TORCH_CUDA_ARCH_LIST", "detected")))
        return [
            cpp_extension.CUDAExtension(
                "rewardfl._C",
                cpp_sources + cuda_sources,
                define_macros=[("WITH_CUDA", None)],
                include_dirs=_pip_cuda_includes(),
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            )
        ]
    print("rewardfl: building CppExtension (CPU kernels only)")
    return [cpp_extension.CppExtension("rewardfl._C", cpp_sources, extra_compile_args={"cxx": cxx})]


class BuildPyWithKernels(build_py):
    """Wheels: the modules of the checkout's top-level ``kernels/`` folder (the Triton kernels, no
    ``__init__.py`` there so that the folder never shadows an installed ``kernels`` package) become
    modules of ``rewardfl.kernels``. An editable install reads them in place instead (see
    ``rewardfl/kernels/__init__.py``)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "rewardfl.kernels":
            for path in sorted(glob.glob(os.path.join("kernels", "*.py"))):
                modules.append((package, os.path.splitext(os.path.basename(path))[0], path))
        return modules


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernels},
)
