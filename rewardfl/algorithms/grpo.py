"""``algorithm: grpo``: group relative policy optimisation for flow models (Flow-GRPO, DanceGRPO).

For rewards that give no gradient (a scorer program, an HTTP judge, a count), and for any other
reward used without its gradient. One micro-batch of B clips:

1. **Sample groups.** Each clip is generated ``group_size`` (G) times: the same image and prompt,
   different starting noise. Steps before ``mid_timestep`` are the sampler's deterministic updates;
   steps ``mid_timestep .. final_timestep`` (the gradient window of reward backprop, here the
   stochastic window: MixGRPO's mixed window when ``mid_timestep > 0``) are stochastic: the SDE with
   the flow's marginals (``rewardfl.kernels.sde_step``, noise level ``noise_level``), each transition a
   Gaussian whose log-probability is kept. Nothing here carries gradient.
2. **Score** the B*G decoded videos with the reward (no gradient) and turn them into advantages,
   normalised within each group: ``A = (r - mean_group) / (std_group + 1e-4)`` (population std over
   the group's valid videos; ``advantage_std: global``: the micro-batch's std instead). Invalid videos,
   and groups with fewer than 2 valid videos, get ``A = 0``.
3. **Policy gradient.** On ``train_fraction`` of the window's steps that run a trainable expert
   (drawn per training step, seeded; at least one), the model runs again *with* gradient on the
   stored latents, and the stored transition is scored under it: ``ratio = exp(logp - logp_old)``, and
   the loss is PPO's clipped surrogate ``mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range,
   1 + clip_range)))`` over the B*G videos, plus ``beta`` times the KL divergence between the
   transition under the trained and the reference model (adapters off)::

       KL = mean((mean_theta - mean_ref)^2) / (2 s^2) = mean(c_v^2 (v - v_ref)^2) / (2 s^2)

   averaged over the trained steps. One update per sampled batch (on-policy, Flow-GRPO's default):
   the ratio is then 1 up to numerics (exactly 1: the log-probabilities are recomputed by the same
   kernel from the same inputs), so its gradient is the REINFORCE estimate ``-mean(A * grad logp)``
   and the clip only guards against the sampling and training passes drifting apart.

Memory: the B*G trajectories' latents of the trained steps only (the others are dropped as sampling
goes on), and the autograd graph of the trained steps' forwards. Resume is exact: the starting noise
and the SDE noise are seeded by (seed, clip index, group member, training step), nothing is carried
between steps. Not yet: several updates per sampled batch, classifier-free guidance, first-frame
injection models (TI2V), a hybrid with reward backprop in one run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import Algorithm, MicroBatch, Reward, Sampler, SampleContext, StepPlan, VideoModel
from rewardfl.kernels import SdeCoefficients, sde_coefficients, sde_step, velocity_kl

__all__ = ["GRPO", "group_advantages", "clipped_surrogate"]

#: added to the group std (Flow-GRPO's value): a group whose rewards barely differ gets large, not infinite,
#: advantages
STD_EPS = 1e-4


def group_advantages(scores: torch.Tensor, valid: torch.Tensor, group_size: int, *, std: str = "group"
                     ) -> torch.Tensor:
    """``(N,)`` float64 advantages of ``N = B * group_size`` scores, consecutive ``group_size`` per group.

    ``(r - mean) / (std + 1e-4)`` over each group's valid scores (population std; ``std="global"``:
    the std of every valid score of the batch). 0 for invalid scores and for groups with fewer than
    two valid scores (nothing to compare)."""
    s = scores.detach().to(torch.float64).cpu().view(-1, group_size)
    m = valid.detach().cpu().bool().view(-1, group_size)
    count = m.sum(1, keepdim=True)
    mean = torch.where(m, s, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    if std == "global":
        flat = s[m]
        spread = (flat - flat.mean()).pow(2).mean().sqrt() if flat.numel() else torch.zeros((), dtype=torch.float64)
        spread = spread.expand_as(mean)
    else:
        spread = (torch.where(m, s - mean, 0.0).pow(2).sum(1, keepdim=True) / count.clamp(min=1)).sqrt()
    adv = (s - mean) / (spread + STD_EPS)
    adv = torch.where(m & (count >= 2), adv, torch.zeros_like(adv))
    return adv.view(-1)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate ``mean(max(-A r, -A clip(r, 1 - c, 1 + c)))``, ``r = exp(logp - logp_old)``;
    0-dim (differentiable in ``log_prob``), and ``{"ratio_mean", "ratio_max_dev", "clip_fraction"}``."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.to(ratio.dtype).to(ratio.device)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():
        stats = {"ratio_mean": float(ratio.mean()), "ratio_max_dev": float((ratio - 1).abs().max()),
                 "clip_fraction": float(((ratio - 1).abs() > clip_range).float().mean())}
    return loss, stats


@dataclasses.dataclass
class _Transition:
    plan: StepPlan
    coef: SdeCoefficients
    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor


class GRPO(Algorithm):
    """Group relative policy optimisation over the stochastic window (see the module docstring)."""

    @dataclasses.dataclass
    class Options:
        #: videos per clip (the same image and prompt, different noise); advantages compare them
        group_size: int = 4
        #: the SDE's noise level a: g(t) = a * sqrt(t / (1 - t)) (Flow-GRPO: 0.7)
        noise_level: float = 0.7
        #: fraction of the window's steps (that run a trainable expert) trained per step, drawn anew each step
        train_fraction: float = 1.0
        #: PPO's clip of the importance ratio (Flow-GRPO: 1e-4)
        clip_range: float = 1e-4
        #: weight of the KL divergence to the reference model (adapters off); 0 skips the reference forward
        beta: float = 0.04
        #: advantages divided by each group's std, or by the micro-batch's
        advantage_std: Literal["group", "global"] = "group"

        def __post_init__(self):
            if self.group_size < 2:
                raise ConfigError(f"algorithm.group_size: needs >= 2 videos per clip to compare, got {self.group_size}")
            if not (math.isfinite(self.noise_level) and self.noise_level > 0):
                raise ConfigError(f"algorithm.noise_level: must be a finite number > 0 (0 has no log-probability), "
                                  f"got {self.noise_level}")
            if not 0 < self.train_fraction <= 1:
                raise ConfigError(f"algorithm.train_fraction: must be in (0, 1], got {self.train_fraction}")
            if not (math.isfinite(self.clip_range) and self.clip_range > 0):
                raise ConfigError(f"algorithm.clip_range: must be a finite number > 0, got {self.clip_range}")
            if not (math.isfinite(self.beta) and self.beta >= 0):
                raise ConfigError(f"algorithm.beta: must be a finite number >= 0, got {self.beta}")

    def __init__(self, config, options: "GRPO.Options", *, model: VideoModel, sampler: Sampler, reward: Reward,
                 plan: list[StepPlan]):
        self.config, self.options = config, options
        self.model, self.sampler, self.reward, self.plan = model, sampler, reward, plan
        self.check(config, options, type(reward))
        if getattr(sampler, "uses_guidance", False):
            raise ConfigError("algorithm: grpo does not support classifier-free guidance yet; set "
                              "sampler.guidance_scale: 1")

    @classmethod
    def check(cls, config, options, reward_cls) -> list[str]:
        sampler = config.sampler.options
        if getattr(sampler, "guidance_scale", 1.0) != 1.0:
            raise ConfigError("algorithm: grpo does not support classifier-free guidance yet; set "
                              "sampler.guidance_scale: 1")
        window = f"{config.mid_timestep}..{config.final_timestep}"
        return [f"grpo: {options.group_size} videos per clip, stochastic steps {window} (noise_level "
                f"{options.noise_level:g}), {options.train_fraction:g} of them trained per step"]

    # ------------------------------------------------------------------ the pieces

    def _coefficients(self, p: StepPlan) -> SdeCoefficients:
        sigmas = self.sampler.sigmas
        cap = float(sigmas[1]) if p.sigma >= 1.0 and len(sigmas) > 1 else None
        return sde_coefficients(p.sigma, p.sigma_next, self.options.noise_level, sigma_cap=cap)

    def _generator(self, step: int, indices: Sequence[int], salt: int) -> torch.Generator:
        key = (self.config.seed * 1_000_003 + step) * 8191 + salt
        for i in indices:
            key = (key * 31 + int(i) + 1) % (2**62)
        return torch.Generator().manual_seed(key)

    def _trained(self, transitions: list[_Transition], step: int, indices) -> list[_Transition]:
        if not transitions:
            raise ConfigError("algorithm: grpo has no stochastic step that runs a trainable expert; move "
                              "mid_timestep/final_timestep or change trainable_models")
        k = max(1, round(self.options.train_fraction * len(transitions)))
        if k == len(transitions):
            return transitions
        order = torch.randperm(len(transitions), generator=self._generator(step, indices, 2)).tolist()
        return [transitions[i] for i in sorted(order[:k])]

    @torch.no_grad()
    def _sample(self, batch: dict, step: int):
        cfg, model, g = self.config, self.model, self.options.group_size
        first = batch["first_frame"].repeat_interleave(g, 0).to(model.device, model.dtype)
        prompts = [p for p in batch["prompt"] for _ in range(g)]
        num_frames = cfg.data.num_frames
        cond = model.encode(prompts, first, num_frames)
        if model.injection(cond) is not None:
            raise ConfigError(f"algorithm: grpo does not support first-frame injection models ({cfg.model_name}) yet")
        seeds = [(cfg.seed * 7919 + int(i)) * 1009 + j for i in batch["index"] for j in range(g)]
        x = self.sampler.initial_noise(model.latent_shape(num_frames, *first.shape[-2:]), sample_seeds=seeds,
                                       step=step, device=model.device, dtype=model.dtype)
        noise = self._generator(step, batch["index"], 1)
        trainable = set(model.trainable_experts())
        transitions = []
        for p in self.plan:
            t = torch.full((x.shape[0],), p.timestep, device=model.device, dtype=torch.float32)
            v = model.denoise(p.expert, x, t, cond)
            if p.grad:  # the stochastic window
                coef = self._coefficients(p)
                z = torch.randn(x.shape, generator=noise, dtype=torch.float32).to(x.device, x.dtype)
                x_next, log_prob = sde_step(x, v, coef, noise=z)
                if p.expert in trainable:
                    transitions.append(_Transition(p, coef, x, x_next, log_prob))
                x = x_next
            else:
                x = self.sampler.step(x, v, p)
            if p.last:
                break
        return cond, model.decode(x), transitions

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(self, batch: dict, contexts: Sequence[SampleContext], step: int) -> MicroBatch:
        o, model = self.options, self.model
        cond, videos, transitions = self._sample(batch, step)
        group_contexts = [c for c in contexts for _ in range(o.group_size)]
        with torch.no_grad():
            out = self.reward(videos, group_contexts)
        scores, valid = out.scores.detach().float(), out.valid.detach().cpu().bool()
        advantages = group_advantages(scores, valid, o.group_size, std=o.advantage_std)
        trained = self._trained(transitions, step, batch["index"])
        loss = torch.zeros((), device=model.device)
        surrogate_sum, kl_sum, stats = 0.0, 0.0, []
        for tr in trained:
            t = torch.full((tr.x.shape[0],), tr.plan.timestep, device=model.device, dtype=torch.float32)
            v = model.denoise(tr.plan.expert, tr.x, t, cond)
            _, log_prob = sde_step(tr.x, v, tr.coef, x_next=tr.x_next)
            surrogate, s = clipped_surrogate(log_prob, tr.log_prob, advantages, o.clip_range)
            term = surrogate
            if o.beta > 0:
                with torch.no_grad():
                    v_ref = model.denoise(tr.plan.expert, tr.x, t, cond, base=True)
                kl = velocity_kl(v, v_ref, tr.coef.s / abs(tr.coef.c_v))
                term = term + o.beta * kl
                kl_sum += kl.item()
            loss = loss + term / len(trained)
            surrogate_sum += surrogate.item()
            stats.append(s)
        # nothing to compare anywhere in this micro-batch: still backward (weight 0), every process must join
        weight = 1.0 if bool((advantages != 0).any()) else 0.0
        metrics = dict(out.metrics)
        metrics.update({
            "grpo/ratio_mean": sum(s["ratio_mean"] for s in stats) / len(stats),
            "grpo/ratio_max_dev": max(s["ratio_max_dev"] for s in stats),
            "grpo/clip_fraction": sum(s["clip_fraction"] for s in stats) / len(stats),
            "grpo/advantage_abs_mean": float(advantages.abs().mean()),
            "grpo/trained_steps": float(len(trained)),
        })
        return MicroBatch(loss=weight * loss, scores=scores.cpu(), valid=valid,
                          reward_loss=weight * surrogate_sum / len(trained), kl_loss=weight * kl_sum / len(trained),
                          metrics=metrics, videos=videos.detach())
