"""``algorithm: grpo``: group relative policy optimisation for flow models (Flow-GRPO, DanceGRPO).

For rewards that give no gradient (a scorer program, an HTTP judge, a count), and for any other
reward used without its gradient. One micro-batch of B clips:

1. **Sample groups.** Each clip is generated ``group_size`` (G) times: the same image and prompt,
   different starting noise (``same_start_noise``: the same). Steps before ``mid_timestep`` are the
   sampler's deterministic updates; steps ``mid_timestep .. final_timestep`` (the gradient window of
   reward backprop, here the stochastic window: MixGRPO's mixed window when ``mid_timestep > 0``) are
   stochastic: the SDE with the flow's marginals (``rewardfl.kernels.sde_step``, noise level
   ``noise_level``), each transition a Gaussian whose log-probability is kept. ``sde: cps`` takes
   coefficients-preserving sampling's Gaussian instead (Flow-CPS,
   ``rewardfl.kernels.cps_coefficients``): the same kernel, other coefficients; its step into t = 0 is
   deterministic and not trained. Nothing here carries gradient.
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

   averaged over the trained steps. With one update per sampled batch (``inner_updates: 1``, on-policy,
   Flow-GRPO's default) the ratio is 1 up to numerics (exactly 1: the log-probabilities are recomputed
   by the same kernel from the same inputs), so its gradient is the REINFORCE estimate
   ``-mean(A * grad logp)`` and the clip only guards against the sampling and training passes drifting
   apart.
4. **Inner updates** (``inner_updates: K``, Flow-GRPO's ``num_inner_epochs``, PPO's epochs). Optimizer
   steps come in cycles of K: the first samples and scores as above; the next K - 1 (:meth:`GRPO.replays`:
   the loop hands them the same micro-batches and draws nothing) train again on the same groups (the
   stored latents, old log-probabilities and advantages; the conditioning is encoded again from the
   clips, the encoders being frozen), under weights that moved: the ratio leaves 1 and the clip
   bounds how far one cycle moves the policy. The trained steps are drawn anew each step. A replay
   costs the trained steps' forward and backward (and the reference forward for the KL) plus one
   encode: no sampling, decoding or scoring. A replay step logs the scores of the samples it trains on.

Memory: the B*G trajectories' latents of the window's trainable steps only (the others are dropped as
sampling goes on), and the autograd graph of the trained steps' forwards (``video_chunk``: the videos
sampled, decoded and trained that many at a time, each trained chunk its own graph, so the backward's
working set is one chunk's; the memory planner plans the step, docs/algorithms.md); with ``inner_updates > 1``
those latents, log-probabilities and advantages of every micro-batch of the step stay until the
cycle's last update (the loop keeps the micro-batches' clips too). Resume is exact: the starting noise
and the SDE noise are seeded by (seed, clip index, group member, training step); between two updates
of a cycle a checkpoint keeps the cycle's groups (:meth:`GRPO.state_dict`, ``algorithm-<rank>.safetensors``)
and the loop the data position the cycle's clips were drawn from. Classifier-free guidance
(``sampler.guidance_scale``): the SDE steps with the guided velocity ``v_u + s (v - v_u)``, both
velocities under the trained weights (with gradient through both), the KL against the base model's
guided velocity. Not yet: first-frame injection models (TI2V). ``algorithm: hybrid`` runs it beside reward backprop (``hybrid.py``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Literal, Optional, Sequence

import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import Algorithm, MicroBatch, Reward, Sampler, SampleContext, StepPlan, VideoModel
from rewardfl.kernels import SdeCoefficients, cps_coefficients, sde_coefficients, sde_step, velocity_kl

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
    ratio, loss = _surrogate(log_prob, old_log_prob, advantages, clip_range)
    return loss, _ratio_stats(ratio, clip_range)


def _surrogate(log_prob, old_log_prob, advantages, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ratio, loss)`` of :func:`clipped_surrogate`, without reading any value (the planner runs it)."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.to(ratio.dtype).to(ratio.device)
    return ratio, torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()


@torch.no_grad()
def _ratio_stats(ratio: torch.Tensor, clip_range: float) -> dict:
    return {"ratio_mean": float(ratio.mean()), "ratio_max_dev": float((ratio - 1).abs().max()),
            "clip_fraction": float(((ratio - 1).abs() > clip_range).float().mean())}


@dataclasses.dataclass
class _Transition:
    """One stochastic step of the B*G trajectories: its inputs, its sampled output and log-probability."""

    plan: StepPlan
    coef: SdeCoefficients
    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor


@dataclasses.dataclass
class _Groups:
    """One micro-batch's sampled groups: everything its updates train on (the conditioning is encoded
    again from the batch), kept over the cycle's inner updates."""

    index: list[int]  # the clips' dataset indices: a replay checks it was handed the same clips
    transitions: list[_Transition]  # the window's steps that run a trainable expert
    advantages: torch.Tensor  # (B*G,) float64
    scores: torch.Tensor  # (B*G,) float32, CPU
    valid: torch.Tensor  # (B*G,) bool, CPU
    metrics: dict  # the reward's scalars


class GRPO(Algorithm):
    """Group relative policy optimisation over the stochastic window (see the module docstring)."""

    @dataclasses.dataclass
    class Options:
        #: videos per clip (the same image and prompt, different noise); advantages compare them
        group_size: int = 4
        #: the SDE's noise level a: g(t) = a * sqrt(t / (1 - t)) (Flow-GRPO: 0.7); under ``sde: cps``, the
        #: fresh noise's share sin(a * pi / 2) of the noise at the step's end, a in (0, 1]
        noise_level: float = 0.7
        #: the stochastic step: ``flow_grpo``, Flow-GRPO's Euler-Maruyama step of the SDE (exact as the step
        #: shrinks; a few large steps leave extra noise in the samples), or ``cps``, coefficients-preserving
        #: sampling (Flow-CPS: the sample's clean and noise coefficients exactly the schedule's at every
        #: step; the step into t = 0 is then deterministic and not trained)
        sde: Literal["flow_grpo", "cps"] = "flow_grpo"
        #: fraction of the window's steps (that run a trainable expert) trained per step, drawn anew each step
        train_fraction: float = 1.0
        #: PPO's clip of the importance ratio (Flow-GRPO: 1e-4)
        clip_range: float = 1e-4
        #: weight of the KL divergence to the reference model (adapters off); 0 skips the reference forward
        beta: float = 0.04
        #: advantages divided by each group's std, or by the micro-batch's
        advantage_std: Literal["group", "global"] = "group"
        #: optimizer steps per sampled batch (Flow-GRPO's num_inner_epochs, PPO's epochs): the first samples,
        #: the next inner_updates - 1 train again on the same groups (no sampling, decoding or scoring)
        inner_updates: int = 1
        #: videos per forward: the B*G videos sampled, decoded and trained in chunks of this many (each
        #: trained chunk its own graph, so the backward's working set, the DiT blocks recomputed under
        #: gradient checkpointing, is one chunk's); the same videos and the same update. 0: all at once
        video_chunk: int = 0
        #: every video of a group starts from the same noise (DanceGRPO's ``init_same_noise``): the rewards
        #: within a group then differ only by the stochastic steps' noise, the part the update learns from;
        #: false: each video its own starting noise (Flow-GRPO)
        same_start_noise: bool = False

        def __post_init__(self):
            if self.group_size < 2:
                raise ConfigError(f"algorithm.group_size: needs >= 2 videos per clip to compare, got {self.group_size}")
            if not (math.isfinite(self.noise_level) and self.noise_level > 0):
                raise ConfigError(f"algorithm.noise_level: must be a finite number > 0 (0 has no log-probability), "
                                  f"got {self.noise_level}")
            if self.sde == "cps" and not self.noise_level <= 1:
                raise ConfigError(f"algorithm.noise_level: under sde: cps it is the fresh noise's angle, in (0, 1] "
                                  f"(1: the noise replaced entirely), got {self.noise_level}")
            if not 0 < self.train_fraction <= 1:
                raise ConfigError(f"algorithm.train_fraction: must be in (0, 1], got {self.train_fraction}")
            if not (math.isfinite(self.clip_range) and self.clip_range > 0):
                raise ConfigError(f"algorithm.clip_range: must be a finite number > 0, got {self.clip_range}")
            if not (math.isfinite(self.beta) and self.beta >= 0):
                raise ConfigError(f"algorithm.beta: must be a finite number >= 0, got {self.beta}")
            if self.video_chunk < 0:
                raise ConfigError(f"algorithm.video_chunk: must be >= 0 (0: every video at once), got {self.video_chunk}")
            if self.inner_updates < 1:
                raise ConfigError(f"algorithm.inner_updates: must be >= 1 (optimizer steps per sampled batch), "
                                  f"got {self.inner_updates}")

    def __init__(self, config, options: "GRPO.Options", *, model: VideoModel, sampler: Sampler, reward: Reward,
                 plan: list[StepPlan]):
        self.config, self.options = config, options
        self.model, self.sampler, self.reward, self.plan = model, sampler, reward, plan
        self.check(config, options, type(reward))
        #: classifier-free guidance: the SDE steps with v_uncond + scale * (v - v_uncond)
        self._guidance = float(getattr(sampler.options, "guidance_scale", 1.0)) if sampler.uses_guidance else None
        self._cycle: list[_Groups] = []  # the sampled groups of the current cycle, one per micro-batch
        self._step, self._calls = -1, 0  # the last step micro_batch ran, and its calls so far

    @classmethod
    def check(cls, config, options, reward_cls) -> list[str]:
        window = f"{config.mid_timestep}..{config.final_timestep}"
        inner = f", {options.inner_updates} updates per sampled batch" if options.inner_updates > 1 else ""
        sde = ", cps: the step into t = 0 deterministic" if options.sde == "cps" else ""
        return [f"grpo: {options.group_size} videos per clip, stochastic steps {window} (noise_level "
                f"{options.noise_level:g}{sde}), {options.train_fraction:g} of them trained per step{inner}"]

    # ------------------------------------------------------------------ inner updates

    def replays(self, step: int) -> bool:
        """Steps come in cycles of ``inner_updates``: the first samples, the others train on its groups."""
        return step % self.options.inner_updates != 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The cycle's groups while the next step replays them (``{}`` otherwise): per micro-batch ``m``,
        ``m.index``, ``m.advantages``, ``m.scores``, ``m.valid``, ``m.metric.<name>`` and per stored step
        ``j``: ``m.step.j.plan`` (its index in the schedule), ``m.step.j.x``, ``m.step.j.x_next``,
        ``m.step.j.log_prob``; and ``step``, the last step trained."""
        if not (self._cycle and self.replays(self._step + 1)):
            return {}
        out = {"step": torch.tensor(self._step)}
        for m, g in enumerate(self._cycle):
            out.update({f"{m}.index": torch.tensor(g.index, dtype=torch.int64), f"{m}.advantages": g.advantages,
                        f"{m}.scores": g.scores, f"{m}.valid": g.valid})
            out.update({f"{m}.metric.{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in g.metrics.items()})
            for j, tr in enumerate(g.transitions):
                out.update({f"{m}.step.{j}.plan": torch.tensor(tr.plan.index), f"{m}.step.{j}.x": tr.x,
                            f"{m}.step.{j}.x_next": tr.x_next, f"{m}.step.{j}.log_prob": tr.log_prob})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._cycle, self._step = [], int(state["step"]) if "step" in state else -1
        plans, device = {p.index: p for p in self.plan}, self.model.device
        while f"{len(self._cycle)}.index" in state:
            m, transitions = len(self._cycle), []
            while f"{m}.step.{len(transitions)}.plan" in state:
                key = f"{m}.step.{len(transitions)}"
                p = plans[int(state[f"{key}.plan"])]
                transitions.append(_Transition(p, self._coefficients(p), state[f"{key}.x"].to(device),
                                               state[f"{key}.x_next"].to(device), state[f"{key}.log_prob"].to(device)))
            metrics = {k[len(f"{m}.metric."):]: float(v) for k, v in state.items() if k.startswith(f"{m}.metric.")}
            self._cycle.append(_Groups(state[f"{m}.index"].tolist(), transitions, state[f"{m}.advantages"],
                                       state[f"{m}.scores"], state[f"{m}.valid"], metrics))

    def _slot(self, step: int) -> int:
        """Which micro-batch of ``step`` this call is (0 .. accumulation - 1)."""
        if step != self._step:
            self._step, self._calls = step, 0
        self._calls += 1
        return self._calls - 1

    def _replayed(self, slot: int, batch: dict, step: int) -> _Groups:
        if slot >= len(self._cycle):
            raise ConfigError(f"algorithm.inner_updates: step {step + 1} trains again on the groups sampled before "
                              "it, but this run holds none (resumed from a checkpoint saved with another "
                              "inner_updates or gradient_accumulation_steps?); resume with the values it was "
                              "saved with")
        groups = self._cycle[slot]
        if groups.index != [int(i) for i in batch["index"]]:
            raise RuntimeError(f"grpo: step {step + 1} replays clips {groups.index} but was handed "
                               f"{[int(i) for i in batch['index']]}")
        if slot == len(self._cycle) - 1 and not self.replays(step + 1):
            self._cycle = []  # the cycle's last update: its groups go before the next sampling
        return groups

    # ------------------------------------------------------------------ the pieces

    def _coefficients(self, p: StepPlan) -> Optional[SdeCoefficients]:
        """The stochastic step's Gaussian transition, or None where it is deterministic (``sde: cps`` into
        t = 0): that step is the sampler's and is not trained."""
        if self.options.sde == "cps":
            coef = cps_coefficients(p.sigma, p.sigma_next, self.options.noise_level)
            return coef if coef.s > 0 else None
        sigmas = self.sampler.sigmas
        cap = float(sigmas[1]) if p.sigma >= 1.0 and len(sigmas) > 1 else None
        return sde_coefficients(p.sigma, p.sigma_next, self.options.noise_level, sigma_cap=cap)

    def _key(self, step: int, indices: Sequence[int], salt: int) -> int:
        """A seed from (seed, step, salt, ``indices``): the same draws whichever process or micro-batch
        makes them, so a run's numbers do not depend on how its clips are split."""
        key = (self.config.seed * 1_000_003 + step) * 8191 + salt
        for i in indices:
            key = (key * 31 + int(i) + 1) % (2**62)
        return key

    def _generator(self, step: int, indices: Sequence[int], salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._key(step, indices, salt))

    def _trained(self, transitions: list[_Transition], step: int) -> list[_Transition]:
        if not transitions:
            cps = (" (under sde: cps the step into t = 0 is deterministic: the window needs another step)"
                   if self.options.sde == "cps" else "")
            raise ConfigError("algorithm: grpo has no stochastic step that runs a trainable expert; move "
                              f"mid_timestep/final_timestep or change trainable_models{cps}")
        k = max(1, round(self.options.train_fraction * len(transitions)))
        if k == len(transitions):
            return transitions
        # drawn from (seed, step) alone: every process and micro-batch of a step trains the same steps, as
        # one process with the whole batch would
        # (a host draw: the memory planner runs this on tensors without values)
        chosen = random.Random(self._key(step, (), 2)).sample(range(len(transitions)), k)
        return [transitions[i] for i in sorted(chosen)]

    @torch.no_grad()
    def _condition(self, batch: dict, rows: Optional[slice] = None):
        """The conditioning of the B*G videos (each clip's image and prompt G times; ``rows``: of those
        videos only) as ``(cond, uncond)`` (``uncond``: the negative prompt's with the same images under
        classifier-free guidance, else None), and the frame size."""
        cfg, model, g = self.config, self.model, self.options.group_size
        rows = rows or slice(None)
        first = batch["first_frame"].repeat_interleave(g, 0)[rows].to(model.device, model.dtype)
        prompts = [p for p in batch["prompt"] for _ in range(g)][rows]
        cond = model.encode(prompts, first, cfg.data.num_frames)
        if model.injection(cond) is not None:
            raise ConfigError(f"algorithm: grpo does not support first-frame injection models ({cfg.model_name}) yet")
        uncond = (model.encode([self.sampler.negative_prompt] * len(prompts), first, cfg.data.num_frames)
                  if self._guidance is not None else None)
        return (cond, uncond), first.shape[-2:]

    def _velocities(self, expert: str, x, t, conds, *, base: bool = False):
        """``(v, v_uncond or None)`` of ``x`` under ``conds`` (see :meth:`_condition`)."""
        cond, uncond = conds
        v = self.model.denoise(expert, x, t, cond, base=base)
        return v, (None if uncond is None else self.model.denoise(expert, x, t, uncond, base=base))

    def _guided(self, v, v_uncond):
        """The velocity the SDE steps with: ``v``, or ``v_uncond + scale * (v - v_uncond)`` under guidance
        (as the sampler's deterministic step mixes them)."""
        return v if v_uncond is None else v_uncond + self._guidance * (v - v_uncond)

    def _chunks(self, n: int) -> list[slice]:
        """The B*G videos' rows in chunks of ``video_chunk`` (one chunk of all when 0 or >= n)."""
        size = self.options.video_chunk if 0 < self.options.video_chunk < n else n
        return [slice(a, min(a + size, n)) for a in range(0, n, size)]

    def _conditions(self, batch: dict) -> list:
        """``[(rows, conditioning of those videos)]`` per chunk of the B*G videos (see :meth:`_chunks`)."""
        return [(rows, self._condition(batch, rows)[0])
                for rows in self._chunks(len(batch["index"]) * self.options.group_size)]

    @torch.no_grad()
    def _sample(self, batch: dict, step: int):
        """``(conditions per chunk (:meth:`_conditions`), decoded videos, transitions)``: each chunk of
        videos sampled and decoded on its own; the same videos whatever the chunks (every video's starting
        and SDE noise is its own)."""
        n = len(batch["index"]) * self.options.group_size
        parts = [(rows, *self._sample_rows(batch, step, rows)) for rows in self._chunks(n)]
        conds = [(rows, cond) for rows, cond, _, _ in parts]
        if len(parts) == 1:
            return conds, parts[0][2], parts[0][3]
        transitions = [_Transition(steps[0].plan, steps[0].coef, torch.cat([t.x for t in steps]),
                                   torch.cat([t.x_next for t in steps]), torch.cat([t.log_prob for t in steps]))
                       for steps in zip(*(part[3] for part in parts))]
        return conds, torch.cat([part[2] for part in parts]), transitions

    def _sample_rows(self, batch: dict, step: int, rows: slice):
        cfg, model, g = self.config, self.model, self.options.group_size
        cond, size = self._condition(batch, rows)
        same = self.options.same_start_noise
        seeds = [(cfg.seed * 7919 + int(i)) * 1009 + (0 if same else j) for i in batch["index"] for j in range(g)][rows]
        x = self.sampler.initial_noise(model.latent_shape(cfg.data.num_frames, *size), sample_seeds=seeds,
                                       step=step, device=model.device, dtype=model.dtype)
        # one generator per video, keyed by its clip and group member: its SDE noise does not depend on
        # which other clips share the micro-batch (two processes draw what one process with both would)
        noise = [self._generator(step, (int(i), j), 1) for i in batch["index"] for j in range(g)][rows]
        trainable = set(model.trainable_experts())
        transitions = []
        for p in self.plan:
            t = torch.full((x.shape[0],), p.timestep, device=model.device, dtype=torch.float32)
            v, v_uncond = self._velocities(p.expert, x, t, cond)
            coef = self._coefficients(p) if p.grad else None
            if coef is not None:  # the stochastic window
                z = torch.stack([torch.randn(x.shape[1:], generator=n, dtype=torch.float32) for n in noise])
                z = z.to(x.device, x.dtype)
                x_next, log_prob = sde_step(x, self._guided(v, v_uncond), coef, noise=z)
                if p.expert in trainable:
                    transitions.append(_Transition(p, coef, x, x_next, log_prob))
                x = x_next
            else:
                x = self.sampler.step(x, v, p, v_uncond=v_uncond)
            if p.last:
                break
        return cond, model.decode(x), transitions

    def _sampled(self, batch: dict, contexts: Sequence[SampleContext], step: int):
        """Sample and score the groups of ``batch``: ``(groups, conditions per chunk, videos)``."""
        o = self.options
        conds, videos, transitions = self._sample(batch, step)
        group_contexts = [c for c in contexts for _ in range(o.group_size)]
        with torch.no_grad():
            out = self.reward(videos, group_contexts)
        scores, valid = out.scores.detach().float(), out.valid.detach().cpu().bool()
        advantages = group_advantages(scores, valid, o.group_size, std=o.advantage_std)
        groups = _Groups([int(i) for i in batch["index"]], transitions, advantages, scores.cpu(), valid,
                         dict(out.metrics))
        return groups, conds, videos

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(self, batch: dict, contexts: Sequence[SampleContext], step: int) -> MicroBatch:
        slot = self._slot(step)
        if self.replays(step):
            groups, videos = self._replayed(slot, batch, step), None
            conds = self._conditions(batch)  # the encoders are frozen: the same conditioning as when sampled
        else:
            if slot == 0:
                self._cycle = []  # the last cycle's groups go before this one samples
            groups, conds, videos = self._sampled(batch, contexts, step)
            if self.replays(step + 1):
                self._cycle.append(groups)
        return self._update(groups, conds, videos, step)

    def _update(self, groups: _Groups, conds: list, videos, step: int) -> MicroBatch:
        """The clipped surrogate (and KL) over the trained steps, drawn for ``step``."""
        o, advantages = self.options, groups.advantages
        trained = self._trained(groups.transitions, step)
        loss, surrogates, kls, ratios = self._policy_loss(trained, conds, advantages)
        stats = [_ratio_stats(r, o.clip_range) for r in ratios]
        # nothing to compare anywhere in this micro-batch: still backward (weight 0), every process must join
        weight = 1.0 if bool((advantages != 0).any()) else 0.0
        metrics = dict(groups.metrics)
        metrics.update({
            "grpo/ratio_mean": sum(s["ratio_mean"] for s in stats) / len(stats),
            "grpo/ratio_max_dev": max(s["ratio_max_dev"] for s in stats),
            "grpo/clip_fraction": sum(s["clip_fraction"] for s in stats) / len(stats),
            "grpo/advantage_abs_mean": float(advantages.abs().mean()),
            "grpo/trained_steps": float(len(trained)),
        })
        surrogate_sum = sum(float(x) for x in surrogates)
        kl_sum = sum(float(x) for x in kls)
        return MicroBatch(loss=weight * loss, scores=groups.scores, valid=groups.valid,
                          reward_loss=weight * surrogate_sum / len(trained), kl_loss=weight * kl_sum / len(trained),
                          metrics=metrics, videos=None if videos is None else videos.detach())

    def _policy_loss(self, trained: list[_Transition], conds: list, advantages: torch.Tensor):
        """``(loss, per step surrogate, per step KL, per step ratio)`` of the trained steps, the videos in
        chunks of ``video_chunk`` (each chunk's surrogate and KL weighted by its share of the videos, so
        the sums are the means over all of them); no value is read (the memory planner runs it)."""
        o, model = self.options, self.model
        n = advantages.shape[0]
        loss = torch.zeros((), device=model.device)
        surrogates, kls, ratios = [], [], []
        for tr in trained:
            surrogate_step, kl_step, ratio_step = 0.0, 0.0, []
            for rows, c in conds:
                share = (rows.stop - rows.start) / n
                surrogate, kl, ratio = self._step_terms(tr, rows, c, advantages[rows])
                term = surrogate if kl is None else surrogate + o.beta * kl
                loss = loss + share * term / len(trained)
                surrogate_step = surrogate_step + share * surrogate.detach()
                kl_step = kl_step + (0.0 if kl is None else share * kl.detach())
                ratio_step.append(ratio)
            surrogates.append(surrogate_step)
            kls.append(kl_step)
            ratios.append(torch.cat(ratio_step))
        return loss, surrogates, kls, ratios

    def _step_terms(self, tr: _Transition, rows: slice, cond, advantages: torch.Tensor):
        """One trained step on videos ``rows`` under the current weights: ``(surrogate, kl (None when beta
        is 0), ratio (detached))``."""
        o, model = self.options, self.model
        x, x_next, old = tr.x[rows], tr.x_next[rows], tr.log_prob[rows]
        t = torch.full((x.shape[0],), tr.plan.timestep, device=model.device, dtype=torch.float32)
        v = self._guided(*self._velocities(tr.plan.expert, x, t, cond))
        _, log_prob = sde_step(x, v, tr.coef, x_next=x_next)
        ratio, surrogate = _surrogate(log_prob, old, advantages, o.clip_range)
        if o.beta <= 0:
            return surrogate, None, ratio.detach()
        with torch.no_grad():
            v_ref = self._guided(*self._velocities(tr.plan.expert, x, t, cond, base=True))
        return surrogate, velocity_kl(v, v_ref, tr.coef.s / abs(tr.coef.c_v)), ratio.detach()

    # ------------------------------------------------------------------ the memory planner

    def planned_micro_batch(self, batch: dict, step: int, backprop) -> MicroBatch:
        """The sampling of the groups (decoded, kept as :meth:`micro_batch` keeps them), then the trained
        steps' surrogate and KL with the advantages left at 0 and the reward left out (it runs without
        gradient; its scores are host values the planner has not got). A first update of a cycle: the
        replays of ``inner_updates`` cost less (no sampling or decoding)."""
        conds, videos, transitions = self._sample(batch, step)
        advantages = torch.zeros(videos.shape[0], dtype=torch.float64)
        loss, _, _, _ = self._policy_loss(self._trained(transitions, step), conds, advantages)
        none = torch.zeros(videos.shape[0], dtype=torch.bool)
        return MicroBatch(loss=loss, scores=none.float(), valid=none, reward_loss=0.0, kl_loss=0.0, metrics={},
                          videos=videos.detach())
