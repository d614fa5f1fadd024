"""Sampling a video under a step plan: what training, evaluation and generation all run.

:func:`sample_latents` walks the plan (:mod:`rewardfl.sampling.policy`): each step's expert predicts a
velocity (with gradient on the plan's gradient steps), the sampler steps; :func:`rollout` decodes too.
"""

from __future__ import annotations

import torch

from rewardfl.interfaces import Sampler, StepPlan, VideoModel

__all__ = ["rollout", "sample_latents"]


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
