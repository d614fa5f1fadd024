"""Checkpoints: trainable weights, optimizer, scheduler, RNG states, step and data position.

Layout of ``OUTPUT_DIR/checkpoints/checkpoint-<step>/``::

    trainable.safetensors   the model's trainable_state_dict() (LoRA or full weights); loads
                            without rewardfl or DeepSpeed
    optimizer.pt            optimizer state_dict       } or deepspeed/: DeepSpeed's own checkpoint
    scheduler.pt            LR scheduler state_dict    } (ZeRO-partitioned optimizer state)
    rng-<rank>.pt           python, numpy, torch (and CUDA) RNG states of each process
    state.json              step, epoch, data position, counters

A checkpoint is written into ``.checkpoint-<step>.tmp`` and renamed into place
only when complete (a rename within one directory is atomic), so a crash or a
kill while saving leaves the previous checkpoint intact; the leftovers of an
interrupted save are ignored, and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "begin_checkpoint",
           "write_checkpoint_files", "save_rng", "load_rng", "commit_checkpoint", "CHECKPOINT_RE"]

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


def begin_checkpoint(root: str, step: int) -> str:
    """A fresh, empty temporary directory for checkpoint ``step`` (stale ones are removed)."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.startswith(".checkpoint-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f".checkpoint-{step}.tmp")
    os.makedirs(tmp)
    return tmp


def write_checkpoint_files(tmp: str, step: int, *, weights: dict[str, torch.Tensor],
                           state: Optional[dict] = None) -> None:
    """The weights as safetensors and ``state.json`` (written last: it marks a complete checkpoint)."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"step": str(step)})
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, **(state or {})}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def save_rng(tmp: str, rank: int = 0) -> None:
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))


def load_rng(path: str, rank: int = 0) -> None:
    file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.isfile(file):  # a run resumed on more processes than saved: the new ranks keep their seed
        set_rng_state(torch.load(file, map_location="cpu", weights_only=False))


def commit_checkpoint(root: str, step: int, tmp: str, keep: Optional[int] = None) -> str:
    """Rename the finished ``tmp`` into place and keep the newest ``keep`` checkpoints."""
    final = os.path.join(root, f"checkpoint-{step}")
    if os.path.exists(final):  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    if keep is not None:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def save_checkpoint(root: str, step: int, *, weights: dict[str, torch.Tensor], optimizer=None, scheduler=None,
                    state: Optional[dict] = None, keep: Optional[int] = None) -> str:
    """Single-process save of checkpoint ``step``, atomically. Returns its path."""
    tmp = begin_checkpoint(root, step)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    save_rng(tmp, 0)
    write_checkpoint_files(tmp, step, weights=weights, state=state)
    return commit_checkpoint(root, step, tmp, keep)


def load_checkpoint(path: str, *, optimizer=None, scheduler=None, restore_rng: bool = True,
                    rank: int = 0) -> tuple[dict, dict]:
    """Load a checkpoint directory: returns ``(weights, state)``; restores optimizer/scheduler/RNG if given."""
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
        load_rng(path, rank)
    return weights, state
