"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states, step and data position.

The on-disk format, written by training and read by the generator (``--checkpoint DIR``), so it
lives below both. :class:`CheckpointManager` owns ``OUTPUT_DIR/checkpoints/``: the loop asks it to
save and to resume; the functions below are its parts (the on-disk layout).

Layout of ``OUTPUT_DIR/checkpoints/checkpoint-<step>/``::

    trainable.safetensors     the model's trainable_state_dict() (LoRA or full weights); loads
                              without rewardfl or DeepSpeed
    optimizer.pt              optimizer state_dict (without DeepSpeed)
    scheduler.pt              LR scheduler state_dict (without DeepSpeed)
    deepspeed/                under DeepSpeed, instead of the two above: its own checkpoint
                              (*model_states.pt, *optim_states.pt; ZeRO-partitioned), and
    latest, zero_to_fp32.py,  the tag file and conversion scripts DeepSpeed writes beside it
    zero_to_torch.py          (never run by rewardfl)
    rng-<rank>.safetensors    python, numpy, torch (and CUDA) RNG states of each process
    ema.safetensors           the moving average of the trainable weights (ema_decay > 0)
    algorithm-<rank>.safetensors  what each process's algorithm needs for the next step (GRPO
                              between inner updates: the sampled groups); only when it needs any
    state.json                step, epoch, data position, counters
    manifest.json             size and sha256 of every file above (written last)

Nothing in a checkpoint can run code when it is loaded: weights and RNG states are
safetensors (tensors, plus JSON in the header), ``state.json`` and ``manifest.json``
are JSON, and the ``.pt`` files (ours and DeepSpeed's) are read with torch's
``weights_only=True`` unpickler, which builds tensors and plain containers only (and,
for DeepSpeed, the few data classes its states hold, see :func:`load_torch_file`). A file
holding anything else is refused with :class:`CheckpointError`.

A checkpoint is written into ``.checkpoint-<step>.tmp``; the manifest is written
last (after every file is flushed to disk) and the directory is then renamed into
place, so a crash, a kill or a full disk while saving leaves the previous
checkpoints as they were. On resume the manifest is checked: ``resume_from_checkpoint:
true`` takes the newest checkpoint that verifies (skipping, with one warning line,
newer ones that do not), an explicit path that does not verify is an error. A
checkpoint without a manifest (written by an older rewardfl) is loaded unverified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

try:  # what numpy's pickles rebuild arrays with (an older rewardfl's rng-<rank>.pt holds one)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct  # numpy 2
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

from rewardfl.fileio import atomic_write, replace_directory, write_json, write_safetensors
from rewardfl.runtime import DistInfo, barrier

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "CheckpointError", "CHECKPOINT_RE", "EMA_FILE", "ALGORITHM_FILE", "list_checkpoints",
           "latest_checkpoint", "verified_checkpoint",
           "begin_checkpoint", "write_checkpoint_files", "save_rng", "write_manifest", "commit_checkpoint",
           "save_failed", "save_torch_file", "load_checkpoint", "load_rng", "load_torch_file"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = "trainable.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: the moving average of the trainable weights (``ema_decay``; ``rewardfl.training.ema``) in a checkpoint
EMA_FILE = "ema.safetensors"
#: the algorithm's state of process ``rank`` (``Algorithm.state_dict``: GRPO's sampled groups mid-cycle)
ALGORITHM_FILE = "algorithm-{rank}.safetensors"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used: one line naming the path and the fix (the CLI prints it)."""


# --------------------------------------------------------------------------- finding a checkpoint


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Every ``checkpoint-<step>`` directory under ``root`` as ``(step, path)``, oldest first (verified or not)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _sha256(path: str, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:  # the data is on disk before the manifest that vouches for it
            os.fsync(f.fileno())
    return h.hexdigest()


def _files(ckpt_dir: str) -> list[str]:
    """Every file under ``ckpt_dir`` but the manifest, as sorted relative paths with ``/``."""
    found = []
    for folder, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), ckpt_dir).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete, intact checkpoint (a short phrase), or None when its manifest verifies.

    A checkpoint without ``manifest.json`` but with ``state.json`` (an older rewardfl's) has no
    problem here: it cannot be verified, only loaded.
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return None if os.path.isfile(os.path.join(path, STATE)) else "no manifest.json: an incomplete save"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            listed = json.load(f)["files"]
        sizes = {rel: int(entry["bytes"]) for rel, entry in listed.items()}
        digests = {rel: str(entry["sha256"]) for rel, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "manifest.json is not a rewardfl manifest"
    for required in (STATE, WEIGHTS):
        if required not in listed:
            return f"manifest.json does not list {required}"
    present = _files(path)
    for rel in present:
        if rel not in listed:
            return f"{rel} is not in manifest.json"
    for rel in sorted(listed):
        if rel not in present:
            return f"{rel} is missing"
        size = os.path.getsize(os.path.join(path, rel))
        if size != sizes[rel]:
            return f"{rel} has {size} bytes, manifest.json says {sizes[rel]}"
        if _sha256(os.path.join(path, rel)) != digests[rel]:
            return f"{rel} does not match its sha256 in manifest.json"
    return None


def _warn_if_unverified(path: str) -> None:
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        log.warning("resume_from_checkpoint: %s has no manifest.json (saved by an older rewardfl): loading it "
                    "unverified", path)


def verified_checkpoint(path: str) -> str:
    """``path`` if it is an intact checkpoint (``resume_from_checkpoint: PATH``); CheckpointError if not."""
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint: {path} is not a checkpoint directory; point it at "
                              "OUTPUT_DIR/checkpoints/checkpoint-<step> (or use true for the newest)")
    problem = _checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"resume_from_checkpoint: {path} does not verify ({problem}); point it at another "
                              "checkpoint, or use true for the newest one that verifies")
    _warn_if_unverified(path)
    return path


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest checkpoint under ``root`` that verifies (``resume_from_checkpoint: true``), or None if there
    is none at all.

    Newer ones that do not verify (a damaged file, an interrupted deletion) are skipped with one
    warning line naming each and why; when checkpoints exist but none verifies, CheckpointError.
    """
    skipped = []
    for _, path in reversed(list_checkpoints(root)):
        problem = _checkpoint_problem(path)
        if problem is not None:
            skipped.append(f"{os.path.basename(path)} ({problem})")
            continue
        if skipped:
            log.warning("resume_from_checkpoint: skipped %s; resuming from %s", "; ".join(skipped), path)
        _warn_if_unverified(path)
        return path
    if skipped:
        raise CheckpointError(f"resume_from_checkpoint: no checkpoint under {root} verifies "
                              f"({'; '.join(skipped)}); move them away and start fresh, or point "
                              "resume_from_checkpoint at a checkpoint you trust")
    return None


# --------------------------------------------------------------------------- saving


def begin_checkpoint(root: str, step: int) -> str:
    """A fresh, empty temporary directory for checkpoint ``step`` (leftovers of interrupted saves are removed)."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.startswith(".checkpoint-") and name.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f".checkpoint-{step}.tmp")
    os.makedirs(tmp)
    return tmp


def write_checkpoint_files(tmp: str, step: int, *, weights: dict[str, torch.Tensor],
                           state: Optional[dict] = None) -> None:
    """The trainable weights as safetensors and ``state.json`` (step, data position, counters)."""
    write_safetensors(os.path.join(tmp, WEIGHTS), weights, metadata={"step": str(step)})
    write_json(os.path.join(tmp, STATE), {"step": step, **(state or {})}, indent=1, sort_keys=True)


class _WriteErrorRecorder:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's writer turns it into
    a RuntimeError that names neither the file nor the cause (``unexpected pos ...``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch_file(obj, path: str) -> None:
    """``torch.save`` under a temporary name, renamed when complete; a full disk is an ``OSError`` naming
    ``path``."""
    with atomic_write(path, "wb") as f:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


def save_rng(tmp: str, rank: int = 0) -> None:
    """This process's RNG states as ``rng-<rank>.safetensors``: torch's (and CUDA's) byte states and
    numpy's key as tensors, python's state and numpy's scalars as JSON in the header."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    metadata = {"python": json.dumps([version, list(internal), gauss_next]),
                "numpy": json.dumps({"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                                     "cached_gaussian": float(cached_gaussian)})}
    write_safetensors(os.path.join(tmp, f"rng-{rank}.safetensors"), tensors, metadata=metadata)


def write_manifest(ckpt_dir: str) -> None:
    """``manifest.json``: size and sha256 of every file under ``ckpt_dir`` (DeepSpeed's subfolder too),
    each flushed to disk first; written last, it is what makes a checkpoint complete."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(ckpt_dir, rel)),
                   "sha256": _sha256(os.path.join(ckpt_dir, rel), fsync=True)} for rel in _files(ckpt_dir)}
    write_json(os.path.join(ckpt_dir, MANIFEST), {"format": MANIFEST_FORMAT, "files": files}, indent=1,
               sort_keys=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(root: str, step: int, tmp: str, keep: Optional[int] = None) -> str:
    """Write the manifest of the finished ``tmp``, rename it into place and keep the newest ``keep``."""
    write_manifest(tmp)
    final = os.path.join(root, f"checkpoint-{step}")
    # re-saving a step (a signal right after a periodic save, or a resumed run): checkpoint-<step> is
    # replaced whole, never half deleted; a previous one moved aside is hidden (begin_checkpoint removes it)
    replace_directory(tmp, final, old=os.path.join(root, f".checkpoint-{step}.old"))
    _fsync_dir(root)
    if keep is not None:
        for old_step, path in list_checkpoints(root)[:-keep]:
            # renamed away first: a crash mid-deletion leaves a hidden leftover, never a checkpoint
            # that lost its manifest but still looks like an older rewardfl's
            old = os.path.join(root, f".checkpoint-{old_step}.old")
            os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)
    return final


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


#: what torch's own file writer (``torch.save`` to a path, as DeepSpeed calls it) raises when a write
#: fails, a full disk included: a RuntimeError without errno or file name
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos \d+ vs \d+")


def is_write_failure(error: BaseException) -> bool:
    """A failed write while saving: an ``OSError``, or torch's writer's RuntimeError for one."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError)
                                          and _TORCH_WRITE_FAILED.search(str(error)) is not None)


def save_failed(tmp: str, error: BaseException) -> CheckpointError:
    """The one-line error for a save that failed to write (a full disk, a quota, a vanished mount):
    an ``OSError``, or torch's writer's RuntimeError (:func:`is_write_failure`).

    Removes the temporary directory first: a later save must find the space, and the previous
    checkpoints (never touched before the final rename) stay as they were.
    """
    shutil.rmtree(tmp, ignore_errors=True)
    root = os.path.dirname(tmp)
    try:
        free = _human_bytes(shutil.disk_usage(root).free)
    except OSError:
        free = "unknown"
    if isinstance(error, OSError):
        what, code = error.filename or tmp, error.errno
        reason = error.strerror or str(error) or type(error).__name__
    else:  # torch's writer names neither the file nor the cause
        what, code = tmp, errno.ENOSPC
        reason = f"torch could not write ({_one_line(error).splitlines()[0][:160]})"
    previous = list_checkpoints(root)
    kept = f"{os.path.basename(previous[-1][1])} is intact" if previous else "no earlier checkpoint exists"
    fix = ("free some space (or lower save_total_limit, or point output_dir at a larger disk)"
           if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make output_dir writable")
    return CheckpointError(f"checkpoint: could not write {what}: {reason} ({free} free in {root}); {kept}; {fix} "
                           "and resume with resume_from_checkpoint: true")


# --------------------------------------------------------------------------- loading


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_torch_file(path: str, map_location="cpu", allow: tuple = ()):
    """``torch.load`` of a ``.pt`` file with torch's restricted unpickler (``weights_only=True``).

    It builds tensors and plain containers (and the classes in ``allow``) and refuses anything
    else, so a crafted file cannot run code; a refused or unreadable file is a CheckpointError.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (a checkpoint saved with a different deepspeed section?); resume "
                              "from a checkpoint saved with this config")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message is a dozen lines of advice: keep what it refused
        name = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = re.search(r"Unsupported [^\n]*", str(e))
        what = (f"it holds {name.group(1)}, and unpickling that could run code" if name else
                f"it is not a file of tensors and plain containers ({detail.group(0) if detail else _one_line(e)})")
        raise CheckpointError(f"{path}: refused to load: {what}; rewardfl and DeepSpeed never save such a file, so "
                              "it was altered or comes from elsewhere: resume from a checkpoint you saved "
                              "yourself") from e
    except Exception as e:  # a truncated or foreign file: torch raises RuntimeError, EOFError, OSError, ...
        raise CheckpointError(f"{path}: not a readable torch file ({_one_line(e)}); resume from another "
                              "checkpoint") from e


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(weights, state)`` of checkpoint ``path``: the trainable weights and ``state.json``."""
    weights_path, state_path = os.path.join(path, WEIGHTS), os.path.join(path, STATE)
    try:
        weights = load_file(weights_path)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({_one_line(e)}); resume from "
                              "another checkpoint") from e
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_path}: not readable JSON ({_one_line(e)}); resume from another "
                              "checkpoint") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_path}: no integer 'step'; resume from another checkpoint")
    return weights, state


def _old_rng_globals() -> list:
    """What an ``rng-<rank>.pt`` of an older rewardfl holds besides tensors: numpy's key array."""
    return [_np_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rng(path: str, rank: int = 0) -> None:
    """Restore this process's RNG states from checkpoint ``path`` (a rank the checkpoint has no states
    for, in a run resumed on more processes than saved it, keeps its seed)."""
    file = os.path.join(path, f"rng-{rank}.safetensors")
    old = os.path.join(path, f"rng-{rank}.pt")
    if os.path.isfile(file):
        try:
            with safe_open(file, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            version, internal, gauss_next = json.loads(meta["python"])
            numpy_state = json.loads(meta["numpy"])
            random.setstate((version, tuple(internal), gauss_next))
            np.random.set_state((numpy_state["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                                 numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
            torch.set_rng_state(tensors["torch"])
        except Exception as e:  # a foreign or damaged file: header, JSON or state shapes
            raise CheckpointError(f"{file}: not a rewardfl RNG state ({_one_line(e)}); resume from another "
                                  "checkpoint") from e
        cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    elif os.path.isfile(old):  # an older rewardfl's pickle: read through the restricted unpickler only
        state = load_torch_file(old, allow=tuple(_old_rng_globals()))
        try:
            random.setstate(state["python"])
            np.random.set_state(state["numpy"])
            torch.set_rng_state(state["torch"])
            cuda = state.get("cuda", [])
        except Exception as e:
            raise CheckpointError(f"{old}: not a rewardfl RNG state ({_one_line(e)}); resume from another "
                                  "checkpoint") from e
    else:
        return
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """``OUTPUT_DIR/checkpoints/``: collective saves and resumes of the trainable weights, the
    engine's optimizer and schedule, every process's RNG states and the loop's state."""

    def __init__(self, root: str, dist: Optional[DistInfo] = None, *, keep: Optional[int] = None):
        self.root, self.dist, self.keep = root, dist or DistInfo(), keep

    def save(self, step: int, *, engine, model, state: dict,
             extra_weights: Optional[dict[str, dict[str, torch.Tensor]]] = None,
             process_weights: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> str:
        """Checkpoint ``step`` (collective under DeepSpeed): every process writes its part into one
        temporary directory, rank 0 adds weights, state and the manifest of checksums and renames it
        into place.

        A failed write (a full disk) is a one-line CheckpointError naming the file and the free
        space; the temporary directory is removed and the previous checkpoints stay as they were.
        With several processes, the process that failed exits and the launcher stops the others.
        ``extra_weights``: ``{file name: tensors}`` rank 0 also writes (e.g. the EMA), in the manifest too;
        ``process_weights``: the same that every process writes (names of its own, e.g. with its rank).
        """
        main = self.dist.is_main
        tmp = os.path.join(self.root, f".checkpoint-{step}.tmp")
        path = os.path.join(self.root, f"checkpoint-{step}")
        try:
            if main:
                tmp = begin_checkpoint(self.root, step)
            barrier(self.dist)
            engine.save(tmp)
            save_rng(tmp, self.dist.rank)
            for name, tensors in (process_weights or {}).items():
                write_safetensors(os.path.join(tmp, name), tensors, metadata={"step": str(step)})
            with engine.gathered():
                weights = model.trainable_state_dict() if main else None
                if main:
                    weights = {k: v.detach().to("cpu").clone() for k, v in weights.items()}
            barrier(self.dist)
            if main:
                write_checkpoint_files(tmp, step, weights=weights, state=state)
                for name, tensors in (extra_weights or {}).items():
                    write_safetensors(os.path.join(tmp, name), tensors, metadata={"step": str(step)})
                path = commit_checkpoint(self.root, step, tmp, keep=self.keep)
                log.info("saved checkpoint %s", path)
        except (OSError, RuntimeError) as e:
            if not is_write_failure(e):
                raise  # a bug, not the disk: the traceback is what helps
            raise save_failed(tmp, e) from e
        barrier(self.dist)
        return path

    def resume(self, resume_from, *, engine, model) -> Optional[tuple[str, dict]]:
        """Load the checkpoint ``resume_from`` names (``True``: the newest that verifies; a path; ``False``:
        none). Returns ``(path, state)`` or None when there is nothing to resume.

        Rank 0 checks the manifest (every file read once, not once per process) and all processes
        load what it chose; any failure to load is a one-line CheckpointError naming the path.
        """
        if resume_from is False:
            return None
        choice = [None, None]  # (path, error message) as rank 0 found them
        if self.dist.is_main:
            try:
                choice[0] = latest_checkpoint(self.root) if resume_from is True else verified_checkpoint(resume_from)
            except CheckpointError as e:
                choice[1] = str(e)
        if self.dist.active and self.dist.world_size > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        path, error = choice
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            log.info("resume_from_checkpoint: no checkpoint in %s yet; starting fresh", self.root)
            return None
        try:
            weights, state = load_checkpoint(path)
            with engine.gathered():
                model.load_trainable_state_dict(weights)
            engine.load(path)
            load_rng(path, self.dist.rank)
        except CheckpointError:
            raise
        except Exception as e:  # a state that does not fit this model or optimizer (or an unverified file)
            text = " ".join(str(e).split())[:300]  # load_state_dict lists every key: the start says enough
            raise CheckpointError(f"resume_from_checkpoint: could not load {path} ({type(e).__name__}: {text}); "
                                  "it does not match this config's model and trainable_models, or it is damaged: "
                                  "resume from another checkpoint") from e
        log.info("resumed from %s at step %d", path, state.get("step", 0))
        return path, state
