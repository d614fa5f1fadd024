"""``flow_match_euler``: the few-step flow-matching Euler sampler of Wan2.2 (the default sampler).

Schedule (N = ``num_inference_steps``, k = ``sampler.shift``)::

    s_i       = linspace(1, 0, N + 1)               i = 0..N
    sigmas_i  = k * s_i / (1 + (k - 1) * s_i)       sigmas[0] = 1 (pure noise), sigmas[N] = 0
    timesteps = 1000 * sigmas[:N]                   N=8, k=5: 1000, 972, 938, 893, 833, 750, 625, 417
    x_{i+1}   = x_i + (sigmas[i+1] - sigmas[i]) * v(x_i, timesteps[i])

diffsynth's ``FlowMatchScheduler("Wan")`` gives the same values but drops the
final 0 (its ``sigmas`` has N entries; its ``step`` uses 0 after the last one).

Which steps run, which carry gradient and which expert runs each is training
policy, decided by the core (``rewardfl.sampling.policy``) from this schedule.

Noise: ``initial_noise`` draws each sample's noise on the CPU from a generator
seeded by ``sha256(seed, sample seed, training step)``: reproducible, the same on
every device, different at every step. ``fixed_noise: true`` drops the step (each
sample then starts from the same noise at every step).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal, Optional, Sequence

import torch

from rewardfl.config import ConfigError, TrainConfig
from rewardfl.interfaces import Sampler, StepPlan
from rewardfl.kernels import flow_step, velocity_kl

__all__ = ["FlowMatchEulerSampler", "shifted_sigmas"]

LATENT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``(N + 1,)`` float64 sigmas from 1 to 0, shifted by ``k*s / (1 + (k-1)*s)``."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


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
        #: classifier-free guidance scale; 1 turns guidance off (distilled Lightning weights need none).
        #: Otherwise each step also runs the model on ``negative_prompt`` (same image) and steps with
        #: ``v_uncond + guidance_scale * (v - v_uncond)``, with gradient through both in the window
        guidance_scale: float = 1.0
        #: the unconditional text of classifier-free guidance (used when guidance_scale != 1)
        negative_prompt: str = ""
        #: dtype of the latents the step writes: auto (the input's)
        latent_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
        #: kernels backend: auto (Triton on CUDA, torch elsewhere)
        kernels: Literal["auto", "triton", "torch"] = "auto"

        def __post_init__(self):
            if not self.shift > 0:
                raise ConfigError(f"sampler.shift: must be > 0, got {self.shift}")

    def __init__(self, config: TrainConfig, options: Optional["FlowMatchEulerSampler.Options"] = None, **runtime):
        self.config = config
        self.options = options if options is not None else self.Options()
        self.device = runtime.get("device")
        self.num_steps = config.num_inference_steps
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
