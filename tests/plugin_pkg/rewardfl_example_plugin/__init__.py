"""A minimal third-party reward: how bright the generated video is.

score = 1 - |mean pixel value in [0, 1] - target|, differentiable.
"""

import dataclasses

import torch

from rewardfl.interfaces import Reward, RewardOutput


def brightness(videos):
    """Mean brightness in [0, 1] of videos in [-1, 1] (a helper; not a plugin class)."""
    return (videos.float().flatten(1).mean(1) + 1.0) / 2.0


class MeanBrightnessReward(Reward):
    differentiable = True

    @dataclasses.dataclass
    class Options:
        target: float = 0.5  # wanted mean brightness, 0..1

    def __init__(self, config, options, **runtime):
        if not 0.0 <= options.target <= 1.0:
            raise ValueError(f"reward.target: must be within [0, 1], got {options.target}")
        self.target = options.target

    def __call__(self, videos, contexts):
        b = brightness(videos)
        scores = 1.0 - (b - self.target).abs()
        valid = torch.ones(videos.shape[0], dtype=torch.bool, device=videos.device)
        return RewardOutput(scores, valid, {"brightness": float(b.mean())})
