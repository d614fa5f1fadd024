"""Build and install rewardfl.

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

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
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
    import site

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


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


setup(
    name="rewardfl",
    version="0.1.0",
    description="Reward Feedback Learning for video diffusion models",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rewardfl", "rewardfl.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernels},
    install_requires=[
        # torch is installed first, by hand, with an exact pin (see README); this
        # range only guards against an incompatible one and never pulls a new torch.
        "torch>=2.11,<2.15",
        "triton>=3.6",
        "numpy",
        "scipy",  # Student-t quantiles of the evaluation intervals (rewardfl.evaluation.metrics)
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm",
        "onnx>=1.16",
        # GPU build of onnxruntime: it also runs on CPU. Never add the CPU
        # "onnxruntime" package next to it: it replaces this one's module.
        "onnxruntime-gpu>=1.20",
        "onnx2torch>=1.5",
        "diffsynth==2.1.12",
        "peft>=0.13",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",
        "matplotlib",
        "opencv-python-headless>=4.9",
        # imported directly (diffsynth pulls them too, but we do not lean on that): torchvision's
        # batched NMS, einops in the DiT forward, transformers' and tokenizers' tokenizers, Pillow
        "torchvision",
        "einops",
        "transformers",
        "tokenizers",
        "Pillow",
        "tensorboard>=2.16",  # report_to: tensorboard (the default)
    ],
    extras_require={
        # multi-GPU / multi-node training (install with --no-build-isolation: it builds against torch)
        "deepspeed": ["deepspeed==0.19.8"],
        # report_to: [wandb]
        "wandb": ["wandb==0.31.0"],
        # model_name: wan2_2_diffusers (Wan2.2 from a diffusers folder)
        "diffusers": ["diffusers==0.42.1"],
        # eval.judges: [face_dlib] (dlib's face recognizer; a prebuilt wheel, no compiler, no dependencies)
        "dlib": ["dlib-bin==20.0.1.post1"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "scikit-image>=0.22",
            "pybind11>=2.12",
            "ninja",
            "deepspeed==0.19.8",
            "import-linter>=2.1",  # tests/test_architecture.py: the import contracts of pyproject.toml
            "diffusers==0.42.1",  # tests: wan2_2_diffusers, LoRA files in diffusers' real loader
            "wandb==0.31.0",  # tests: report_to wandb, offline
            "dlib-bin==20.0.1.post1",  # tests: the face_dlib judge on real photos
            # tests/test_install.py: the checkout's kernels/ folder must never shadow Hugging Face's
            # kernels (a transformers dependency); listed so that the test cannot pass for want of it
            "kernels",
        ],
    },
    entry_points={
        "console_scripts": [
            "rewardfl-run = rewardfl.run:main",
            "rewardfl-export = rewardfl.export:main",
            "rewardfl-score = rewardfl.rewards.face_identity.score:main",
            "rewardfl-generate = rewardfl.generate:main",
            "rewardfl-evaluate = rewardfl.evaluate:main",
        ],
        "rewardfl.samplers": [
            "flow_match_euler = rewardfl.samplers.flow_match_euler:FlowMatchEulerSampler",
        ],
        "rewardfl.rewards": [
            "face_identity = rewardfl.rewards.face_identity:FaceIdentityReward",
            "clip_score = rewardfl.rewards.clip:ClipScoreReward",
            "pickscore = rewardfl.rewards.clip:PickScoreReward",
            "hps = rewardfl.rewards.clip:HpsReward",
            "aesthetic = rewardfl.rewards.clip:AestheticReward",
            "identity_consistency = rewardfl.rewards.face_identity:IdentityConsistencyReward",
            "motion = rewardfl.rewards.motion:MotionReward",
            "command = rewardfl.rewards.command:CommandReward",
            "face_dlib = rewardfl.rewards.face_dlib:DlibFaceJudge",
            "weighted_sum = rewardfl.rewards.weighted_sum:WeightedSumReward",
        ],
        "rewardfl.algorithms": [
            "reward_backprop = rewardfl.training.algorithm:RewardBackprop",
            "grpo = rewardfl.algorithms.grpo:GRPO",
        ],
        "rewardfl.models": [
            "wan2_2 = rewardfl.models.wan.model:Wan22Model",
            "wan2_2_tiny = rewardfl.models.wan.model:Wan22TinyModel",
            "wan2_2_diffusers = rewardfl.models.wan.diffusers_model:Wan22DiffusersModel",
        ],
    },
    zip_safe=False,
)
