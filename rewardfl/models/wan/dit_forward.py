"""One Wan DiT forward pass, batched, with per-block gradient checkpointing.

diffsynth 2.1.12's ``WanModel.forward`` is broken (patchify unpacking), and its
``model_fn_wan_video`` cannot offload checkpointed activations (a non-reentrant checkpoint keeps
its inputs alive on the GPU whatever ``save_on_cpu`` says). This is the same computation as
``model_fn_wan_video`` for the plain I2V/TI2V/T2V cases (the tests compare the two) with:

* the timestep embedding computed from fp32 timesteps (a bf16 timestep rounds 972 to 976), and
  the sinusoid, ``time_embedding`` and ``time_projection`` computed in fp32 whatever the model
  dtype, as official Wan does under ``autocast(float32)``; only their outputs are rounded to the
  model dtype (``use_fp32_time_embedding``, ``embed_timesteps``);
* TI2V's per-token timesteps embedded once per distinct value (two per sample), not per token;
* ``checkpoint="block"``: each transformer block recomputed in backward;
* ``checkpoint="offload"``: as "block", and each block's input parked in CPU memory until its
  backward (``offload.offloaded_checkpoint``; the 14B expert's 40 block inputs at 480x832x81 are
  13 GB per denoising step).
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from .attention import ensure_attention_backward
from .offload import offloaded_checkpoint

__all__ = ["dit_forward", "embed_timesteps", "use_fp32_time_embedding", "Float32Linear"]


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
    """(N,) timesteps in [0, 1000] -> (N, freq_dim) float64 [cos | sin] embedding (Wan's)."""
    half = freq_dim // 2
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device).div(half))
    arg = torch.outer(timestep.to(torch.float64), inv)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class Float32Linear(torch.nn.Linear):
    """``nn.Linear`` that computes in fp32 (fp64 for fp64 weights) whatever its weights' dtype.

    Input, weight and bias are upcast for the matmul; the output is fp32. Same parameters and
    state-dict keys as ``nn.Linear``, stored in whatever dtype the model uses (so DeepSpeed's bf16
    cast, checkpoints and ZeRO-3's per-module gathering see an ordinary Linear); the gradient
    reaches the stored weights through the cast. The upcast weight is a transient copy (0.6 GB
    for A14B's ``time_projection``, 5120 x 30720), kept for backward only when the layer trains.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias)


def use_fp32_time_embedding(dit) -> None:
    """Make the Linear layers of ``dit.time_embedding`` and ``dit.time_projection`` compute in fp32.

    In place and idempotent; weights and their dtype are untouched (the layers' class becomes
    :class:`Float32Linear`, which holds no extra state). Official Wan runs these layers under
    ``autocast(float32)``; in bf16 they would round the sinusoid to 8 significant bits and every
    product after it, and their outputs scale, shift and gate every block. Call it before LoRA
    injection, deep copies and DeepSpeed (they then keep the class).
    """
    for seq in (dit.time_embedding, dit.time_projection):
        for m in seq.modules():
            if type(m) is torch.nn.Linear:
                m.__class__ = Float32Linear


def embed_timesteps(dit, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) timesteps in [0, 1000] -> ``t`` (N, dim) and ``t_mod`` (N, 6, dim) in ``dtype``.

    The sinusoid is computed in float64 and fed as fp32 (float64 for a float64 model); with
    ``use_fp32_time_embedding`` applied (or fp32 weights) both MLPs run in fp32 and only their
    outputs are rounded to ``dtype``.
    """
    t = dit.time_embedding(_sinusoid(dit.freq_dim, timestep).to(torch.promote_types(dtype, torch.float32)))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))
    return t.to(dtype), t_mod.to(dtype)


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
    in the DiT's dtype. A bf16 ``dit`` needs ``use_fp32_time_embedding`` applied first (the
    ``wan2_2`` model does it at load); without it the fp32 sinusoid meets bf16 weights and the
    matmul raises a dtype error rather than silently computing in bf16.
    """
    if torch.is_grad_enabled():  # a forward-only attention kernel would cut the reward's gradient
        ensure_attention_backward()
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

    if clean_first_frame:  # TI2V: per-token timesteps, 0 on the injected (clean) first frame
        # two distinct values per sample: embed (0, t) once and index them per token, instead of
        # running both MLPs over every token (an fp32 (B, L, 6, dim) is 2 GB for the 5B at 1280x704x121)
        rows = torch.stack([torch.zeros_like(timestep), timestep], dim=1)
        t2, t_mod2 = embed_timesteps(dit, rows.flatten(), dtype)  # (2B, dim), (2B, 6, dim)
        which = torch.ones(f * h * w, dtype=torch.long, device=x.device)
        which[: h * w] = 0
        idx = torch.arange(B, device=x.device)[:, None] * 2 + which  # (B, L) rows of t2
        t, t_mod = t2[idx], t_mod2[idx]  # (B, L, dim), (B, L, 6, dim)
    else:
        t, t_mod = embed_timesteps(dit, timestep, dtype)
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
