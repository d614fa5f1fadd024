"""Warm-start the tiny Wan twin on a dataset: a short pre-training of its DiTs.

A randomly initialised tiny DiT samples blocky noise: no face for the reward to score, so reward
feedback learning has nothing to improve. The demo's objective (``objective="rollout"``, the
default) trains both experts together through the demo sampler's whole few-step rollout, with an
L2 loss from its output to the clip's latents (a regression through the sampler, as few-step
distillation does)::

    x_T = n ~ N(0, 1);  x_{i+1} = x_i + (s_{i+1} - s_i) v_expert(i)(x_i, t_i, prompt, first frame)
    loss = mean((x_N - x0)^2),   x0 = VAE latent of the clip

Before training, attention heads of each DiT's first block are set by hand
(:func:`same_position_attention_`) to look at the same place one (and two) latent frames back: the first
frame enters an I2V DiT only at latent frame 0, and a tiny random DiT does not learn to carry it
forward in a few hundred steps (its later frames stay grey). With the heads, the base model turns
noise + the conditioning frame into a blurry video of that person, also for people the warm start
never saw (a strict YuNet finds a face in most generated frames of the demo's held-out clips), and
reward feedback learning starts from a model that makes faces, as it does with the real Wan2.2.
The heads are demo scaffolding for this twin's layout, not something rewardfl does to real models.
``objective="flow_matching"`` is the plain per-expert objective
(``x_s = (1 - s) x0 + s n``, ``loss = mean((v(x_s) - (n - x0))^2)``).

The warm-started DiTs replace the twin's ``dit_*.safetensors`` files. The result is deterministic
(fixed seeds, on a given machine) and cached: ``warm_start.json`` records the settings, the
dataset build and the written files' sha256; a second call with the same settings does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Optional

import torch

from rewardfl.archives import file_sha256
from rewardfl.config import config_from_dict
from rewardfl.data import VideoDataset, collate
from rewardfl.fileio import stamp_matches, write_safetensors, write_stamp
from rewardfl.models.wan import model as wan_model
from rewardfl.models.wan.vae_decode import encode_video
from rewardfl.samplers.flow_match_euler import shifted_sigmas

__all__ = ["WarmStart", "warm_start", "flow_matching_loss", "rollout_loss", "same_position_attention_",
           "sampler_timesteps"]

FORMAT_VERSION = 2
_DIT_FILES = {"dit": "dit_high_noise.safetensors", "dit2": "dit_low_noise.safetensors"}


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """What the warm start trains on: clip size, the experts' timesteps and the optimiser."""

    height: int
    width: int
    num_frames: int
    #: expert -> timesteps in [0, 1000] it is trained at (e.g. from :func:`sampler_timesteps`)
    timesteps: dict
    iterations: int = 300  # rollout: steps of both experts together; flow_matching: per expert
    learning_rate: float = 3e-3  # AdamW, cosine decay to 0
    seed: int = 0
    #: "rollout": regress the sampler's output (all timesteps, both experts, gradient through every
    #: step) onto the clip latents; "flow_matching": the plain per-expert objective
    objective: str = "rollout"
    #: clips per step (0: every clip; the rollout default 4 of 8: twice the steps at the same cost)
    batch_size: int = 4
    #: hand-set one attention head of the first block to copy the previous latent frame
    #: (:func:`same_position_attention_`) before training
    copy_head: bool = True
    #: with ``copy_head``: heads 0 .. n-1 of the first block look 1 .. n latent frames back (2 lets
    #: both later latent frames of a 9-frame clip see the first frame directly)
    copy_frames: int = 1


def sampler_timesteps(num_steps: int, shift: float, boundary: float) -> dict[str, list[float]]:
    """Expert -> the timesteps a ``flow_match_euler`` sampler with these options runs it at."""
    out: dict[str, list[float]] = {"dit": [], "dit2": []}
    for s in shifted_sigmas(num_steps, shift)[:-1].tolist():
        out["dit" if 1000.0 * s >= boundary * 1000.0 else "dit2"].append(1000.0 * s)
    return {k: v for k, v in out.items() if v}


def flow_matching_loss(model, expert: str, x0: torch.Tensor, cond, timesteps: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """``mean((v - (noise - x0))^2)`` at ``x_s = (1 - s) x0 + s noise``, ``s = timesteps / 1000``.

    ``x0``, ``noise`` ``(B, z, T, h, w)`` normalised latents; ``timesteps`` ``(B,)`` in [0, 1000].
    """
    s = (timesteps / 1000.0).view(-1, 1, 1, 1, 1).to(x0.dtype)
    x_s = (1 - s) * x0 + s * noise
    v = model.denoise(expert, x_s, timesteps, cond)
    return (v.float() - (noise - x0).float()).pow(2).mean()


def same_position_attention_(dit, *, head: int = 0, frames_back: int = 1, sharpness: float = 4.5,
                             spatial: float = 10.0, temporal: float = 20.0) -> None:
    """Set ``head`` of ``dit.blocks[0]``'s self-attention to look ``frames_back`` latent frames back, same place.

    The first frame enters the I2V DiT only at latent frame 0's tokens (``y``); a randomly
    initialised tiny DiT takes thousands of steps to learn to carry it to the later frames (its
    generations stay grey mush). Here q and k of the head are the same constant in the real parts of
    the fastest RoPE pairs of the h and w axes (score ~ sum cos(w dh) + cos(w dw): peaked at the same
    position) and in the fastest temporal pair with q rotated by ``-frames_back`` rad (score ~
    cos(dt - frames_back): peaked ``frames_back`` frames back; a frame with fewer frames before it
    looks at the earliest, frame 0 at itself). About 0.98 of each token's attention then falls on
    that one token; values and everything else stay random and are trained. Heads 0 and 1 looking
    1 and 2 frames back give latent frames 1 and 2 each a direct view of frame 0 in one block. The
    temporal pair is periodic (2 pi frames): with ``frames_back`` 2 the rule holds for up to 3 latent
    frames (9-frame clips); at 4, frame 0 would look 3 frames ahead.
    """
    attn = dit.blocks[0].self_attn
    hd = attn.head_dim
    if not 0 <= head < attn.num_heads:
        raise ValueError(f"head: the block has {attn.num_heads} heads, got {head}")
    t_pairs = (hd - 2 * (hd // 3)) // 2  # diffsynth's 3-D RoPE: time, h, w pairs, in that order
    s_pairs = (hd // 3) // 2
    lo = head * hd
    with torch.no_grad():
        for lin, norm in ((attn.q, attn.norm_q), (attn.k, attn.norm_k)):
            lin.weight[lo:lo + hd] = 0
            lin.bias[lo:lo + hd] = 0
            for axis in range(2):  # h, w: their two fastest pairs
                for j in range(2):
                    lin.bias[lo + 2 * (t_pairs + axis * s_pairs + j)] = spatial
            norm.weight[lo:lo + hd] = sharpness
        attn.q.bias[lo] = temporal * math.cos(-float(frames_back))
        attn.q.bias[lo + 1] = temporal * math.sin(-float(frames_back))
        attn.k.bias[lo] = temporal


def rollout_loss(model, x0: torch.Tensor, cond, timesteps: dict, noise: torch.Tensor) -> torch.Tensor:
    """``mean((sample(noise) - x0)^2)``: the ``flow_match_euler`` rollout over ``timesteps`` (expert ->
    its timesteps, as :func:`sampler_timesteps` gives them), every step with gradient."""
    steps = sorted(((t, e) for e, ts in timesteps.items() for t in ts), reverse=True)
    sigmas = [t / 1000.0 for t, _ in steps] + [0.0]
    x = noise
    for i, (t, expert) in enumerate(steps):
        v = model.denoise(expert, x, torch.full((x.shape[0],), float(t)), cond)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return (x.float() - x0.float()).pow(2).mean()


def _rows(cond, idx: torch.Tensor):
    """The condition of the samples ``idx`` (tensors with a batch dimension are indexed)."""
    n = cond.context.shape[0]
    return dataclasses.replace(cond, **{
        f.name: getattr(cond, f.name)[idx] for f in dataclasses.fields(cond)
        if torch.is_tensor(getattr(cond, f.name)) and getattr(cond, f.name).dim() and getattr(cond, f.name).shape[0] == n})


def _load(model_dir: str, metadata_path: str, ws: WarmStart):
    """The twin with trainable DiTs, the clips' latents ``x0`` and their conditioning."""
    cfg = config_from_dict(dict(model_name="wan2_2_tiny", mixed_precision="fp32", device="cpu"))
    # full fine-tuning logs that it keeps frozen copies (for a regulariser this does not use)
    wan_log = logging.getLogger(wan_model.__name__)
    level = wan_log.level
    wan_log.setLevel(logging.ERROR)
    try:
        tiny = wan_model.Wan22TinyModel
        options = tiny.Options(model_paths=os.path.join(model_dir, "model_paths.json"), trainable_models="dit,dit2",
                               lora_base_model=None, gradient_checkpointing=False)
        model = tiny(cfg, options, device="cpu")
    finally:
        wan_log.setLevel(level)
    data = VideoDataset(metadata_path, num_frames=ws.num_frames, max_pixels=ws.height * ws.width,
                        height=ws.height, width=ws.width)
    batch = collate([data[i] for i in range(len(data))])
    x0 = encode_video(model.vae, batch["video"].transpose(1, 2))  # (B, F, 3, H, W) -> (B, z, T, h, w)
    cond = model.encode(batch["prompt"], batch["first_frame"], ws.num_frames)
    return model, x0, cond


def train_rollout(model, x0: torch.Tensor, cond, ws: WarmStart, log=None) -> dict[str, list[float]]:
    """Both experts trained together through the sampler's rollout (:func:`rollout_loss`), in place."""
    g = torch.Generator().manual_seed(ws.seed)
    experts = list(ws.timesteps)
    params = []
    for expert in experts:
        dit = model.dits[expert].requires_grad_(True).train()
        if ws.copy_head:
            for h in range(ws.copy_frames):
                same_position_attention_(dit, head=h, frames_back=h + 1)
        params += list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=ws.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / ws.iterations)))
    n = x0.shape[0]
    curve = []
    for i in range(ws.iterations):
        if 0 < ws.batch_size < n:
            idx = torch.randperm(n, generator=g)[:ws.batch_size]
            xb, cb = x0[idx], _rows(cond, idx)
        else:
            xb, cb = x0, cond
        loss = rollout_loss(model, xb, cb, ws.timesteps, torch.randn(xb.shape, generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
        if log and (i + 1) % 100 == 0:
            log(f"warm start: step {i + 1}/{ws.iterations}, rollout loss {loss.item():.4f}")
    for expert in experts:
        model.dits[expert].requires_grad_(False).eval()
    return {"rollout": curve}


def train_experts(model, x0: torch.Tensor, cond, ws: WarmStart, log=None) -> dict[str, list[float]]:
    """Training of the experts in ``ws.timesteps``, in place, by ``ws.objective``; returns the loss curves."""
    if ws.objective == "rollout":
        return train_rollout(model, x0, cond, ws, log=log)
    if ws.objective != "flow_matching":
        raise ValueError(f"warm start: objective must be rollout or flow_matching, got {ws.objective!r}")
    g = torch.Generator().manual_seed(ws.seed)
    curves = {}
    for expert, ts in ws.timesteps.items():
        dit = model.dits[expert].requires_grad_(True).train()
        opt = torch.optim.AdamW(dit.parameters(), lr=ws.learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / ws.iterations)))
        ts = torch.tensor(ts, dtype=torch.float32)
        curves[expert] = []
        for i in range(ws.iterations):
            t = ts[torch.randint(len(ts), (x0.shape[0],), generator=g)]
            noise = torch.randn(x0.shape, generator=g)
            loss = flow_matching_loss(model, expert, x0, cond, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            curves[expert].append(loss.item())
            if log and (i + 1) % 100 == 0:
                log(f"warm start {expert}: step {i + 1}/{ws.iterations}, flow-matching loss {loss.item():.4f}")
        dit.requires_grad_(False).eval()
    return curves


def _stamp(ws: WarmStart, metadata_path: str, model_dir: str) -> dict:
    """What a warm start is made from: its settings, the dataset and the twin's build."""
    inputs = {"metadata": file_sha256(metadata_path)}
    build = os.path.join(os.path.dirname(metadata_path), "videos", ".build.json")
    if os.path.isfile(build):  # the example dataset records its photos and settings there
        inputs["dataset_build"] = file_sha256(build)
    tiny = os.path.join(model_dir, "tiny_stamp.json")
    if os.path.isfile(tiny):
        inputs["tiny"] = file_sha256(tiny)
    return {"format": FORMAT_VERSION, "settings": dataclasses.asdict(ws), "inputs": inputs}


def _dit_files(ws: WarmStart, model_dir: str) -> dict[str, str]:
    """The trained DiT files now in ``model_dir``: name -> sha256 (a missing file is left out)."""
    names = (_DIT_FILES[expert] for expert in ws.timesteps)
    return {n: file_sha256(os.path.join(model_dir, n)) for n in names if os.path.isfile(os.path.join(model_dir, n))}


def warm_start(model_dir: str, metadata_path: str, ws: WarmStart, *, log=print,
               reset=None) -> Optional[dict[str, list[float]]]:
    """Warm-start the twin in ``model_dir`` on ``metadata_path``'s clips, in place (cached).

    ``reset()`` rewrites the twin's random DiTs first (e.g. ``make_tiny(..., force=True)``), so
    that a changed setting starts again from the same random weights. Returns the loss curves,
    or None when ``model_dir`` already holds this warm start.
    """
    stamp_path = os.path.join(model_dir, "warm_start.json")
    files = _dit_files(ws, model_dir)
    if files and stamp_matches(stamp_path, {**_stamp(ws, metadata_path, model_dir), "files": files}):
        return None
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # the DiT files are about to change
    if reset is not None:  # start from the random weights, whatever an earlier run left
        reset()
    inputs = _stamp(ws, metadata_path, model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ws.seed)
        model, x0, cond = _load(model_dir, metadata_path, ws)
        curves = train_experts(model, x0, cond, ws, log=log)
    for expert in ws.timesteps:
        state = {k: v.detach().contiguous() for k, v in model.dits[expert].state_dict().items()}
        write_safetensors(os.path.join(model_dir, _DIT_FILES[expert]), state,
                          {"rewardfl": "tiny-i2v", "warm_start": "1"})
    write_stamp(stamp_path, {**inputs, "files": _dit_files(ws, model_dir)})
    return curves
