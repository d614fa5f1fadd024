"""Training policy: which sampling steps run, which carry gradient, which expert runs each.

Decided by the core from the config and the model's declared experts and boundary;
the sampler only supplies the schedule (``sigmas``, ``timesteps``). With
``N = num_inference_steps``, ``mid``/``final`` = ``mid_timestep``/``final_timestep``::

    steps run      = 0 .. final          the last one jumps to sigma 0 and ends sampling
    gradient steps = mid .. final        the reference implementation's window (N=8: 4, 5, 6, 7)
    expert of i    = experts[0] while timesteps[i] >= boundary * 1000, else experts[1]

``min_timestep_boundary``/``max_timestep_boundary`` do not enter: they are DiffSynth-Studio's
supervised-training keys (see ``rewardfl.config.training_timestep_range``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from rewardfl.interfaces import Sampler, StepPlan

__all__ = ["plan_steps", "gradient_steps", "expert_boundary_of"]


def expert_boundary_of(model_cls, config) -> Optional[float]:
    """``model_cls.expert_boundary(config.model, config)``: the boundary of the validated config."""
    return model_cls.expert_boundary(config.model, config)


def gradient_steps(config) -> list[int]:
    """Indices of the steps that carry gradient: ``mid_timestep .. final_timestep``."""
    return list(range(config.mid_timestep, config.final_timestep + 1))


def plan_steps(config, sampler: Sampler, experts: Sequence[str], trainable_experts: Sequence[str],
               boundary: Optional[float]) -> list[StepPlan]:
    """The steps to run, in order; the last has ``last=True`` and ``sigma_next=0``.

    ``experts``: the model's experts from high to low noise (one or two); ``boundary``: the
    fraction of 1000 timesteps where the second takes over (None for one expert). Raises
    ``ValueError`` naming the keys when no gradient step runs a trainable expert.
    """
    experts = tuple(experts)
    if len(experts) not in (1, 2):
        raise ValueError(f"model_name: rewardfl switches between at most 2 experts (high noise, low noise), "
                         f"the model declares {list(experts)}")
    if len(experts) == 2 and boundary is None:
        raise ValueError(f"model_name: a two-expert model must declare the boundary between {list(experts)}")
    final, grad = config.final_timestep, set(gradient_steps(config))
    steps = []
    for i in range(final + 1):
        high = len(experts) == 1 or float(sampler.timesteps[i]) >= boundary * 1000.0
        steps.append(StepPlan(
            index=i,
            timestep=float(sampler.timesteps[i]),
            sigma=float(sampler.sigmas[i]),
            sigma_next=0.0 if i == final else float(sampler.sigmas[i + 1]),
            expert=experts[0] if high else experts[1],
            grad=i in grad,
            last=i == final,
        ))
    if not any(p.grad and p.expert in trainable_experts for p in steps):
        runs = {p.index: p.expert for p in steps if p.grad}
        raise ValueError(
            f"trainable_models: no gradient step runs a trainable expert (trainable: {list(trainable_experts)}); "
            f"gradient steps {list(runs)} (mid_timestep={config.mid_timestep}, final_timestep={final}) run "
            f"{sorted(set(runs.values()))} (model.boundary={boundary}: {experts[0]} while timestep >= "
            f"{(boundary or 0) * 1000:g}); add one of them to trainable_models or move the gradient window")
    return steps
