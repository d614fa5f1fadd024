"""What a run leaves in ``output_dir``: who owns it, metrics, sample videos, the reward curve.

* :class:`OutputDir`: one run at a time. ``acquire`` takes ``output_dir/.lock``
  (PID and host inside; a lock whose process is gone on this host is stale and
  taken over) and refuses a fresh run into a directory that holds another run's
  checkpoints unless ``resume_from_checkpoint`` or ``overwrite_output_dir`` says so.
* :class:`MetricsLog`: ``metrics.jsonl``, one JSON object per logged step, written
  in one ``write`` and flushed; non-finite numbers are written as ``null`` (strict
  JSON readers reject ``NaN``). Reading drops a torn last line (a crash or a full
  disk mid-write) with a warning; any other bad line is an error naming the file
  and line. With ``logging_steps: N`` a row is the mean of N optimizer steps.
  Each row's finite numbers also go to the run's trackers (TensorBoard, wandb:
  ``trackers.py``) when it is given them.
* :class:`VideoWriter` and :func:`plot_reward_curve`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
from typing import Optional

import numpy as np
import torch

from rewardfl.config import ConfigError
from rewardfl.fileio import atomic_path, atomic_write, pid_alive, recover_directory
from rewardfl.runtime import DistInfo, all_reduce_mean

log = logging.getLogger("rewardfl")

__all__ = ["OutputDir", "check_output_dir", "check_command_output", "MetricsLog", "MetricsWindow", "VideoWriter", "plot_reward_curve", "read_metrics",
           "finite_or_none"]

LOCK = ".lock"


# --------------------------------------------------------------------------- the output directory


class OutputDir:
    """Ownership of ``output_dir`` for the length of a run (rank 0 takes it; a context manager)."""

    def __init__(self, path: str):
        self.path = path
        self.lock_path = os.path.join(path, LOCK)
        self._held = False

    def check_usable(self) -> None:
        """``output_dir`` is (or can be made) a writable directory; ConfigError otherwise."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"output_dir: {self.path} exists and is a file; point output_dir at a directory")
        probe = self.path
        while not os.path.exists(probe):  # the nearest existing parent must be writable
            probe = os.path.dirname(probe) or "."
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir: {self.path} is not writable ({probe} is read-only for this user); "
                              "choose another output_dir")

    def holder(self) -> Optional[str]:
        """A description of the live run holding the lock, or None (no lock, or a stale one)."""
        try:
            with open(self.lock_path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        pid, host = int(info.get("pid", -1)), str(info.get("host", ""))
        if host == socket.gethostname() and not pid_alive(pid):
            return None
        return f"pid {pid} on {host}"

    def check_fresh_or_resumable(self, resume, overwrite: bool, checkpoints_dir: str) -> None:
        """A fresh run must not land on another run's checkpoints (a later resume would continue that run)."""
        if resume is not False or overwrite:
            return
        if os.path.isdir(checkpoints_dir) and any(n.startswith("checkpoint-") for n in os.listdir(checkpoints_dir)):
            raise ConfigError(
                f"output_dir: {self.path} holds another run's checkpoints; set resume_from_checkpoint: true to "
                "continue it, overwrite_output_dir: true to replace it, or choose another output_dir")
        # a run that stopped before its first checkpoint still logged: a fresh run would drop its rows
        logged = [n for n in ("metrics.jsonl", "eval_history.json")
                  if os.path.isfile(os.path.join(self.path, n)) and os.path.getsize(os.path.join(self.path, n)) > 0]
        if logged:
            raise ConfigError(
                f"output_dir: {self.path} holds another run's {' and '.join(logged)} (and no checkpoint: it stopped "
                "before its first save); set overwrite_output_dir: true to replace it, resume_from_checkpoint: true "
                "to start it over, or choose another output_dir")

    def acquire(self) -> "OutputDir":
        self.check_usable()
        os.makedirs(self.path, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None:
                    raise ConfigError(f"output_dir: {self.path} is in use by another run ({holder}, lock file "
                                      f"{self.lock_path}); wait for it, or choose another output_dir") from None
                log.warning("output_dir: removing a stale lock %s (its process is gone)", self.lock_path)
                try:
                    os.unlink(self.lock_path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise ConfigError(f"output_dir: could not take the lock {self.lock_path}; another run is starting there")

    def clear_previous_run(self, checkpoints_dir: str, metrics_path: str) -> None:
        """``overwrite_output_dir: true``: the previous run's checkpoints, metrics, export and evaluations go."""
        for name in ("final", "best", "eval", "eval_steps"):
            path = os.path.join(self.path, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
        if os.path.isdir(checkpoints_dir):
            shutil.rmtree(checkpoints_dir)
        for path in (metrics_path, os.path.join(self.path, "eval_history.json")):
            if os.path.exists(path):
                os.unlink(path)

    def release(self) -> None:
        if self._held:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_output_dir(cfg) -> None:
    """``output_dir`` is writable, not in use by a live run, and not another run's unless resuming or
    ``overwrite_output_dir``; ConfigError naming the key otherwise. Reads only (``run --check`` too)."""
    path = cfg.resolve_path(cfg.output_dir)
    out = OutputDir(path)
    out.check_usable()
    holder = out.holder()
    if holder is not None:
        raise ConfigError(f"output_dir: {path} is in use by another run ({holder}); wait for it, or choose "
                          "another output_dir")
    out.check_fresh_or_resumable(cfg.resume_from_checkpoint, cfg.overwrite_output_dir,
                                 os.path.join(path, "checkpoints"))


def claim_output_dir(cfg, dist: DistInfo) -> OutputDir:
    """Rank 0 locks ``output_dir`` (and clears it under ``overwrite_output_dir``, and puts back a
    ``final``/``best`` a kill left half-replaced); every rank learns whether that worked, so that none
    waits in a collective for a rank that stopped. Release the returned lock when the run ends."""
    path = cfg.resolve_path(cfg.output_dir)
    out, error = OutputDir(path), None
    if dist.is_main:
        try:
            out.acquire()
            if cfg.overwrite_output_dir and cfg.resume_from_checkpoint is False:
                out.clear_previous_run(os.path.join(path, "checkpoints"), os.path.join(path, "metrics.jsonl"))
            for name in ("final", "best"):
                recover_directory(os.path.join(path, name))
        except (ConfigError, OSError) as e:
            out.release()
            error = e
    if all_reduce_mean([0.0 if error else 1.0], dist)[0] < 1.0:
        raise error or ConfigError(f"output_dir: {path} could not be claimed by rank 0")
    return out


#: what a training run creates inside its ``output_dir`` and no other command may write into
RUN_OWNED = ("checkpoints", "final", "best")


def _run_owned(folder: str) -> Optional[str]:
    """What ``folder`` is when a training run owns it (a phrase), or None."""
    name, parent = os.path.basename(folder), os.path.dirname(folder)
    in_checkpoints = os.path.basename(parent) == "checkpoints" and re.match(r"^\.?checkpoint-\d+(\.tmp|\.old)?$", name)
    has_state = os.path.isfile(os.path.join(folder, "state.json"))
    if in_checkpoints or (has_state and any(os.path.isfile(os.path.join(folder, n))
                                            for n in ("manifest.json", "trainable.safetensors"))):
        return "a training checkpoint"
    # the parent is a run's output_dir (its own entries, not the folder being asked about, tell)
    run_dir = (any(os.path.exists(os.path.join(parent, n)) for n in ("config.yaml", LOCK, "metrics.jsonl"))
               or (name.split(".")[0] != "checkpoints" and os.path.isdir(os.path.join(parent, "checkpoints"))))
    if name in RUN_OWNED and run_dir:
        return f"a training run's {name}/"
    if name.endswith((".tmp", ".old")) and name.split(".")[0] in RUN_OWNED and run_dir:
        return f"a training run's {name.split('.')[0]}/ being replaced"
    return None


def check_command_output(path: str, key: str = "--out") -> str:
    """``path`` (the absolute form is returned) may be a command's output directory: not an existing
    file, not inside a training checkpoint or a run's ``checkpoints/``, ``final/`` or ``best/`` (writing
    there would break a checkpoint's manifest, so that a resume skips it, or mix files into an export),
    and writable. ValueError naming ``key`` otherwise; reads only, before anything slow loads."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{key}: {path} is an existing file; give a directory (it is created if missing)")
    folder = path
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{key}: {path} cannot be created ({folder} is a file); give another directory")
    real = os.path.realpath(path)
    probe = real
    while True:
        owned = _run_owned(probe)
        if owned is not None:
            raise ValueError(f"{key}: {path} is inside {owned} ({probe}); a command writing there would damage it "
                             "(a resume skips a checkpoint whose files changed); choose a directory outside it")
        if os.path.dirname(probe) == probe:
            break
        probe = os.path.dirname(probe)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{key}: {path} is not writable ({folder} is read-only for this user); choose another "
                              "directory")
    return path


# --------------------------------------------------------------------------- metrics


def finite_or_none(value):
    """A number for JSON: non-finite floats become None (written as ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line is dropped with a warning."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    # a file that does not end in a newline ends in a torn line (each record is written with its newline)
    torn = len(lines) if not raw.endswith(b"\n") and lines[-1].strip() else None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record (an object with 'step')")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = " ".join(str(e).split())
            if number == torn:
                log.warning("%s: dropping the torn last line %d (an interrupted write): %s", path, number, reason)
                break
            raise ValueError(f"{path}: line {number} is not valid metrics JSON ({reason}); "
                             "fix or delete that line") from None
        records.append(record)
    return records


class MetricsWindow:
    """Averages the records of ``every`` optimizer steps into one row (``logging_steps``).

    Numbers are averaged over the steps where they are finite (``null`` when none
    is); ``updated`` counts the steps that updated the weights; counters that only
    grow (``skipped_*`` totals) and ``step`` take the window's last value.
    """

    LAST = ("step", "skipped_nonfinite", "skipped_no_reference")

    def __init__(self, every: int):
        self.every = every
        self.pending: list[dict] = []

    def add(self, record: dict) -> Optional[dict]:
        self.pending.append(record)
        if len(self.pending) >= self.every:
            return self.flush()
        return None

    def flush(self) -> Optional[dict]:
        if not self.pending:
            return None
        rows, self.pending = self.pending, []
        if len(rows) == 1 and self.every == 1:
            return dict(rows[0])
        out: dict = {}
        for key in rows[-1]:
            values = [r.get(key) for r in rows]
            if key in self.LAST:
                out[key] = values[-1]
            elif key == "updated":
                out[key] = sum(bool(v) for v in values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values):
                finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
                out[key] = sum(finite) / len(finite) if finite else None
                if key == "skipped_samples":
                    out[key] = int(sum(v for v in values if v is not None))
            else:
                out[key] = values[-1]
        out["logged_steps"] = len(rows)
        return out


class MetricsLog:
    """``metrics.jsonl`` (one object per logged step); each row's numbers also go to ``trackers``.

    ``trackers``: a :class:`rewardfl.training.trackers.Trackers` (or None: the file only). The
    caller that built it closes it (it also carries the sample videos).
    """

    def __init__(self, output_dir: str, enabled: bool, resume_step: Optional[int] = None, trackers=None):
        """``resume_step``: the step of the checkpoint the run resumed from (its rows up to it are kept);
        None: the run starts from nothing, and rows an earlier run left go."""
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.trackers = trackers
        if not enabled:
            return
        self._truncate_after(resume_step)

    def _truncate_after(self, step: Optional[int]) -> None:
        """Drop records past ``step`` (and a torn last line): a resumed run rewrites the steps after
        its checkpoint; a run started over (None) rewrites them all."""
        if not os.path.exists(self.path):
            return
        records = read_metrics(self.path)
        keep = [r for r in records if step is not None and r["step"] <= step]
        if step is None and records:
            log.warning("%s: dropping the %d rows of an earlier run that saved no checkpoint (this run starts over)",
                        self.path, len(records))
        with atomic_write(self.path) as f:
            f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: finite_or_none(v) for k, v in record.items()}
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)  # one write: a crash leaves at most a torn last line, which read drops
            f.flush()
        if self.trackers is not None:
            self.trackers.log_scalars(record["step"], record)  # numbers only; None (non-finite) skipped

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def close(self):
        """Nothing to release: each row is written and closed; ``trackers`` are their builder's to close."""


# --------------------------------------------------------------------------- videos and the curve


class VideoWriter:
    """Writes sample videos as mp4 on a background thread (training does not wait on encoding);
    :meth:`close` waits for them and raises the first write's error (a full disk: an ``OSError`` naming
    the file)."""

    def __init__(self, fps: int = 16):
        self.fps = fps
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def submit(self, path: str, video: torch.Tensor, reference: Optional[torch.Tensor] = None) -> None:
        """``video`` (3, F, H, W) in [-1, 1]; ``reference`` (F, 3, H, W) in [-1, 1] shown on the left."""
        frames = _to_uint8(video.detach().float().cpu().permute(1, 2, 3, 0))  # (F, H, W, 3)
        if reference is not None:
            ref = _to_uint8(reference.detach().float().cpu().permute(0, 2, 3, 1))[: frames.shape[0]]
            if ref.shape == frames.shape:
                frames = np.concatenate([ref, frames], axis=2)
        t = threading.Thread(target=self._write, args=(path, frames), daemon=True)
        t.start()
        self.threads.append(t)

    def _write(self, path: str, frames: np.ndarray) -> None:
        try:
            _write_mp4(path, frames, self.fps)
        except BaseException as e:  # raised again by close(), in the caller's thread
            self.errors.append(e)

    def close(self):
        for t in self.threads:
            t.join()
        self.threads = []
        if self.errors:
            error, self.errors = self.errors[0], []
            raise error


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """``frames`` ``(F, H, W, 3)`` uint8 as an H.264 mp4 at ``path``: written under a temporary name and
    renamed only once ffmpeg reads all ``F`` frames back (ffmpeg reports a full disk on its stderr and
    exits; imageio does not raise, and would leave a truncated file). An incomplete write is an
    ``OSError`` naming ``path`` (ENOSPC when its file system is nearly full)."""
    import imageio.v2 as imageio
    import imageio_ffmpeg

    with atomic_path(path, ".mp4") as tmp:
        # yuv444p: no chroma subsampling, so odd sizes work; macro_block_size=1 keeps small frames unpadded
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                pixelformat="yuv444p") as w:
            for frame in frames:
                w.append_data(frame)
        try:
            complete = os.path.getsize(tmp) > 0 and imageio_ffmpeg.count_frames_and_secs(tmp)[0] == len(frames)
        except (RuntimeError, OSError):
            complete = False
        if not complete:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free
            code = errno.ENOSPC if free < 64 * 2**20 else errno.EIO
            raise OSError(code, os.strerror(code) if code == errno.ENOSPC else "ffmpeg wrote an incomplete video", path)


def plot_reward_curve(records: list[dict], path: str) -> None:
    """The training reward (the weighted total of a reward list), each listed reward's own score
    (``reward/<label>/score``), the evaluations' ``eval/reward_score`` and the loss, over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]  # evaluation rows (eval_steps) have no loss
    evals = [r for r in records if r.get("eval/reward_score") is not None]

    def series(rows, key):
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    steps = [r["step"] for r in train]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, series(train, "reward_score"), color="tab:blue", marker=".", label="reward score (total)")
    parts = sorted({k for r in train for k in r if k.startswith("reward/") and k.endswith("/score")})
    for key in parts:
        ax1.plot(steps, series(train, key), marker=".", alpha=0.7, label=key.removeprefix("reward/"))
    if evals:
        ax1.plot([r["step"] for r in evals], series(evals, "eval/reward_score"), color="tab:green", marker="o",
                 linestyle="--", label="held-out evaluation")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("reward score", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, series(train, "loss"), color="tab:red", alpha=0.6, label="loss")
    ax2.set_ylabel("loss", color="tab:red")
    if parts or evals:
        ax1.legend(loc="best", fontsize="small")
    ax1.set_title("reward feedback learning")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
