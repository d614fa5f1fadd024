"""The ``identity_consistency`` reward: does the face stay the same person from frame to frame?

``face_identity`` rewards likeness to the reference on average; a video can score well there
while its face drifts or flickers between frames. This reward penalises that spread
(:func:`identity_consistency_score`): per sample, the mean cosine distance of each scored
frame's embedding to the video's own mean embedding, plus the standard deviation over frames of
the cosine to the reference's mean embedding.

It runs the same pipeline as ``face_identity`` (:class:`FaceReward`: detection without gradient,
face choice, ``face_align``, the recognizer's torch twin) and shares its detections and
embeddings through the step cache, so the two together cost one detection and one embedding
pass. A sample needs at least 2 scored frames (and a reference with a face); otherwise it is
invalid for this reward only (``samples_under_2_face_frames``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import RewardOutput, SampleContext

from .reward import FaceModelOptions, FaceReward
from .scoring import identity_consistency_score

__all__ = ["IdentityConsistencyReward"]


class IdentityConsistencyReward(FaceReward):
    """Identity spread across the frames of each generated video (higher = steadier), on the face
    models of ``reward_model_path``; the model, detection and face options are ``face_identity``'s."""

    plugin_name = "identity_consistency"

    @dataclasses.dataclass
    class Options(FaceModelOptions):
        #: weight of the spread around the video's own mean embedding (mean cosine distance, [0, 1])
        spread_weight: float = 1.0
        #: weight of the std over frames of the cosine to the reference's mean embedding ([0, 1])
        reference_weight: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            if self.face_select == "all":
                raise ConfigError("reward.face_select: identity_consistency needs one face per frame: set it to "
                                  "largest or most_similar, not all")
            for key in ("spread_weight", "reference_weight"):
                value = getattr(self, key)
                if not math.isfinite(value) or value < 0:
                    raise ConfigError(f"reward.{key}: must be a finite number >= 0, got {value}")
            if self.spread_weight == 0 and self.reference_weight == 0:
                raise ConfigError("reward.spread_weight/reward.reference_weight: both are 0, the reward would be "
                                  "constant; give one of them a positive weight")

    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        """Scores ``(B,)`` in ``[-(spread_weight + reference_weight), 0]`` of videos ``(B, 3, F, H, W)`` in
        [-1, 1], differentiable in ``videos``; invalid where fewer than 2 frames have a scored face."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"identity_consistency reward: videos must be (B, 3, F, H, W), got {tuple(videos.shape)}")
        if len(contexts) != videos.shape[0]:
            raise ValueError(f"identity_consistency reward: {videos.shape[0]} videos but {len(contexts)} contexts")
        o = self.options
        num_frames = videos.shape[2]
        refs, ref_mean, ref_valid = self.reference_means(contexts, videos.device)
        faces = self.generated_faces(videos, refs, ref_mean, self.source_frames(contexts, num_frames))
        scores, frames, spread, reference_std = identity_consistency_score(
            faces.embeddings, faces.index // num_frames, ref_mean, spread_weight=o.spread_weight,
            reference_weight=o.reference_weight)
        if torch.is_grad_enabled() and videos.requires_grad and faces.index.numel() == 0:
            scores = scores + videos.flatten(1)[:, 0].float() * 0.0  # keep the graph: the loss backpropagates zeros
        enough = frames.cpu() >= 2
        valid = enough & ref_valid
        scored = valid.to(spread.device)
        metrics = {
            "face_frames": float(frames.sum().cpu()),
            "samples_under_2_face_frames": float((~enough).sum()),
            "references_without_face": float((~ref_valid).sum()),
            "fallback_frames": float(faces.fallback.sum().cpu()),
            "degenerate_faces": float(faces.degenerate.cpu()),
            # means over the valid samples (0 when none)
            "identity_spread": float(spread[scored].sum().cpu()) / max(int(valid.sum()), 1),
            "reference_similarity_std": float(reference_std[scored].sum().cpu()) / max(int(valid.sum()), 1),
        }
        return RewardOutput(scores=scores.float(), valid=valid, metrics=metrics)
