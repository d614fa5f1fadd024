"""Wan VAE decode *with gradient*: time-chunked, checkpointed, optionally spatially tiled.

The Wan2.1 VAE decodes one latent frame at a time, carrying a cache of the last input frames of
every causal convolution. Here each latent frame's decoder step is one checkpoint (its
activations are recomputed in backward; only the carried cache and the output stay).

The decoded pixels are clamped to [-1, 1] out of place (``clamp_decoded``), with a choice of
derivative. The default, ``"straight_through"``, clamps the values and passes the gradient
unchanged (derivative 1 everywhere): the VAE overshoots [-1, 1] on bright and dark regions, and
with the true derivative (``"hard"``, 0 outside [-1, 1]; the reference implementation's in-place
``clamp_`` did the same) the reward sends no signal through any saturated pixel, so a blown-out
face cannot be pulled back by the reward that sees it. The price is a biased gradient: at a pixel
beyond the range it also asks for changes that would not change the clamped image (pushing a pixel
at 1.3 further up), which only the KL term to the base model's velocity resists.
"""

from __future__ import annotations

import typing
from typing import Literal, Optional

import torch

from .offload import offloaded_checkpoint

__all__ = ["decode_latents", "encode_video", "straight_through_clamp", "clamp_decoded", "DecodeClamp"]

#: how ``clamp_decoded`` clamps (the type of the ``wan2_2`` option ``decode_clamp``)
DecodeClamp = Literal["straight_through", "hard", "none"]


def straight_through_clamp(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """``clamp(x, lo, hi)`` in value, identity in gradient."""
    return x + (x.clamp(lo, hi) - x).detach()


def clamp_decoded(video: torch.Tensor, clamp: DecodeClamp) -> torch.Tensor:
    """Decoded pixels (any shape, nominally [-1, 1]) clamped to [-1, 1], out of place.

    ``clamp``: ``"straight_through"``: values clamped, gradient passed unchanged (d/dx = 1
    everywhere); ``"hard"``: ``torch.clamp``, the true derivative (1 inside [-1, 1], 0 outside;
    torch takes 1 at exactly +-1); ``"none"``: ``video`` unchanged. See the module docstring for
    why straight-through is the default.
    """
    if clamp == "straight_through":
        return straight_through_clamp(video)
    if clamp == "hard":
        return video.clamp(-1.0, 1.0)
    if clamp == "none":
        return video
    raise ValueError(f"decode_clamp: must be one of {', '.join(typing.get_args(DecodeClamp))}, got {clamp!r}")


def _decoder_step(decoder, first_chunk, x_t, *cache):
    # a fresh list: the checkpoint re-runs this with the same inputs in backward
    feat = list(cache)
    extra = {"first_chunk": True} if first_chunk else {}
    out, feat, _ = decoder(x_t, feat_cache=feat, feat_idx=[0], **extra)
    return (out, *feat)


def _decode_tile(vae_model, z: torch.Tensor, checkpoint) -> torch.Tensor:
    """(B, z_dim, T, h, w) unscaled latent -> (B, 3, 4T-3, H, W) for ``VideoVAE_`` / ``VideoVAE38_``."""
    from diffsynth.models.wan_video_vae import VideoVAE38_, count_conv3d, unpatchify

    is38 = isinstance(vae_model, VideoVAE38_)  # Wan2.2 VAE: first chunk flagged, 2x2 pixel unpatchify
    x = vae_model.conv2(z)
    cache = [None] * count_conv3d(vae_model.decoder)
    outs = []
    grad = torch.is_grad_enabled()
    for t in range(x.shape[2]):
        x_t = x[:, :, t:t + 1]
        first = is38 and t == 0
        if checkpoint == "offload" and grad:  # the carried caches wait in host memory
            out, *cache = offloaded_checkpoint(_decoder_step, vae_model.decoder, first, x_t, *cache,
                                               offload=(False, False, False) + (True,) * len(cache))
        elif checkpoint and grad:
            out, *cache = torch.utils.checkpoint.checkpoint(_decoder_step, vae_model.decoder, first, x_t, *cache,
                                                            use_reentrant=False)
        else:
            out, *cache = _decoder_step(vae_model.decoder, first, x_t, *cache)
        outs.append(out)
    out = torch.cat(outs, dim=2)
    return unpatchify(out, patch_size=2) if is38 else out


def _blend_mask(n: int, lo_edge: bool, hi_edge: bool, ramp: int, device, dtype) -> torch.Tensor:
    m = torch.ones(n, device=device, dtype=dtype)
    if ramp > 0:
        r = (torch.arange(ramp, device=device, dtype=dtype) + 1) / ramp
        if not lo_edge:
            m[:ramp] = r
        if not hi_edge:
            m[-ramp:] = r.flip(0)
    return m


def decode_latents(
    vae,
    latents: torch.Tensor,
    *,
    checkpoint=True,
    tile: Optional[tuple[int, int]] = None,
    tile_stride: Optional[tuple[int, int]] = None,
    clamp: DecodeClamp = "straight_through",
) -> torch.Tensor:
    """Videos (B, 3, F, H, W) in [-1, 1] from normalised latents (B, z_dim, T, h, w), differentiable.

    ``vae`` is diffsynth's ``WanVideoVAE``. ``checkpoint``: False, True (per latent frame) or
    "offload" (per latent frame, the carried caches kept in host memory until backward). ``tile``/``tile_stride`` (latent pixels) split the
    frame into overlapping tiles blended linearly, as diffsynth's tiled decode does, but without
    in-place clamping or a CPU round trip. ``clamp``: "straight_through", "hard" or "none" (see
    ``clamp_decoded``). Returns fp32.
    """
    model = vae.model
    mean = vae.mean.to(latents.device, latents.dtype).view(1, -1, 1, 1, 1)
    std = vae.std.to(latents.device, latents.dtype).view(1, -1, 1, 1, 1)
    dtype = model.conv2.weight.dtype
    z = (latents * std + mean).to(dtype)
    H, W = z.shape[3:]
    if tile is None or (tile[0] >= H and tile[1] >= W):
        video = _decode_tile(model, z, checkpoint)
    else:
        th, tw = min(tile[0], H), min(tile[1], W)
        sh, sw = tile_stride or (max(1, th // 2), max(1, tw // 2))
        f = vae.upsampling_factor
        rows = sorted({min(r, H - th) for r in range(0, H, sh)})
        cols = sorted({min(c, W - tw) for c in range(0, W, sw)})
        video = None
        weight = torch.zeros(1, 1, 1, H * f, W * f, device=z.device, dtype=torch.float32)
        for r in rows:
            for c in cols:
                out = _decode_tile(model, z[:, :, :, r:r + th, c:c + tw], checkpoint).float()
                mh = _blend_mask(th * f, r == 0, r + th >= H, (th - sh) * f, z.device, torch.float32)
                mw = _blend_mask(tw * f, c == 0, c + tw >= W, (tw - sw) * f, z.device, torch.float32)
                mask = (mh[:, None] * mw[None, :]).view(1, 1, 1, th * f, tw * f)
                if video is None:
                    video = torch.zeros(out.shape[:3] + (H * f, W * f), device=z.device, dtype=torch.float32)
                sl = (slice(None), slice(None), slice(None), slice(r * f, (r + th) * f), slice(c * f, (c + tw) * f))
                video = _add_slice(video, sl, out * mask)
                weight = _add_slice(weight, sl, mask)
        video = video / weight
    return clamp_decoded(video.float(), clamp)


def _add_slice(base: torch.Tensor, sl, value: torch.Tensor) -> torch.Tensor:
    """``base`` with ``value`` added on ``sl``, out of place (autograd-safe)."""
    pad = []
    for dim in reversed(range(base.dim())):
        s = sl[dim]
        if s.start is None:
            pad += [0, 0]
        else:
            pad += [s.start, base.shape[dim] - s.stop]
    return base + torch.nn.functional.pad(value, pad)


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, z_dim, T, h, w) of videos (B, 3, F, H, W) in [-1, 1] (no gradient)."""
    dtype = vae.model.conv1.weight.dtype
    return vae.model.encode(video.to(dtype), vae.scale).float()
