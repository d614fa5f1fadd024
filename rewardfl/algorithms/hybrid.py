"""``algorithm: hybrid``: reward backprop and the policy gradient in one run, on one reward list.

The reward (a ``reward:`` list, the ``weighted_sum`` plugin, or one reward) is split by
:meth:`~rewardfl.interfaces.Reward.gradient_split`:

* the entries that give gradients (and the log-only ones, weight 0) are trained as ``reward_backprop``
  trains them: the videos sampled under the gradient window, decoded with gradient, the weighted sum
  of those entries' losses backpropagated, plus ``kl_weight`` times the velocity regulariser;
* the weighted entries that give none (their plugin has no gradient, or the entry says ``gradient: false``)
  are trained as ``grpo`` trains them: ``policy.group_size`` more
  videos per clip sampled with the SDE over the same window, scored without gradient, group-normalised
  advantages, the clipped surrogate (and ``policy.beta`` times its KL).

One micro-batch's loss is ``loss_backprop + policy_weight * loss_policy``. Both halves are means over
their videos, so with ``policy_weight: 1`` a unit of advantage (one group standard deviation) weighs
as much as a unit of the backpropagated loss; the backprop half's scale is its rewards' (their
``weight`` and ``normalize``), so set ``policy_weight`` to balance the two when their sizes differ (the
logged ``hybrid/backprop_loss`` and ``hybrid/policy_loss`` show both). A step costs both halves: one
backprop rollout and ``group_size`` stochastic samples per clip.

The step's ``reward_score`` is each clip's weighted total over the whole list: its backprop half's
total plus the mean over its group of the policy half's total. Each entry logs ``<label>/score`` as in
a list; the policy half adds ``grpo/*``. With only entries that give gradients this is
``reward_backprop`` exactly; with only entries that give none, ``grpo`` exactly (tests/test_hybrid.py).
Not supported: ``policy.inner_updates`` above 1 (the backprop half samples anew each step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from rewardfl.config import ConfigError, build_dataclass
from rewardfl.interfaces import Algorithm, MicroBatch, Reward, Sampler, SampleContext, StepPlan, VideoModel
from rewardfl.registry import load_plugin

from .grpo import GRPO

__all__ = ["Hybrid"]


class Hybrid(Algorithm):
    """Reward backprop on the reward list's entries that give gradients, GRPO on the others:
    ``loss = loss_backprop + policy_weight * loss_policy`` (docs/algorithms.md)."""

    @dataclasses.dataclass
    class Options:
        #: the policy-gradient half's options: grpo's (group_size, noise_level, train_fraction, clip_range,
        #: beta, advantage_std); inner_updates must stay 1
        policy: dict = dataclasses.field(default_factory=dict)
        #: scale of the policy-gradient loss added to the backpropagated one
        policy_weight: float = 1.0

        def __post_init__(self):
            if not isinstance(self.policy, dict):
                raise ConfigError(f"algorithm.policy: expected a mapping of grpo's options, got {self.policy!r}")
            policy = self.policy_options()
            if policy.inner_updates != 1:
                raise ConfigError("algorithm.policy.inner_updates: hybrid trains once per sampled batch (its "
                                  f"backprop half samples anew every step); got {policy.inner_updates}, set 1")
            if not (math.isfinite(self.policy_weight) and self.policy_weight > 0):
                raise ConfigError(f"algorithm.policy_weight: must be a finite number > 0, got {self.policy_weight}")

        def policy_options(self) -> GRPO.Options:
            """``policy`` validated as grpo's options (errors name ``algorithm.policy.<key>``)."""
            try:
                return build_dataclass(GRPO.Options, dict(self.policy), prefix="algorithm.policy")
            except ConfigError as e:  # grpo's own checks name its keys as algorithm.<key>: here they are policy's
                message = str(e)
                if message.startswith("algorithm.") and not message.startswith("algorithm.policy"):
                    message = "algorithm.policy." + message[len("algorithm."):]
                raise ConfigError(message) from None

    def __init__(self, config, options: "Hybrid.Options", *, model: VideoModel, sampler: Sampler, reward: Reward,
                 plan: list[StepPlan]):
        self.config, self.options = config, options
        gradient, policy = reward.gradient_split()
        self.backprop = self.policy = None
        if gradient is not None:
            backprop_cls = load_plugin("algorithm", "reward_backprop")
            self.backprop = backprop_cls(config, backprop_cls.Options(), model=model, sampler=sampler, reward=gradient,
                                         plan=plan)
        if policy is not None:
            self.policy = GRPO(config, options.policy_options(), model=model, sampler=sampler, reward=policy,
                               plan=plan)
        self.group_size = options.policy_options().group_size

    @classmethod
    def check(cls, config, options: "Hybrid.Options", reward_cls) -> list[str]:
        policy = options.policy_options()
        lines = GRPO.check(config, policy, reward_cls)
        return [f"hybrid: the rewards with gradients by reward backprop; the others by {lines[0]} "
                f"(policy_weight {options.policy_weight:g})"]

    def micro_batch(self, batch: dict, contexts: Sequence[SampleContext], step: int) -> MicroBatch:
        backprop = self.backprop.micro_batch(batch, contexts, step) if self.backprop is not None else None
        policy = self.policy.micro_batch(batch, contexts, step) if self.policy is not None else None
        if policy is None:
            return backprop
        if backprop is None:
            return policy
        w = self.options.policy_weight
        # each clip's weighted total over the whole list: its own + the mean over its group's videos
        group_valid = policy.valid.view(-1, self.group_size).to(backprop.scores.device)
        group_scores = policy.scores.view(-1, self.group_size).to(backprop.scores.device)
        group_mean = (torch.where(group_valid, group_scores, 0.0).sum(1) / group_valid.sum(1).clamp(min=1))
        valid = backprop.valid.to(group_valid.device) | group_valid.any(1)
        scores = torch.where(backprop.valid.to(group_valid.device), backprop.scores, 0.0) + group_mean
        metrics = {**backprop.metrics, **policy.metrics,
                   "hybrid/backprop_loss": backprop.reward_loss, "hybrid/policy_loss": policy.reward_loss}
        return MicroBatch(loss=backprop.loss + w * policy.loss, scores=scores, valid=valid,
                          reward_loss=backprop.reward_loss + w * policy.reward_loss,
                          kl_loss=backprop.kl_loss + w * policy.kl_loss, metrics=metrics, videos=backprop.videos)
