"""rewardfl: Reward Feedback Learning for video diffusion models.

Import cost is kept small: heavy modules (diffsynth, onnxruntime) load only
when a plugin that needs them is created.
"""

import torch  # noqa: F401  (must precede rewardfl._C: it provides libc10/libtorch)

__version__ = "0.1.0"
