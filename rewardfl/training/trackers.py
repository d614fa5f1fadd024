"""Where a run's scalars, sample videos and images go besides ``metrics.jsonl``: TensorBoard, wandb.

``report_to`` (config key, a list) names the backends; :func:`build_trackers` opens them on
rank 0 and hands back one :class:`Trackers` that fans every call out to each of them. Other
ranks get an empty one: every method is a no-op there.

* ``tensorboard`` (the default): ``torch.utils.tensorboard.SummaryWriter`` under
  ``output_dir/tensorboard``. A run that starts at step ``s`` (0 fresh, the checkpoint's step
  on resume) hides the events a previous run wrote past ``s`` (``purge_step``), as
  ``metrics.jsonl`` drops its rows past ``s``. Videos are animated GIFs in the Images tab,
  encoded here with Pillow (torch's ``add_video`` needs moviepy 1.x).
* ``wandb`` (extra: ``pip install "rewardfl[wandb]"``): one wandb run whose files live under
  ``output_dir/wandb``; ``WANDB_MODE=offline`` (and every other ``WANDB_*`` variable) is wandb's
  own. The run id is kept in ``output_dir/wandb_run_id.txt``: a run resumed from a checkpoint
  continues that wandb run; a run that starts at step 0 starts a new one. Videos are mp4.

Steps are optimizer steps. Images and videos are (3, H, W) / (3, F, H, W) floats in [-1, 1]
(images may also be (H, W, 3) uint8 in [0, 255]).
"""

from __future__ import annotations

import configparser
import io
import logging
import math
import netrc
import numbers
import os
import secrets
import string
import tempfile
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch

from rewardfl.config import REPORT_TO as KNOWN_TRACKERS
from rewardfl.config import ConfigError
from rewardfl.fileio import atomic_write

from .outputs import _to_uint8, _write_mp4

log = logging.getLogger("rewardfl")

__all__ = ["Trackers", "build_trackers", "check_report_to", "wandb_credentials_problem", "wandb_run_id", "KNOWN_TRACKERS", "WANDB_RUN_ID_FILE"]

WANDB_INSTALL = 'pip install "rewardfl[wandb]"'
WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def check_report_to(report_to, credentials: bool = True) -> None:
    """``report_to`` is a list of known tracker names whose packages import (and, with ``credentials``,
    wandb finds its credentials or runs offline: :func:`wandb_credentials_problem`); ConfigError (a
    ValueError) naming the key otherwise. Cheap enough for ``run --check``: wandb is imported only when
    named."""
    if isinstance(report_to, str) or not all(isinstance(n, str) for n in report_to):
        raise ConfigError(f"report_to: expected a list of names from {', '.join(KNOWN_TRACKERS)}, got {report_to!r}")
    for i, name in enumerate(report_to):
        if name not in KNOWN_TRACKERS:
            raise ConfigError(f"report_to[{i}]: unknown {name!r}; known: {', '.join(KNOWN_TRACKERS)}")
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"report_to: wandb is not installed; install it with {WANDB_INSTALL}, "
                              "or remove wandb from report_to") from None
        problem = wandb_credentials_problem() if credentials else None
        if problem is not None:
            raise ConfigError(f"report_to: wandb {problem}; run `wandb login` or set WANDB_API_KEY, or export "
                              "WANDB_MODE=offline (upload later with `wandb sync`), or remove wandb from report_to")


def wandb_credentials_problem(environ=None) -> Optional[str]:
    """Why ``wandb.init`` would stop for want of credentials (a phrase), or None: where wandb finds them
    (``WANDB_MODE`` offline/disabled, ``WANDB_API_KEY``, an identity token file, the ``api_key`` or
    ``mode`` of its settings file, the ``.netrc`` entry ``wandb login`` writes for the server's host)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or \
            env.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return None
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    config_dir = env.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(os.path.join(config_dir, "settings"))
        default = settings["default"] if settings.has_section("default") else {}
    except (configparser.Error, OSError, UnicodeDecodeError):
        default = {}
    if default.get("api_key") or default.get("mode", "").lower() in ("offline", "disabled", "dryrun"):
        return None
    base_url = env.get("WANDB_BASE_URL") or default.get("base_url") or "https://api.wandb.ai"
    host = urlparse(base_url).hostname or base_url
    home = os.path.expanduser("~")
    paths = [env["NETRC"]] if env.get("NETRC") else [os.path.join(home, n) for n in (".netrc", "_netrc")]
    for path in paths:
        try:
            if netrc.netrc(path).authenticators(host):
                return None
        except (OSError, netrc.NetrcParseError):
            continue
    return (f"has no credentials for {host} here (no WANDB_API_KEY, no `wandb login` entry in "
            f"{paths[0]}) and WANDB_MODE is not offline: the run would stop once the model has loaded")


def build_trackers(report_to, output_dir: str, run_config: dict, is_main: bool, run_name: Optional[str] = None,
                   resume_step: int = 0) -> "Trackers":
    """The trackers ``report_to`` names, open on rank 0 (``is_main``); no-ops on other ranks.

    ``run_config``: the run's settings (plain JSON-able values) shown by wandb; ``run_name``: wandb's
    display name; ``resume_step``: the optimizer step the run starts from (0 fresh, else the
    resumed checkpoint's step). Every rank validates ``report_to``, so all fail alike.
    """
    check_report_to(report_to, credentials=False)  # the trainer checked them before the model loaded
    if not is_main:
        return Trackers([])
    backends = []
    for name in dict.fromkeys(report_to):  # a name given twice opens once
        if name == "tensorboard":
            tb = _TensorBoard.open(output_dir, resume_step)
            if tb is not None:
                backends.append(tb)
        elif name == "wandb":
            backends.append(_Wandb(output_dir, run_config, run_name, resume_step))
    return Trackers(backends)


class Trackers:
    """Every open backend behind one call; an empty one (other ranks, ``report_to: []``) does nothing."""

    def __init__(self, backends: list):
        self.backends = backends

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log_scalars(self, step: int, values: dict) -> None:
        """Real numbers of ``values`` at ``step``; None, bools, non-numbers, non-finite values and
        the key ``step`` itself are skipped."""
        if not self.backends:
            return
        clean = {k: float(v) for k, v in values.items()
                 if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            for b in self.backends:
                b.log_scalars(int(step), clean)

    def log_video(self, tag: str, step: int, video: torch.Tensor, fps: int = 16) -> None:
        """``video`` (3, F, H, W) float in [-1, 1]; ``fps`` frames per second of playback."""
        if not self.backends:
            return
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"log_video: expected a (3, F, H, W) video, got shape {tuple(video.shape)}")
        frames = _to_uint8(video.detach().float().cpu().permute(1, 2, 3, 0))  # (F, H, W, 3) uint8
        for b in self.backends:
            b.log_video(tag, int(step), frames, int(fps))

    def log_image(self, tag: str, step: int, image) -> None:
        """``image`` (3, H, W) float in [-1, 1], or (H, W, 3) uint8 in [0, 255] (tensor or array)."""
        if not self.backends:
            return
        hwc = _image_hwc_uint8(image)
        for b in self.backends:
            b.log_image(tag, int(step), hwc)

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for b in backends:
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _image_hwc_uint8(image) -> np.ndarray:
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image.detach().cpu()
    if x.ndim == 3 and x.dtype == torch.uint8 and x.shape[-1] == 3:
        return x.numpy()
    if x.ndim == 3 and x.is_floating_point() and x.shape[0] == 3:
        return _to_uint8(x.float().permute(1, 2, 0))
    raise ValueError(f"log_image: expected a (3, H, W) float image in [-1, 1] or an (H, W, 3) uint8 image, "
                     f"got shape {tuple(x.shape)} {x.dtype}")


# --------------------------------------------------------------------------- TensorBoard


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, output_dir: str, resume_step: int) -> Optional["_TensorBoard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("report_to: tensorboard is not installed, so no TensorBoard logs are written; "
                        "install it with pip install tensorboard")
            return None
        # purge_step: TensorBoard hides what an earlier run here logged from this step on
        return cls(SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=int(resume_step) + 1))

    def log_scalars(self, step, values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_video(self, tag, step, frames, fps):
        from tensorboard.compat.proto.summary_pb2 import Summary

        _, h, w, c = frames.shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=_gif(frames, fps))
        # what SummaryWriter.add_video writes, without its moviepy 1.x encoder
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def log_image(self, tag, step, hwc):
        self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def close(self):
        self.writer.close()


def _gif(frames: np.ndarray, fps: int) -> bytes:
    """An endlessly looping animated GIF of ``frames`` (F, H, W, 3) uint8 (256 colours a frame)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


# --------------------------------------------------------------------------- wandb


def wandb_run_id(output_dir: str, resume_step: int) -> str:
    """The wandb run id for a run in ``output_dir``: the one in ``wandb_run_id.txt`` when resuming
    (``resume_step > 0``), else a new one, written there for the next resume."""
    path = os.path.join(output_dir, WANDB_RUN_ID_FILE)
    if resume_step > 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id form
    with atomic_write(path) as f:
        f.write(run_id + "\n")
    return run_id


class _Wandb:
    name = "wandb"

    def __init__(self, output_dir, run_config, run_name, resume_step):
        import wandb

        self.wandb = wandb
        os.makedirs(os.path.join(output_dir, "wandb"), exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "rewardfl", dir=output_dir,
                              id=wandb_run_id(output_dir, resume_step), resume="allow", name=run_name,
                              config=dict(run_config or {}))

    def log_scalars(self, step, values):
        self.run.log(values, step=step)

    def log_video(self, tag, step, frames, fps):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "video.mp4")
            _write_mp4(path, frames, fps)
            with open(path, "rb") as f:
                data = io.BytesIO(f.read())
        self.run.log({tag: self.wandb.Video(data, format="mp4")}, step=step)

    def log_image(self, tag, step, hwc):
        self.run.log({tag: self.wandb.Image(hwc)}, step=step)

    def close(self):
        self.run.finish()
