"""One Wan DiT forward pass, batched, with per-block gradient checkpointing.

diffsynth 2.1.12's ``WanModel.forward`` is broken (patchify unpacking), and its
``model_fn_wan_video`` cannot offload checkpointed activations (a non-reentrant checkpoint keeps
its inputs alive on the GPU whatever ``save_on_cpu`` says). This is the same computation as
``model_fn_wan_video`` for the plain I2V/TI2V/T2V cases (the tests compare the two) with:

* the timestep embedding computed from fp32 timesteps (a bf16 timestep rounds 972 to 976);
* ``checkpoint="block"``: each transformer block recomputed in backward;
* ``checkpoint="offload"``: as "block", and each block's input parked in CPU memory until its
  backward (``offload.offloaded_checkpoint``; the 14B expert's 40 block inputs at 480x832x81 are
  13 GB per denoising step).
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from .offload import offloaded_checkpoint

__all__ = ["dit_forward"]


def _rope_freqs(dit, f: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(f*h*w, 1, head_dim/2) complex 3-D RoPE factors, as model_fn_wan_video builds them; cached on
    the DiT per grid and device (33 MB at 480x832x81, rebuilt and copied every call otherwise)."""
    cache = dit.__dict__.setdefault("_rewardfl_rope", {})
    key = (f, h, w, str(device))
    if key not in cache:
        cache.clear()  # one grid at a time: a new video size replaces the old entry
        cache[key] = torch.cat([
            dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(f * h * w, 1, -1).to(device)
    return cache[key]


def _sinusoid(freq_dim: int, timestep: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 timesteps in [0, 1000] -> (N, freq_dim) fp32 [cos | sin] embedding (Wan's)."""
    half = freq_dim // 2
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device).div(half))
    arg = torch.outer(timestep.to(torch.float64), inv)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


def dit_forward(
    dit,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    clean_first_frame: bool = False,
    checkpoint: str = "none",
) -> torch.Tensor:
    """Velocity of ``dit`` (diffsynth ``WanModel``).

    ``x`` (B, C, T, h, w) noisy latent; ``timestep`` (B,) float in [0, 1000]; ``context`` (B, L,
    text_dim) prompt embedding; ``y`` (B, C', T, h, w) concatenated to ``x`` on channels (I2V).
    ``clean_first_frame``: TI2V's per-token timestep, 0 on latent frame 0. ``checkpoint``:
    "none", "block" or "offload" (only matters with autograd on). Returns (B, out_dim, T, h, w)
    in the DiT's dtype.
    """
    dtype = dit.patch_embedding.weight.dtype
    B = x.shape[0]
    if context.shape[0] != B or timestep.shape != (B,):
        raise ValueError(f"dit_forward: batch mismatch: x {tuple(x.shape)}, timestep {tuple(timestep.shape)}, "
                         f"context {tuple(context.shape)}")
    if y is not None:
        x = torch.cat([x, y.to(x.dtype)], dim=1)
    x = dit.patch_embedding(x.to(dtype))
    f, h, w = x.shape[2:]
    x = rearrange(x, "b c f h w -> b (f h w) c").contiguous()

    if clean_first_frame:  # TI2V: per-token timesteps, the injected first frame is clean
        tok = timestep.float()[:, None].repeat(1, f * h * w)
        tok[:, : h * w] = 0
        t = dit.time_embedding(_sinusoid(dit.freq_dim, tok.flatten()).to(dtype)).unflatten(0, (B, f * h * w))
        t_mod = dit.time_projection(t).unflatten(2, (6, dit.dim))
    else:
        t = dit.time_embedding(_sinusoid(dit.freq_dim, timestep.float()).to(dtype))
        t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))
    context = dit.text_embedding(context.to(dtype))

    freqs = _rope_freqs(dit, f, h, w, x.device)

    grad = torch.is_grad_enabled()
    for block in dit.blocks:
        if grad and checkpoint == "offload":  # only x (the large input) goes to the host
            x = offloaded_checkpoint(block, x, context, t_mod, freqs, offload=(True, False, False, False))
        elif grad and checkpoint == "block":
            x = torch.utils.checkpoint.checkpoint(block, x, context, t_mod, freqs, use_reentrant=False)
        else:
            x = block(x, context, t_mod, freqs)
    x = dit.head(x, t)
    return dit.unpatchify(x, (f, h, w))
