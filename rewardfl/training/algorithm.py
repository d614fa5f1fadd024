"""The training algorithm: what one micro-batch contributes to the loss.

The loop (``loop.py``) owns everything around an algorithm: data, gradient
accumulation, the optimizer engine, skips, checkpoints and metrics. An
:class:`~rewardfl.interfaces.Algorithm` (a plugin of the ``rewardfl.algorithms`` group, chosen by
the config key ``algorithm``) turns one micro-batch into a loss to backpropagate. This module holds
the default, :class:`RewardBackprop` (``algorithm: reward_backprop``, reward feedback learning):
sample under the policy's gradient window, decode with gradient, score with a differentiable reward,
add the velocity regulariser. ``algorithm: grpo`` (``rewardfl.algorithms.grpo``) is the policy
gradient for rewards that give no gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import (Algorithm, MicroBatch, NoOptions, Reward, Sampler, SampleContext, StepPlan,
                                 VideoModel, require_gradient)
from rewardfl.sampling.rollout import rollout

__all__ = ["RewardBackprop"]


class RewardBackprop(Algorithm):
    """Reward feedback learning: ``loss = reward.loss(scores) + kl_weight * regulariser``."""

    Options = NoOptions

    def __init__(self, config, options=None, *, model: VideoModel, sampler: Sampler, reward: Reward,
                 plan: list[StepPlan]):
        self.config, self.model, self.sampler, self.reward, self.plan = config, model, sampler, reward, plan

    @classmethod
    def check(cls, config, options, reward_cls) -> list[str]:
        problem = reward_cls.gradient_problem(config.reward.options)
        if problem is not None:
            raise ConfigError(f"algorithm: reward_backprop needs a reward with gradients; {config.reward.name} "
                              f"{problem}. Use algorithm: grpo (policy gradient) or hybrid (both in one run), or "
                              "list it with weight 0 beside a differentiable reward")
        return []

    def micro_batch(self, batch: dict, contexts: Sequence[SampleContext], step: int) -> MicroBatch:
        cfg = self.config
        seeds = [cfg.seed * 7919 + i for i in batch["index"]]
        videos, kl = rollout(self.model, self.sampler, self.plan, batch, num_frames=cfg.data.num_frames, step=step,
                             seeds=seeds, kl_weight=cfg.kl_weight)
        out = self.reward(videos, contexts)
        reward_loss = self.reward.loss(out)
        valid = out.valid.to(out.scores.device)
        require_gradient(reward_loss, videos, valid, f"reward ({cfg.reward.name})")
        # a micro-batch with nothing to learn from still runs backward (weight 0): every process
        # must take part in the same collectives
        weight = 1.0 if bool(valid.any()) else 0.0
        return MicroBatch(loss=weight * (reward_loss + cfg.kl_weight * kl), scores=out.scores.detach(),
                          valid=valid, reward_loss=weight * reward_loss.item(), kl_loss=weight * kl.item(),
                          metrics=dict(out.metrics), videos=videos.detach())


