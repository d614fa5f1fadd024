"""Checkpoints: trainable weights, optimizer, scheduler, RNG states, step and data position.

Layout of ``OUTPUT_DIR/checkpoints/checkpoint-<step>/``::

    trainable.safetensors   the model's trainable_state_dict() (LoRA or full weights)
    optimizer.pt            optimizer state_dict
    scheduler.pt            LR scheduler state_dict
    rng.pt                  python, numpy, torch (and CUDA) RNG states
    state.json              step, epoch, data position, counters, config hash

A checkpoint is written into ``.checkpoint-<step>.tmp-<pid>`` and renamed into
place only when complete (a rename within one directory is atomic), so a crash
or a kill while saving leaves the previous checkpoint intact; leftovers of an
interrupted save are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "CHECKPOINT_RE"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = "trainable.safetensors"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    root: str,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    state: Optional[dict] = None,
    keep: Optional[int] = None,
) -> str:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` (None: all). Returns its path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = os.path.join(root, f".checkpoint-{step}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(_contiguous_cpu(weights), os.path.join(tmp, WEIGHTS), metadata={"step": str(step)})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, **(state or {})}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: str, keep: Optional[int]) -> None:
    for name in os.listdir(root):
        if name.startswith(".checkpoint-") and ".tmp-" in name:
            pid = name.rsplit("-", 1)[-1]
            if pid != str(os.getpid()):  # a save interrupted in an earlier process
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep is not None:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str, *, optimizer=None, scheduler=None, restore_rng: bool = True) -> tuple[dict, dict]:
    """Load a checkpoint directory: returns ``(weights, state)`` and restores optimizer/scheduler/RNG."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no state.json)")
    weights = load_file(os.path.join(path, WEIGHTS))
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=False))
    return weights, state
