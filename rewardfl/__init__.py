"""rewardfl: Reward Feedback Learning for video diffusion models.

Import cost is kept small: heavy modules (diffsynth, onnxruntime) load only
when a plugin that needs them is created.
"""

import importlib.metadata

import torch  # noqa: F401  (must precede rewardfl._C: it provides libc10/libtorch)

try:  # written once, in pyproject.toml's [project] table; read back from the installed metadata
    __version__ = importlib.metadata.version("rewardfl")
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
