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

__all__ = ["Algorithm", "MicroBatch", "RewardBackprop", "rollout", "sample_latents"]


class RewardBackprop(Algorithm):
    """Reward feedback learning: ``loss = reward.loss(scores) + kl_weight * regulariser``."""

    Options = NoOptions

    def __init__(self, config, options=None, *, model: VideoModel, sampler: Sampler, reward: Reward,
                 plan: list[StepPlan]):
        self.config, self.model, self.sampler, self.reward, self.plan = config, model, sampler, reward, plan

    @classmethod
    def check(cls, config, options, reward_cls) -> list[str]:
        if not getattr(reward_cls, "differentiable", False):
            raise ConfigError(f"algorithm: reward_backprop needs a reward with gradients; {config.reward.name} gives "
                              "none: use algorithm: grpo (policy gradient), or list it with weight 0 beside a "
                              "differentiable reward")
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


def rollout(model: VideoModel, sampler: Sampler, plan: list[StepPlan], batch: dict, *, num_frames: int,
            step: int, seeds: list[int], kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_frames``-frame videos under the plan's gradient window and decode them.

    ``batch["first_frame"]`` ``(B, 3, H, W)`` in [-1, 1] conditions generation.
    Returns ``(videos (B, 3, F, H, W) in [-1, 1], kl)``, ``kl`` the regulariser
    averaged over gradient steps (0-dim fp32; 0 when ``kl_weight`` is 0).
    """
    latents, kl = sample_latents(model, sampler, plan, batch, num_frames=num_frames, step=step, seeds=seeds,
                                 kl_weight=kl_weight)
    return model.decode(latents), kl


def sample_latents(model: VideoModel, sampler: Sampler, plan: list[StepPlan], batch: dict, *, num_frames: int,
                   step: int, seeds: list[int], kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling half of :func:`rollout`: ``(latents (B, C, T, h, w), kl)``."""
    first = batch["first_frame"].to(model.device, model.dtype)
    height, width = first.shape[-2:]
    cond = model.encode(batch["prompt"], first, num_frames)
    # classifier-free guidance: the same image conditioning with the negative prompt's text
    uncond = (model.encode([sampler.negative_prompt] * len(batch["prompt"]), first, num_frames)
              if sampler.uses_guidance else None)
    inject = model.injection(cond)  # TI2V-style first-frame latent injection, or None
    shape = model.latent_shape(num_frames, height, width)
    x = sampler.initial_noise(shape, sample_seeds=seeds, step=step, device=model.device, dtype=model.dtype)
    if inject is not None:  # frame 0 starts clean too, as after every update
        mask, latent = inject
        x = x * (1 - mask) + latent * mask
    trainable = set(model.trainable_experts())
    kl_terms = []
    for p in plan:
        t = torch.full((x.shape[0],), p.timestep, device=model.device, dtype=torch.float32)
        with torch.set_grad_enabled(p.grad):
            v = model.denoise(p.expert, x, t, cond)
            v_uncond = model.denoise(p.expert, x, t, uncond) if uncond is not None else None
            # the regulariser only where the trainable part runs (a frozen expert's kl is 0 and would
            # only dilute the mean); it compares the conditional velocities
            if p.grad and kl_weight > 0 and p.expert in trainable:
                with torch.no_grad():
                    v_ref = model.denoise(p.expert, x, t, cond, base=True)
                kl_terms.append(sampler.regularizer(v, v_ref, p))
            x = sampler.step(x, v, p, v_uncond=v_uncond, inject_mask=inject[0] if inject else None,
                             inject_latent=inject[1] if inject else None)
        if p.last:
            break
    kl = torch.stack(kl_terms).mean() if kl_terms else torch.zeros((), device=model.device)
    return x, kl
