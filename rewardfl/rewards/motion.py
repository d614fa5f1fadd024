"""The ``motion`` reward: keep the generated motion near the reference clip's motion.

Reward fine-tuning on a per-frame reward (face identity) can collapse a video to a still image:
a still image of the right face scores as well as a moving one. This reward holds the amount of
motion, measured as frame-difference energy, near the reference clip's:

* ``energy(video) = mean |x[f+1] - x[f]|`` over all consecutive frame pairs, channels and pixels,
  with ``x`` the frames in [0, 1] units (the [-1, 1] video halved and shifted), after shrinking the
  frames (area average) so that their shorter side is ``resolution`` pixels (no shrinking when it is
  already that small, or ``resolution: null``). In [0, 1]: 0 for a still video, 1 when every pixel
  flips between black and white every frame. At full resolution it is
  ``rewardfl.evaluation.metrics.motion``.
* ``target = target_scale * energy(reference clip)``, the whole reference clip (no gradient,
  cached per sample); when a composition gives the reward a subset of the generated frames
  (``SampleContext.frames``, e.g. every 2nd), the same frames of the reference (those it has), so
  that both energies are measured over the same frame spacing.
* ``distance: absolute``: ``score = -|energy(generated) - target|``, in [-1, 0], [0, 1] units;
  ``distance: relative``: ``score = -|energy(generated) - target| / target``, in [-inf, 0], a fraction
  of the target. A target below ``min_target`` (1e-3 by default: a still or nearly still reference)
  makes the sample invalid (counted, ``references_without_motion``) rather than divided by: one of the
  demo's training clips measures 3e-7 over its first 9 frames, where the relative score was -3.6e4 and
  the step's gradient norm 1.4e4, one clip's noise outweighing every other term of the reward.

The score is differentiable in the generated video (area shrinking and frame differences are);
an exactly still video has zero gradient (``|d|`` at ``d = 0``), which a decoded video never is.
A reference with fewer than 2 frames has no motion to match: the sample is invalid and counted
(``references_too_short``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from rewardfl.config import ConfigError
from rewardfl.interfaces import Reward, RewardOutput, SampleContext

__all__ = ["MotionReward", "motion_energy"]


def motion_energy(videos: torch.Tensor, resolution: Optional[int] = None) -> torch.Tensor:
    """Frame-difference energy ``(B,)`` of videos ``(B, 3, F, H, W)`` in [-1, 1]: ``mean |x[f+1] - x[f]|``
    with ``x`` in [0, 1] units, after area-shrinking the frames to a shorter side of ``resolution``
    (None: full size). Float32 (float64 for float64 videos), differentiable; needs ``F >= 2``."""
    batch, channels, num_frames, height, width = videos.shape
    x = videos.to(torch.promote_types(videos.dtype, torch.float32))
    if resolution is not None and min(height, width) > resolution:
        scale = resolution / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        frames = x.transpose(1, 2).reshape(batch * num_frames, channels, height, width)
        x = F.interpolate(frames, size=size, mode="area").view(batch, num_frames, channels, *size).transpose(1, 2)
    return (x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(1) / 2.0  # / 2: [-1, 1] differences to [0, 1]


class MotionReward(Reward):
    """Closeness of the generated videos' frame-difference energy to their reference clips' (see the
    module docstring for the formula)."""

    differentiable = True
    reference_specific = False  # only the reference's amount of motion counts: no specificity

    @dataclasses.dataclass
    class Options:
        #: the target is target_scale times the reference clip's energy (> 1: ask for more motion)
        target_scale: float = 1.0
        #: frames are area-shrunk to this shorter side (pixels) before differencing; null: full size
        resolution: Optional[int] = 64
        #: absolute: -|energy - target| ([0, 1] units); relative: -|energy - target| / target
        distance: Literal["absolute", "relative"] = "absolute"
        #: distance: relative only: a target (target_scale x the reference's energy, [0, 1] units) below
        #: this leaves the sample invalid (counted as references_without_motion) instead of dividing by it
        min_target: float = 1.0e-3

        def __post_init__(self):
            if not math.isfinite(self.target_scale) or self.target_scale < 0:
                raise ConfigError(f"reward.target_scale: must be a finite number >= 0, got {self.target_scale}")
            if self.resolution is not None and self.resolution < 1:
                raise ConfigError(f"reward.resolution: must be a positive number of pixels (or null for full "
                                  f"size), got {self.resolution}")
            if self.distance == "relative" and self.target_scale == 0:
                raise ConfigError("reward.target_scale: 0 makes every target 0, which distance: relative cannot "
                                  "divide by; use distance: absolute or a positive target_scale")
            if not math.isfinite(self.min_target) or self.min_target <= 0:
                raise ConfigError(f"reward.min_target: must be a finite number > 0 ([0, 1] units of motion "
                                  f"energy), got {self.min_target}")

    def __init__(self, config=None, options: Optional["MotionReward.Options"] = None, *, device=None, **_runtime):
        self.options = options if options is not None else self.Options()
        #: (sample_id, frames) -> the reference clip's energy (None: fewer than 2 frames)
        self._reference_energy: dict[tuple, Optional[float]] = {}

    def reference_energy(self, context: SampleContext) -> Optional[float]:
        """The energy of the sample's reference clip over the frames ``context.frames`` (all when None;
        cached by ``sample_id`` and frames), None for fewer than 2 frames."""
        key = (context.sample_id, context.frames)
        if key not in self._reference_energy:
            ref = context.reference
            if ref is None:
                raise ValueError(f"motion reward: sample {context.sample_id!r} has no reference video "
                                 "(SampleContext.reference is None)")
            if ref.dim() != 4 or ref.shape[1] != 3:
                raise ValueError(f"motion reward: the reference of sample {context.sample_id!r} must be "
                                 f"(F, 3, H, W), got {tuple(ref.shape)}")
            if context.frames is not None:
                ref = ref[[f for f in context.frames if f < ref.shape[0]]]
            with torch.no_grad():
                energy = (float(motion_energy(ref.transpose(0, 1)[None].detach(), self.options.resolution)[0])
                          if ref.shape[0] >= 2 else None)
            self._reference_energy[key] = energy
        return self._reference_energy[key]

    def _target(self, context: SampleContext) -> Optional[float]:
        energy = self.reference_energy(context)
        if energy is None:
            return None
        target = self.options.target_scale * energy
        return None if self.options.distance == "relative" and target < self.options.min_target else target

    def prepare(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """``(B,)`` bool: False where the reference has fewer than 2 frames (or, for ``distance: relative``,
        a target under ``min_target``)."""
        return torch.tensor([self._target(c) is not None for c in contexts], dtype=torch.bool)

    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        """Scores ``(B,)`` of videos ``(B, 3, F, H, W)`` in [-1, 1], differentiable in ``videos``."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"motion reward: videos must be (B, 3, F, H, W), got {tuple(videos.shape)}")
        if len(contexts) != videos.shape[0]:
            raise ValueError(f"motion reward: {videos.shape[0]} videos but {len(contexts)} contexts")
        if videos.shape[2] < 2:
            raise ValueError(f"motion reward: videos have {videos.shape[2]} frame(s); motion needs data.num_frames "
                             ">= 5 (or drop the motion reward)")
        energies = [self.reference_energy(c) for c in contexts]
        targets = [self._target(c) for c in contexts]
        valid = torch.tensor([t is not None for t in targets], dtype=torch.bool)
        energy = motion_energy(videos, self.options.resolution)
        target = torch.tensor([t if t is not None else 0.0 for t in targets], dtype=energy.dtype,
                              device=energy.device)
        error = (energy - target).abs()
        if self.options.distance == "relative":
            error = error / torch.where(target > 0, target, torch.ones_like(target))
        scores = torch.where(valid.to(energy.device), -error, torch.zeros_like(error))
        counted = valid.to(energy.device)
        n = max(int(valid.sum()), 1)
        metrics = {
            "motion_energy": float(energy.detach().mean().cpu()),
            # over the valid samples (0 when none)
            "motion_target": float(target[counted].sum().cpu()) / n,
            "motion_error": float(error.detach()[counted].sum().cpu()) / n,
            "references_too_short": float(sum(e is None for e in energies)),
            "references_without_motion": float(sum(e is not None and t is None for e, t in zip(energies, targets))),
        }
        return RewardOutput(scores=scores.float(), valid=valid, metrics=metrics)
