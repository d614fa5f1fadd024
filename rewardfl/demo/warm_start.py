"""Warm-start the tiny Wan twin on a dataset: a short flow-matching pre-training of its DiTs.

A randomly initialised tiny DiT samples blocky noise: no face for the reward to score, so reward
feedback learning has nothing to improve. This trains each expert with the plain flow-matching
objective on the dataset's clips (what pre-training does to the real Wan, in miniature), at the
timesteps the demo's sampler visits, so the base model turns noise + the conditioning frame into
a blurry, face-like video. Reward feedback learning then starts from a model that makes faces,
as it does with the real Wan2.2::

    x0 = VAE latent of the clip, n ~ N(0, 1), s = t / 1000 (t one of the expert's timesteps)
    x_s = (1 - s) x0 + s n,   loss = mean((v(x_s, t, prompt, first frame) - (n - x0))^2)

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

from rewardfl.fileio import stamp_matches, write_safetensors, write_stamp

__all__ = ["WarmStart", "warm_start", "flow_matching_loss", "sampler_timesteps"]

FORMAT_VERSION = 1
_DIT_FILES = {"dit": "dit_high_noise.safetensors", "dit2": "dit_low_noise.safetensors"}


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """What the warm start trains on: clip size, the experts' timesteps and the optimiser."""

    height: int
    width: int
    num_frames: int
    #: expert -> timesteps in [0, 1000] it is trained at (e.g. from :func:`sampler_timesteps`)
    timesteps: dict
    iterations: int = 300  # per expert, full batch of every clip
    learning_rate: float = 3e-3  # AdamW, cosine decay to 0
    seed: int = 0


def sampler_timesteps(num_steps: int, shift: float, boundary: float) -> dict[str, list[float]]:
    """Expert -> the timesteps a ``flow_match_euler`` sampler with these options runs it at."""
    from rewardfl.samplers.flow_match_euler import shifted_sigmas

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


def _load(model_dir: str, metadata_path: str, ws: WarmStart):
    """The twin with trainable DiTs, the clips' latents ``x0`` and their conditioning."""
    from rewardfl.config import config_from_dict
    from rewardfl.data import VideoDataset, collate
    from rewardfl.models.wan import model as wan_model
    from rewardfl.models.wan.vae_decode import encode_video

    cfg = config_from_dict(dict(
        model_name="wan2_2_tiny", model_paths=os.path.join(model_dir, "model_paths.json"),
        trainable_models="dit,dit2", lora_base_model=None, mixed_precision="fp32", device="cpu"))
    # full fine-tuning logs that it keeps frozen copies (for a regulariser this does not use)
    wan_log = logging.getLogger(wan_model.__name__)
    level = wan_log.level
    wan_log.setLevel(logging.ERROR)
    try:
        tiny = wan_model.Wan22TinyModel
        model = tiny(cfg, tiny.Options(gradient_checkpointing=False), device="cpu")
    finally:
        wan_log.setLevel(level)
    data = VideoDataset(metadata_path, num_frames=ws.num_frames, max_pixels=ws.height * ws.width,
                        height=ws.height, width=ws.width)
    batch = collate([data[i] for i in range(len(data))])
    x0 = encode_video(model.vae, batch["video"].transpose(1, 2))  # (B, F, 3, H, W) -> (B, z, T, h, w)
    cond = model.encode(batch["prompt"], batch["first_frame"], ws.num_frames)
    return model, x0, cond


def train_experts(model, x0: torch.Tensor, cond, ws: WarmStart, log=None) -> dict[str, list[float]]:
    """Flow-matching training of each expert in ``ws.timesteps``, in place; returns the loss curves."""
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
    from rewardfl.demo.assets import file_sha256

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
    from rewardfl.demo.assets import file_sha256

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
