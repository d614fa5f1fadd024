"""``flow_match_euler``: the few-step flow-matching Euler sampler of Wan2.2 (the default sampler).

Schedule (N = ``num_inference_steps``, k = ``sampler.shift``)::

    s_i       = linspace(1, 0, N + 1)               i = 0..N
    sigmas_i  = k * s_i / (1 + (k - 1) * s_i)       sigmas[0] = 1 (pure noise), sigmas[N] = 0
    timesteps = 1000 * sigmas[:N]                   N=8, k=5: 1000, 972, 938, 893, 833, 750, 625, 417
    x_{i+1}   = x_i + (sigmas[i+1] - sigmas[i]) * v(x_i, timesteps[i])

diffsynth's ``FlowMatchScheduler("Wan")`` gives the same values but drops the
final 0 (its ``sigmas`` has N entries; its ``step`` uses 0 after the last one).

Expert of step i (experts from high to low noise, e.g. ``("dit", "dit2")``): the
first while ``timesteps[i] >= sampler.boundary * 1000``, the second below; a
single-expert model runs its one expert everywhere.

Which steps run, and which carry gradient (``mid``/``final`` are
``mid_timestep``/``final_timestep``, 0-based step indices)::

    steps run      = 0 .. final                     final jumps to sigma 0 and ends sampling
    gradient steps = mid .. final                   steps before mid run without gradient

This is the reference implementation's window: with N=8, mid=4, final=7 steps 4,
5, 6 and 7 carry gradient. A gradient window whose steps all run experts that
are not trainable is a ``ValueError`` naming these keys.

``min_timestep_boundary``/``max_timestep_boundary`` (the user's document) are
DiffSynth-Studio's *supervised training* keys: fractions of its 1000-step shifted
training schedule from which that trainer draws one timestep per sample. They
do not change reward-FL sampling (the reference implementation accepts them and
never reads them); ``rewardfl.config.training_timestep_range`` says which
timesteps they denote, for ``run --check``'s note.

Noise: ``initial_noise`` draws each sample's noise on the CPU from a generator
seeded by ``sha256(seed, sample seed, training step)``: reproducible, the same on
every device, different at every step. ``fixed_noise: true`` drops the step (each
sample then starts from the same noise at every step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional, Sequence

import torch

from rewardfl.config import ConfigError, TrainConfig
from rewardfl.interfaces import Sampler, StepPlan
from rewardfl.kernels import BACKENDS, flow_step, velocity_kl

__all__ = ["FlowMatchEulerSampler", "shifted_sigmas", "gradient_window"]

LATENT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``(N + 1,)`` float64 sigmas from 1 to 0, shifted by ``k*s / (1 + (k-1)*s)``."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def gradient_window(config: TrainConfig) -> list[int]:
    """Indices of the steps that carry gradient: ``mid_timestep .. final_timestep``."""
    return list(range(config.mid_timestep, config.final_timestep + 1))


class FlowMatchEulerSampler(Sampler):
    """Few-step flow-matching Euler sampler with a truncated-backprop gradient window.

    ``sigmas`` ``(N + 1,)`` and ``timesteps`` ``(N,)`` are float64 tensors (see the
    module docstring for the schedule and the gradient window). The update and
    the regulariser run the fused kernels of ``rewardfl.kernels``.
    """

    @dataclasses.dataclass
    class Options:
        #: timestep shift k of the schedule (Wan2.2: 5)
        shift: float = 5.0
        #: the high-noise expert runs while timestep >= boundary * 1000 (Wan2.2 I2V: 0.9, T2V: 0.875)
        boundary: float = 0.9
        #: classifier-free guidance scale; 1 turns guidance off (distilled Lightning weights need none).
        #: Otherwise each step also runs the model on ``negative_prompt`` (same image) and steps with
        #: ``v_uncond + guidance_scale * (v - v_uncond)``, with gradient through both in the window
        guidance_scale: float = 1.0
        #: the unconditional text of classifier-free guidance (used when guidance_scale != 1)
        negative_prompt: str = ""
        #: dtype of the latents the step writes: auto (the input's), float32, bfloat16, float16
        latent_dtype: str = "auto"
        #: kernels backend: auto (Triton on CUDA), triton, torch
        kernels: str = "auto"

        def __post_init__(self):
            if not self.shift > 0:
                raise ConfigError(f"sampler.shift: must be > 0, got {self.shift}")
            if not 0.0 <= self.boundary <= 1.0:
                raise ConfigError(f"sampler.boundary: must be in [0, 1] (a fraction of 1000 timesteps), "
                                  f"got {self.boundary}")
            if not math.isfinite(self.guidance_scale):
                raise ConfigError(f"sampler.guidance_scale: must be a finite number, got {self.guidance_scale}")
            if self.latent_dtype not in LATENT_DTYPES:
                raise ConfigError(f"sampler.latent_dtype: must be one of {list(LATENT_DTYPES)}, "
                                  f"got {self.latent_dtype!r}")
            if self.kernels not in BACKENDS:
                raise ConfigError(f"sampler.kernels: must be one of {list(BACKENDS)}, got {self.kernels!r}")

    def __init__(self, config: TrainConfig, options: Optional["FlowMatchEulerSampler.Options"] = None, **runtime):
        self.config = config
        self.options = options if options is not None else self.Options()
        self.device = runtime.get("device")
        self.num_steps = config.num_inference_steps
        self.gradient_steps = gradient_window(config)
        self.sigmas = shifted_sigmas(self.num_steps, self.options.shift)
        self.timesteps = 1000.0 * self.sigmas[:-1]
        self.latent_dtype = LATENT_DTYPES[self.options.latent_dtype]
        # None defers to rewardfl.kernels.set_backend (auto: Triton on CUDA)
        self._backend = None if self.options.kernels == "auto" else self.options.kernels
        self.negative_prompt = self.options.negative_prompt

    @property
    def uses_guidance(self) -> bool:
        """True when ``step`` needs ``v_uncond`` (``sampler.guidance_scale`` != 1)."""
        return self.options.guidance_scale != 1.0

    def expert_at(self, index: int, experts: Sequence[str]) -> str:
        """The expert that runs step ``index`` (high-noise one while t >= boundary * 1000)."""
        if len(experts) == 1:
            return experts[0]
        high = float(self.timesteps[index]) >= self.options.boundary * 1000.0
        return experts[0] if high else experts[1]

    def plan(self, experts: Sequence[str], trainable_experts: Sequence[str]) -> list[StepPlan]:
        experts = tuple(experts)
        if len(experts) not in (1, 2):
            raise ValueError(f"sampler.name: flow_match_euler switches between at most 2 experts "
                             f"(high noise, low noise), the model has {list(experts)}")
        final = self.config.final_timestep
        steps = []
        for i in range(final + 1):
            last = i == final
            steps.append(StepPlan(
                index=i,
                timestep=float(self.timesteps[i]),
                sigma=float(self.sigmas[i]),
                sigma_next=0.0 if last else float(self.sigmas[i + 1]),
                expert=self.expert_at(i, experts),
                grad=i in self.gradient_steps,
                last=last,
            ))
        if not any(p.grad and p.expert in trainable_experts for p in steps):
            runs = {p.index: p.expert for p in steps if p.grad}
            raise ValueError(
                f"trainable_models: no gradient step runs a trainable expert (trainable: {list(trainable_experts)}); "
                f"gradient steps {list(runs)} (mid_timestep={self.config.mid_timestep}, final_timestep={final}) "
                f"run {sorted(set(runs.values()))} "
                f"(sampler.boundary={self.options.boundary}: {experts[0]} while timestep >= "
                f"{self.options.boundary * 1000:g}); add one of them to trainable_models or move the gradient window"
            )
        return steps

    def noise_seed(self, sample_seed: int, step: int) -> int:
        """The generator seed of one sample's starting noise at training step ``step``."""
        step_key = 0 if self.config.fixed_noise else int(step)
        key = f"rewardfl-noise:{self.config.seed}:{int(sample_seed)}:{step_key}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)

    def initial_noise(
        self,
        shape: Sequence[int],
        *,
        sample_seeds: Sequence[int],
        step: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal ``(B, *shape)``, B = ``len(sample_seeds)``, drawn in fp32 on the CPU."""
        if len(sample_seeds) == 0:
            raise ValueError("initial_noise: sample_seeds is empty (one seed per sample)")
        noise = []
        for seed in sample_seeds:
            generator = torch.Generator(device="cpu").manual_seed(self.noise_seed(seed, step))
            noise.append(torch.randn(tuple(shape), generator=generator, dtype=torch.float32))
        return torch.stack(noise).to(device=device, dtype=dtype)

    def step(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        plan: StepPlan,
        *,
        v_uncond: Optional[torch.Tensor] = None,
        inject_mask: Optional[torch.Tensor] = None,
        inject_latent: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x + plan.dt * v_mix`` (guidance mixed in), injection applied, in ``sampler.latent_dtype``."""
        guidance = self.options.guidance_scale
        if self.uses_guidance and v_uncond is None:
            raise ValueError(f"sampler.guidance_scale={guidance} needs the unconditional velocity: pass v_uncond "
                             "to step (or set sampler.guidance_scale: 1)")
        return flow_step(
            x, v, plan.dt,
            v_uncond=v_uncond if self.uses_guidance else None,
            guidance=guidance if self.uses_guidance else 1.0,
            inject_mask=inject_mask,
            inject_latent=inject_latent,
            out_dtype=self.latent_dtype or x.dtype,
            backend=self._backend,
        )

    def regularizer(self, v: torch.Tensor, v_ref: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """``mean((v - v_ref)^2) / (2 sigma^2)``, fused; 0-dim fp32, gradient to ``v`` only."""
        return velocity_kl(v, v_ref, plan.sigma, backend=self._backend)
