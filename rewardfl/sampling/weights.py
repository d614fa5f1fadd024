"""The trained weights a ``--checkpoint`` names, read for the generator.

``base`` (none), a training checkpoint directory (``OUTPUT_DIR/checkpoints/checkpoint-N``, verified
against its manifest), an exported directory (``OUTPUT_DIR/final``) or one exported file
(``final/trainable_low_noise.safetensors``); ``--weights ema`` their moving average. Every wrong path,
damaged file or mismatching checkpoint is a one-line error naming ``--checkpoint``.
"""

from __future__ import annotations

import glob
import os
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rewardfl.checkpoints import EMA_FILE, CheckpointError, load_checkpoint, verified_checkpoint

__all__ = ["check_weights_source", "trainable_weights_of", "check_matches"]


_VERIFIED: set = set()  # checkpoint directories that verified in this process


def _weights_source(spec: str, weights: str) -> tuple[str, list[str]]:
    """Where ``--checkpoint spec`` (not ``base``) keeps the weights ``weights`` names: ``("checkpoint",
    [directory])`` (verified against its manifest) or ``("exported", [files])``; the one-line errors of a
    wrong path. Reads no tensor."""
    if weights not in ("trained", "ema"):
        raise ValueError(f"--weights: trained or ema, got {weights!r}")
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json")):
        try:
            stamp = (path, os.stat(path).st_mtime_ns, os.path.getmtime(os.path.join(path, "state.json")))
            if stamp not in _VERIFIED:  # checked before the model loads, and not hashed again when it does
                verified_checkpoint(path)
                _VERIFIED.add(stamp)
        except CheckpointError as e:
            raise ValueError("--checkpoint " + str(e).removeprefix("resume_from_checkpoint: ")) from e
        if weights == "ema" and not os.path.isfile(os.path.join(path, EMA_FILE)):
            raise ValueError(f"--weights ema: {path} holds no {EMA_FILE}; it was trained without ema_decay")
        return "checkpoint", [path]
    if weights == "ema":
        if not os.path.isdir(os.path.join(path, "ema")):
            raise ValueError(f"--weights ema: {spec} has no ema/ export (give a checkpoint directory or OUTPUT_DIR/final "
                             "of a run trained with ema_decay)")
        path = os.path.join(path, "ema")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"--checkpoint {spec}: {path} holds neither a training checkpoint (state.json) nor "
                             "exported .safetensors files; point it at OUTPUT_DIR/checkpoints/checkpoint-N or "
                             "OUTPUT_DIR/final")
        return "exported", files
    if os.path.isfile(path):
        return "exported", [path]
    raise FileNotFoundError(f"--checkpoint {spec}: not found ({path}); give base, a checkpoint directory, "
                            "OUTPUT_DIR/final or an exported .safetensors file")


def check_weights_source(spec: str, weights: str = "trained") -> None:
    """The one-line error ``trainable_weights_of`` would give for a wrong path, a checkpoint that does not
    verify or a truncated or foreign exported file, without reading a tensor or building the model: what
    ``generate`` and ``evaluate`` run first."""
    if spec == "base":
        return
    kind, files = _weights_source(spec, weights)
    if kind == "exported":
        _check_headers(spec, files)


def _check_headers(spec: str, files: Sequence[str]) -> None:
    for path in files:
        try:  # the header, and that the file covers every tensor it lists (a truncated file does not)
            with safe_open(path, "pt") as f:
                f.metadata()
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            reason = " ".join(str(e).split())
            raise ValueError(f"--checkpoint {spec}: {path} is not a readable safetensors file ({reason}); give a "
                             "complete file rewardfl exported") from e


def trainable_weights_of(spec: str, weights: str = "trained", model=None) -> Optional[dict[str, torch.Tensor]]:
    """The trainable weights ``--checkpoint spec`` names, in ``trainable_state_dict`` keys (None: base).

    ``weights="ema"``: the moving average instead (``ema_decay``): ``ema.safetensors`` of a checkpoint
    directory, or ``ema/`` of an export directory. Exported files are read by
    ``model.read_exported(files)`` (it knows its export formats, e.g. Wan's comfyui/diffsynth/diffusers
    LoRA layouts)."""
    if spec == "base":
        return None
    kind, files = _weights_source(spec, weights)
    if kind == "checkpoint":
        path = files[0]
        try:
            if weights == "ema":  # the average alone; the trained weights are not read
                return load_file(os.path.join(path, EMA_FILE))
            trained, _ = load_checkpoint(path)
        except CheckpointError as e:
            raise ValueError("--checkpoint " + str(e).removeprefix("resume_from_checkpoint: ")) from e
        return trained
    _check_headers(spec, files)
    return _read_exported_by(model, files, spec)


def _read_exported_by(model, files: Sequence[str], source: str) -> dict[str, torch.Tensor]:
    """The model's own reader of its exported files (``VideoModel.read_exported``: it knows its formats)."""
    if model is None:
        raise ValueError(f"--checkpoint {source}: exported files are read by the model that wrote them; "
                         "pass the model")
    try:
        return model.read_exported(files)
    except ValueError as e:
        raise ValueError(f"--checkpoint {source}: {e}") from e


def check_matches(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the expert and the first mismatching key unless ``weights`` fit the model."""
    want = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    for key in sorted(set(want) | set(weights)):
        if key not in weights:
            what = "missing from the checkpoint"
        elif key not in want:
            what = "not in the model"
        elif tuple(weights[key].shape) != want[key]:
            what = f"shape {tuple(weights[key].shape)} in the checkpoint, {want[key]} in the model"
        else:
            continue
        expert = key.split(".", 1)[0]
        raise ValueError(f"--checkpoint {source}: does not match the model: expert {expert}, first mismatching key "
                         f"{key} ({what}; the model has {len(want)} trainable tensors, the checkpoint "
                         f"{len(weights)}); was it trained with this config's model_name, trainable_models, "
                         "lora_base_model, lora_target_modules and lora_rank?")
