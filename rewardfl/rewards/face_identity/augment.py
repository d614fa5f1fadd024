"""Expectation over random transformations of the aligned face (the face reward's ``augment_*`` options).

A gradient through one recognizer is close to an adversarial perturbation: it raises that
recognizer's score on exactly the crop it sees and little else. Averaging the score over random
small transformations of the crop (expectation over transformation) makes a perturbation that only
fools the recognizer at one alignment stop paying, and leaves what every view agrees on: the face.

Each view of a face:

1. **geometry**, applied to the 5 landmarks before alignment (so the crop moves through the same
   differentiable ``face_align`` warp): a similarity about the landmarks' centroid with scale
   ``U(1 - scale, 1 + scale)``, rotation ``U(-rotation, rotation)`` degrees and a shift of
   ``U(-shift, shift)`` face sizes per axis, plus independent jitter of ``U(-jitter, jitter)`` face sizes
   per landmark coordinate. The face size is the root mean square distance of the landmarks to their
   centroid (about a third of the eye-to-mouth span);
2. **blur**: a Gaussian blur of the aligned crop with sigma ``U(0, blur)`` crop pixels (separable,
   reflect padding; sigma below 0.05 px is no blur);
3. **colour**: on the 0..255 pixel scale, per crop, contrast ``U(1 - color, 1 + color)`` about the
   crop's mean, a brightness shift of ``U(-color, color) * 255``, and per-channel gains
   ``U(1 - color / 2, 1 + color / 2)``.

The reward then uses, for each face, the mean of its views' normalised embeddings: a dot product
with a reference embedding is then exactly the mean over the views of their cosine similarities
(the expected score), which is what is differentiated. The draws come from a generator seeded by the
run's seed and the reward's call count (kept in training checkpoints), so a resumed run draws the
same views. Views apply only where the score carries gradient (training); evaluation and judges
score the plain crop.

Cost: ``views`` times the recognizer's forward and backward per face (the detector runs once).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["AugmentOptions", "transform_landmarks", "gaussian_blur", "color_jitter", "draw_views"]


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The ranges of one view's random transformation (see the module docstring)."""

    views: int = 0
    scale: float = 0.05
    rotation: float = 5.0
    shift: float = 0.05
    jitter: float = 0.02
    blur: float = 1.0
    color: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.views > 0


@dataclasses.dataclass
class Views:
    """The draws of ``V`` views of ``N`` faces (all ``(V * N, ...)``, view-major)."""

    scale: torch.Tensor  # (V*N,)
    angle: torch.Tensor  # (V*N,) radians
    shift: torch.Tensor  # (V*N, 2) face sizes
    jitter: torch.Tensor  # (V*N, 5, 2) face sizes
    sigma: torch.Tensor  # (V*N,) crop pixels
    contrast: torch.Tensor  # (V*N,)
    brightness: torch.Tensor  # (V*N,) on the 0..255 scale
    gain: torch.Tensor  # (V*N, 3)


def _uniform(generator: torch.Generator, shape, half_width: float) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * half_width


def draw_views(options: AugmentOptions, num_faces: int, generator: torch.Generator) -> Views:
    """The random parameters of ``options.views`` views of ``num_faces`` faces (float64, CPU)."""
    n = options.views * num_faces
    return Views(
        scale=1 + _uniform(generator, (n,), options.scale),
        angle=_uniform(generator, (n,), math.radians(options.rotation)),
        shift=_uniform(generator, (n, 2), options.shift),
        jitter=_uniform(generator, (n, 5, 2), options.jitter),
        sigma=torch.rand(n, generator=generator, dtype=torch.float64) * options.blur,
        contrast=1 + _uniform(generator, (n,), options.color),
        brightness=_uniform(generator, (n,), options.color) * 255.0,
        gain=1 + _uniform(generator, (n, 3), options.color / 2),
    )


def transform_landmarks(landmarks: torch.Tensor, views: Views) -> torch.Tensor:
    """Landmarks ``(V*N, 5, 2)`` (pixels) moved by each view's similarity and jitter (see module)."""
    lm = landmarks.to(torch.float64)
    device = lm.device
    centre = lm.mean(1, keepdim=True)
    size = (lm - centre).pow(2).sum(-1).mean(1).sqrt().view(-1, 1, 1)  # RMS distance to the centroid
    angle, scale = views.angle.to(device), views.scale.to(device)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (V*N, 2, 2)
    moved = centre + scale.view(-1, 1, 1) * (lm - centre) @ rot.transpose(1, 2)
    offset = views.shift.to(device)[:, None, :] + views.jitter.to(device)
    return (moved + size * offset).to(landmarks.dtype)


def gaussian_blur(crops: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each crop ``(M, C, S, S)`` blurred with its own sigma ``(M,)`` (pixels; < 0.05: unchanged),
    separable, reflect padding; differentiable in ``crops``."""
    m, c, h, w = crops.shape
    sigma = sigma.to(torch.float64).clamp(min=0)
    radius = int(math.ceil(3 * float(sigma.max()))) if m else 0
    if radius == 0:
        return crops
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    safe = sigma.clamp(min=0.05).view(-1, 1)
    kernel = torch.exp(-0.5 * (x / safe) ** 2)
    delta = (x == 0).to(torch.float64).expand_as(kernel)
    kernel = torch.where(sigma.view(-1, 1) < 0.05, delta, kernel)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(crops.dtype).to(crops.device)  # (M, k)
    weight = kernel.repeat_interleave(c, 0)  # (M*C, k): one kernel per crop and channel
    flat = crops.reshape(1, m * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight.view(m * c, 1, 1, -1), groups=m * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight.view(m * c, 1, -1, 1), groups=m * c)
    return flat.view(m, c, h, w)


def color_jitter(crops: torch.Tensor, views: Views, mean: float, std: float) -> torch.Tensor:
    """Contrast, brightness and channel gains (see module) of normalised crops ``(M, 3, S, S)``
    (``(p - mean) / std`` of 0..255 pixels ``p``); returns normalised crops."""
    dtype, device = crops.dtype, crops.device
    pixels = crops * std + mean
    centre = pixels.mean(dim=(1, 2, 3), keepdim=True)
    contrast = views.contrast.to(dtype).to(device).view(-1, 1, 1, 1)
    brightness = views.brightness.to(dtype).to(device).view(-1, 1, 1, 1)
    gain = views.gain.to(dtype).to(device).view(-1, 3, 1, 1)
    pixels = ((pixels - centre) * contrast + centre + brightness) * gain
    return (pixels - mean) / std
