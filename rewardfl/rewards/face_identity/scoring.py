"""Identity scores from face embeddings: the training reward, identity consistency across frames, and
the FaceSim-Arc metric.

All embeddings are L2-normalised, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pooled_identity_score", "identity_consistency_score", "facesim_arc", "consisid_frame_indices",
           "facesim_consisid", "shaped_reward_loss"]


def pooled_identity_score(face_embeddings: torch.Tensor, face_sample: torch.Tensor, face_frame: torch.Tensor,
                          reference_mean: torch.Tensor,
                          num_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROLL's pooled identity score per sample, with masks (docs/design.md section 3).

    For each generated frame with a face: the mean cosine similarity to every reference frame
    with a face, i.e. ``e . mean_r(e_r)`` with ``reference_mean`` the mean of the reference's
    normalised embeddings; then the mean over the generated frames with a face. Frames with
    several faces (``face_select: all``) count once, with the mean over their faces.

    Args:
        face_embeddings: ``(K, D)`` normalised embeddings of the faces that count.
        face_sample, face_frame: ``(K,)`` int64 sample (0..B-1) and frame (0..F-1) of each face.
        reference_mean: ``(B, D)`` mean of each sample's normalised reference embeddings.
        num_frames: F.

    Returns:
        scores ``(B,)`` float32, or float64 for float64 inputs (0 where no frame has a face; differentiable),
        has_face ``(B,)`` bool, frame_similarity ``(B, F)`` float32 (NaN where no face).
    """
    batch = reference_mean.shape[0]
    dtype = torch.promote_types(torch.promote_types(face_embeddings.dtype, reference_mean.dtype), torch.float32)
    sims = (face_embeddings.to(dtype) * reference_mean.to(dtype)[face_sample]).sum(-1)  # (K,)
    slot = face_sample * num_frames + face_frame
    total = sims.new_zeros(batch * num_frames).index_add(0, slot, sims)
    count = sims.new_zeros(batch * num_frames).index_add(0, slot, torch.ones_like(sims))
    frame_sim = (total / count.clamp(min=1)).view(batch, num_frames)
    frame_has = (count > 0).view(batch, num_frames)
    frames_per_sample = frame_has.sum(1)
    scores = torch.where(frame_has, frame_sim, torch.zeros_like(frame_sim)).sum(1) / frames_per_sample.clamp(min=1)
    frame_sim = torch.where(frame_has, frame_sim.detach(), torch.full_like(frame_sim, float("nan")))
    return scores, frames_per_sample > 0, frame_sim


def identity_consistency_score(face_embeddings: torch.Tensor, face_sample: torch.Tensor, reference_mean: torch.Tensor,
                               *, spread_weight: float, reference_weight: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How steady a video's identity is across its frames (higher is steadier), per sample.

    With ``e_f`` the normalised embeddings of the sample's ``n`` scored frames (one face each),
    ``m = mean_f e_f`` and ``r`` its reference's mean embedding:

    * ``spread = mean_f (1 - cos(e_f, m)) = 1 - |m|``, in [0, 1] (cosine distance units): 0 when
      every frame has the same embedding, growing as the frames' faces drift apart;
    * ``reference_std = std_f cos(e_f, r)`` (population std), in [0, 1]: how much the frames'
      likeness to the reference flickers (its mean is ``face_identity``'s business);
    * ``score = -(spread_weight * spread + reference_weight * reference_std)``, in
      ``[-(spread_weight + reference_weight), 0]``.

    Args:
        face_embeddings: ``(K, D)`` normalised embeddings, at most one per (sample, frame).
        face_sample: ``(K,)`` int64 sample (0..B-1) of each face.
        reference_mean: ``(B, D)`` mean of each sample's normalised reference embeddings (not unit).

    Returns:
        scores ``(B,)`` (float32, or float64 for float64 inputs; 0 where fewer than 2 frames count;
        differentiable), frames ``(B,)`` int64 scored frames, spread ``(B,)`` and reference_std ``(B,)``
        (detached; 0 where fewer than 2 frames count). The caller masks samples with ``frames < 2``.
    """
    batch, dim = reference_mean.shape
    dtype = torch.promote_types(torch.promote_types(face_embeddings.dtype, reference_mean.dtype), torch.float32)
    e = face_embeddings.to(dtype)
    count = e.new_zeros(batch).index_add(0, face_sample, torch.ones_like(e[:, 0]))
    per = count.clamp(min=1)
    mean = e.new_zeros(batch, dim).index_add(0, face_sample, e) / per[:, None]
    spread = 1.0 - _root((mean * mean).sum(-1))
    ref = torch.nn.functional.normalize(reference_mean.to(dtype), dim=1)
    cos = (e * ref[face_sample]).sum(-1)  # (K,)
    cos_mean = e.new_zeros(batch).index_add(0, face_sample, cos) / per
    var = e.new_zeros(batch).index_add(0, face_sample, (cos - cos_mean[face_sample]) ** 2) / per
    reference_std = _root(var)
    enough = count >= 2
    zero = torch.zeros_like(spread)
    scores = torch.where(enough, -(spread_weight * spread + reference_weight * reference_std), zero)
    return (scores, count.long(), torch.where(enough, spread, zero).detach(),
            torch.where(enough, reference_std, zero).detach())


def _root(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at ``x == 0`` is 0, not NaN (a still video has zero spread)."""
    return torch.where(x > 0, x.clamp(min=1e-30).sqrt(), torch.zeros_like(x))


def facesim_arc(embeddings: torch.Tensor, has_face: torch.Tensor, reference: torch.Tensor,
                num_frames: int = 16) -> torch.Tensor:
    """FaceSim-Arc of one video: ``num_frames`` uniformly spaced frames, each frame's cosine to
    every reference face clamped at 0, averaged over the sampled frames that have a face.

    ``embeddings`` ``(F, D)`` per frame (rows without a face ignored), ``has_face`` ``(F,)``,
    ``reference`` ``(R, D)`` the reference faces. 0-dim float32; NaN when no sampled frame
    has a face or the reference is empty.
    """
    f = embeddings.shape[0]
    idx = torch.linspace(0, f - 1, min(num_frames, f), device=embeddings.device).round().long().unique()
    keep = idx[has_face[idx]]
    if keep.numel() == 0 or reference.shape[0] == 0:
        return torch.tensor(float("nan"))
    cos = embeddings[keep].float() @ reference.float().T
    return cos.clamp(min=0).mean()


def consisid_frame_indices(num_frames: int, samples: int = 16) -> torch.Tensor:
    """``(samples,)`` int64: the frames ConsisID's evaluation reads from a video of ``num_frames``
    (``np.linspace(0, F - 1, samples, dtype=int)``: truncated, repeated when the video is shorter)."""
    return torch.linspace(0, num_frames - 1, samples, dtype=torch.float64).long()


def facesim_consisid(embeddings: torch.Tensor, has_face: torch.Tensor, reference: torch.Tensor,
                     samples: int = 16) -> torch.Tensor:
    """FaceSim (Arc or Cur, by the recognizer that made the embeddings) of one video as ConsisID's
    evaluation computes it (``eval/get_facesim_fid.py``, ``process_video``): the frames of
    :func:`consisid_frame_indices`, each with a face scored ``max(0, cos(reference, frame))``, the
    mean over those; 0 when none has a face.

    ``embeddings`` ``(F, D)`` the largest face per frame, ``has_face`` ``(F,)``, ``reference``
    ``(D,)`` the reference image's face. 0-dim float32.
    """
    idx = consisid_frame_indices(embeddings.shape[0], samples).to(has_face.device)
    idx = idx[has_face[idx]]
    if idx.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    e = F.normalize(embeddings[idx].float(), dim=-1)
    r = F.normalize(reference.float(), dim=-1)
    return (e @ r).clamp(min=0).mean()


def shaped_reward_loss(scores: torch.Tensor, valid: torch.Tensor, *, mean: float, std: float,
                       scale: float) -> torch.Tensor:
    """``-(score - mean) / std * scale`` averaged over the valid samples; a zero that keeps
    the graph (zero gradient) when none is valid."""
    valid = valid.to(scores.device)
    shaped = -(scores.float() - mean) / std * scale
    if not bool(valid.any()):
        return scores.sum() * 0.0
    return shaped[valid].mean()
