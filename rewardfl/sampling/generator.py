"""The generator: a config's model and sampler built once, trained weights swapped in and out.

All ``num_inference_steps`` steps, without gradient, in the model's dtype: the training plan with
``final = N - 1`` and no gradient step (no truncation). Starting noise depends only on (config
``seed``, generation seed, clip ``sample_id``) (:func:`noise_seed`): every checkpoint starts from the
same noise, and the same checkpoint, seed and device give bit-identical videos. ``python -m
rewardfl.generate`` and the evaluation (:mod:`rewardfl.evaluation.evaluation`) are built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
from typing import Optional, Sequence

import torch

from rewardfl.registry import resolve_config
from rewardfl.runtime import resolve_device, seed_everything

from .policy import expert_boundary_of, plan_steps
from .rollout import sample_latents
from .weights import check_matches, trainable_weights_of

__all__ = ["Generator", "full_plan", "noise_seed", "video_name"]


def noise_seed(seed: int, sample_id: str) -> int:
    """The sampler's per-sample seed for clip ``sample_id`` and generation seed ``seed`` (< 2**56)."""
    digest = hashlib.sha256(f"rewardfl-generate:{int(seed)}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def full_plan(cfg, sampler, model, boundary):
    """All ``num_inference_steps`` steps, none with gradient: the training plan with mid = final = N - 1."""
    n = cfg.num_inference_steps
    whole = dataclasses.replace(cfg, mid_timestep=n - 1, final_timestep=n - 1)
    plan = plan_steps(whole, sampler, model.experts, model.experts, boundary)  # every expert may run the last step
    return [dataclasses.replace(p, grad=False) for p in plan]


class Generator:
    """A model and sampler with the config's full-step plan; :meth:`load` swaps trained weights in and out.

    :meth:`build` builds the model and sampler of a config (``generate``, ``evaluate``); training
    passes its own (no second copy of the model). ``base_weights``: what ``load("base")`` restores
    (default: a copy of the trainable weights as they are now; None: ``base`` cannot be loaded);
    ``whole``: a context in which the trainable weights are whole and loading into them lasts (the
    engine's ``gathered(modify=True)``: under ZeRO-3 they are partitioned)."""

    def __init__(self, cfg, model, sampler, boundary, *, base_weights="copy", whole=None,
                 checkpoint: str = "current"):
        self.cfg, self.model, self.sampler, self.device = cfg, model, sampler, model.device
        self.plan = full_plan(cfg, sampler, model, boundary)
        if base_weights == "copy":  # the weights as built (LoRA adapters that add nothing)
            base_weights = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        self._base, self.checkpoint = base_weights, checkpoint
        self._whole = whole or contextlib.nullcontext

    @classmethod
    def build(cls, cfg, plugins: dict[str, type], *, device: Optional[torch.device] = None) -> "Generator":
        """The model and sampler of ``cfg`` built (seeded by the config's ``seed``), in eval mode."""
        cfg = resolve_config(cfg, plugins)
        device = device or resolve_device(cfg)
        seed_everything(cfg.seed)
        model = plugins["model"](cfg, cfg.model, device=device)
        model.eval()
        sampler = plugins["sampler"](cfg, cfg.sampler.options, device=device)
        return cls(cfg, model, sampler, expert_boundary_of(plugins["model"], cfg), checkpoint="base")

    def check_fits(self, spec: str, which: str = "trained") -> None:
        """The one-line error :meth:`load` would give when ``spec``'s weights do not fit the model, without
        loading them (``evaluate`` checks every checkpoint before it generates anything)."""
        weights = trainable_weights_of(spec, which, self.model)
        if weights is not None:
            with self._whole():
                check_matches(self.model, weights, spec)

    def load(self, spec: str, which: str = "trained") -> None:
        """Use the weights ``--checkpoint spec`` names (``base``: none; ``which="ema"``: its moving average)."""
        weights = trainable_weights_of(spec, which, self.model)
        if weights is None:
            if self._base is None:
                raise ValueError("--checkpoint base: this generator kept no copy of the base weights")
            weights = self._base
        with self._whole():
            if weights is not self._base:
                check_matches(self.model, weights, spec)
            self.model.load_trainable_state_dict(weights)
        self.checkpoint = spec

    @torch.no_grad()
    def generate(self, items: Sequence[dict], seeds: Sequence[int], *, batch_size: int = 1) -> list[torch.Tensor]:
        """One video per ``(items[i], seeds[i])``: ``(3, F, H, W)`` float32 in [-1, 1] on the CPU.

        ``items``: dicts with ``first_frame`` ``(3, H, W)`` in [-1, 1], ``prompt`` and ``sample_id``.
        Consecutive items of one frame size are sampled together, ``batch_size`` at a time."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(items):
            j = i + 1
            while j < len(items) and j - i < batch_size and items[j]["first_frame"].shape == items[i]["first_frame"].shape:
                j += 1
            chunk = items[i:j]
            batch = {"first_frame": torch.stack([it["first_frame"] for it in chunk]),
                     "prompt": [it["prompt"] for it in chunk]}
            latents, _ = sample_latents(self.model, self.sampler, self.plan, batch,
                                        num_frames=self.cfg.data.num_frames, step=0, kl_weight=0.0,
                                        seeds=[noise_seed(s, it["sample_id"]) for it, s in zip(chunk, seeds[i:j])])
            out.extend(v.float().cpu() for v in self.model.decode(latents))
            i = j
        return out


def video_name(index: int, sample_id: str, seed: int) -> str:
    """``003_clip_name_seed1.mp4``: the row, a filename-safe form of the clip's id, the seed."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(sample_id.rstrip("/")))[0]) or "clip"
    return f"{index:03d}_{stem}_seed{seed}.mp4"
