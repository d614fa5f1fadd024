"""The ``command`` reward: score videos with the user's own program or HTTP service.

For scorers that give no gradient (a VLM judge behind an endpoint, a detector's count, a script
over mp4 files). rewardfl writes the batch's videos to files and hands the scorer one JSON request:

``{"videos": [{"path": "/tmp/.../0.mp4", "prompt": "...", "sample_id": "...", "reference_path": "..."}]}``

* ``command``: a program run once per batch, the request on its standard input; it prints the
  response on its standard output and exits 0.
* ``url``: the request is POSTed (``Content-Type: application/json``); the response is the body
  of a 200 answer.

The response is ``{"scores": [s_0, s_1, ...]}``: one number per video, in the request's order;
``null`` for a video the scorer cannot score (the sample is then invalid and counted, like a video
without a face for the face reward). Each call has a ``timeout``; a failed call (a non-zero exit, a
timeout, a refused connection, an HTTP error, a response that is not that JSON or has the wrong
count) is tried again ``retries`` times, then training stops with one line naming the scorer and
what it did. Videos are mp4 (``video_format: mp4``, H.264, ``fps``) or folders of PNG frames
(``frames``: ``0000.png``, ... lossless), written under ``work_dir`` (default: a temporary folder
removed after the call; ``keep_videos: true`` keeps them).

The scores carry no gradient (``differentiable = False``): use the reward with a policy-gradient
algorithm, or with weight 0 in a reward list to log it beside a differentiable reward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import Reward, RewardOutput, SampleContext

__all__ = ["CommandReward", "ScorerError"]


class ScorerError(ValueError):
    """The user's scorer failed, timed out or answered outside the contract (a user error: one line)."""


def _to_uint8(videos: torch.Tensor) -> np.ndarray:
    """``(B, 3, F, H, W)`` in [-1, 1] -> ``(B, F, H, W, 3)`` uint8."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def _write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    # yuv444p: no chroma subsampling (odd sizes work); macro_block_size 1 keeps small frames unpadded
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv444p",
                                         macro_block_size=1, quality=8)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _write_frames(folder: str, frames: np.ndarray) -> None:
    import cv2

    os.makedirs(folder)
    for i, frame in enumerate(frames):
        if not cv2.imwrite(os.path.join(folder, f"{i:04d}.png"), frame[:, :, ::-1]):
            raise OSError(f"could not write {os.path.join(folder, f'{i:04d}.png')}")


class CommandReward(Reward):
    """Scores from a user's program or HTTP endpoint (see the module docstring for the contract)."""

    differentiable = False

    @dataclasses.dataclass
    class Options:
        #: the scorer as a program and its arguments (a list, or a string split like a shell does);
        #: it reads the JSON request on stdin and prints the JSON response
        command: Optional[Union[str, list]] = None
        #: or the scorer as an HTTP endpoint the JSON request is POSTed to
        url: Optional[str] = None
        #: how the videos are handed over: mp4 files, or folders of PNG frames (lossless)
        video_format: Literal["mp4", "frames"] = "mp4"
        #: frame rate of the mp4 files
        fps: int = 16
        #: seconds one call may take
        timeout: float = 600.0
        #: further tries after a failed call
        retries: int = 2
        #: seconds to wait before a retry
        retry_delay: float = 1.0
        #: where the videos are written (a fresh folder per call inside it); default: the system's temp
        work_dir: Optional[str] = None
        #: keep the written videos (default: removed after the call)
        keep_videos: bool = False
        #: the scorer's name in messages and logs (default: the program's name or the URL's host)
        name: Optional[str] = None

        def __post_init__(self):
            if (self.command is None) == (self.url is None):
                raise ConfigError("reward.command/reward.url: give exactly one: the scorer's command line, or the "
                                  "URL of its HTTP endpoint")
            if isinstance(self.command, str):
                self.command = shlex.split(self.command)
            if self.command is not None:
                if not self.command or not all(isinstance(a, str) for a in self.command):
                    raise ConfigError(f"reward.command: must be a non-empty command line (a string or a list of "
                                      f"strings), got {self.command!r}")
            if self.url is not None:
                parsed = urllib.parse.urlparse(self.url)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    raise ConfigError(f"reward.url: must be an http:// or https:// URL, got {self.url!r}")
            for key in ("timeout", "retry_delay"):
                value = getattr(self, key)
                if not math.isfinite(value) or value < 0 or (key == "timeout" and value == 0):
                    raise ConfigError(f"reward.{key}: must be a finite number of seconds "
                                      f"{'> 0' if key == 'timeout' else '>= 0'}, got {value}")
            if self.retries < 0:
                raise ConfigError(f"reward.retries: must be >= 0, got {self.retries}")
            if self.fps < 1:
                raise ConfigError(f"reward.fps: must be >= 1, got {self.fps}")

    def __init__(self, config=None, options: Optional["CommandReward.Options"] = None, **_runtime):
        if options is None:
            raise ConfigError("reward.command/reward.url: the command reward needs its scorer: give reward.command "
                              "or reward.url")
        self.options = options
        self.name = options.name or (os.path.basename(options.command[0]) if options.command
                                     else urllib.parse.urlparse(options.url).netloc)
        self.calls = 0

    @classmethod
    def check(cls, config, options) -> list[str]:
        if options.command is not None:
            program = options.command[0]
            found = shutil.which(program)
            if found is None:
                raise ConfigError(f"reward.command: program {program!r} not found (not a path to an executable, nor "
                                  "on PATH); give its full path")
            return [f"scorer  command {shlex.join([found] + list(options.command[1:]))}"]
        return [f"scorer  POST {options.url}"]

    # ------------------------------------------------------------------ the call

    def _write_videos(self, folder: str, videos: torch.Tensor) -> list[str]:
        paths = []
        for i, frames in enumerate(_to_uint8(videos)):
            if self.options.video_format == "mp4":
                path = os.path.join(folder, f"{i}.mp4")
                _write_mp4(path, frames, self.options.fps)
            else:
                path = os.path.join(folder, f"{i}")
                _write_frames(path, frames)
            paths.append(path)
        return paths

    def _call_once(self, request: bytes) -> bytes:
        o = self.options
        if o.command is not None:
            try:
                proc = subprocess.run(o.command, input=request, capture_output=True, timeout=o.timeout)
            except subprocess.TimeoutExpired:
                raise ScorerError(f"timed out after {o.timeout:g} s (reward.timeout)") from None
            except OSError as e:
                raise ScorerError(f"could not start {o.command[0]!r}: {e.strerror or e}") from None
            if proc.returncode != 0:
                tail = " ".join(proc.stderr.decode("utf-8", "replace").split())[-300:]
                raise ScorerError(f"exited with code {proc.returncode}" + (f": {tail}" if tail else ""))
            return proc.stdout
        req = urllib.request.Request(o.url, data=request, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=o.timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as e:
            raise ScorerError(f"answered HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ScorerError(f"could not be reached at {o.url}: {reason}") from None

    @staticmethod
    def _parse(raw: bytes, count: int) -> list[Optional[float]]:
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            snippet = " ".join(raw.decode("utf-8", "replace").split())[:200]
            raise ScorerError(f"did not answer JSON (got {snippet!r}); the contract is {{\"scores\": [...]}}") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise ScorerError("answered JSON without a \"scores\" list; the contract is {\"scores\": [...]}")
        if len(scores) != count:
            raise ScorerError(f"returned {len(scores)} scores for {count} videos; it must return one per video, in "
                              "the request's order")
        out = []
        for i, s in enumerate(scores):
            if s is None:
                out.append(None)
            elif isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s):
                out.append(float(s))
            else:
                raise ScorerError(f"score {i} is {s!r}; each score must be a finite number, or null for a video it "
                                  "cannot score")
        return out

    def score_files(self, entries: list[dict]) -> list[Optional[float]]:
        """Send one request for already written videos; the scores (None: not scorable)."""
        request = json.dumps({"videos": entries}).encode("utf-8")
        last = None
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(self.options.retry_delay)
            try:
                return self._parse(self._call_once(request), len(entries))
            except ScorerError as e:
                last = e
        tries = self.options.retries + 1
        raise ScorerError(f"reward scorer {self.name!r} failed {tries} time{'s' if tries > 1 else ''}: {last}")

    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        if videos.shape[0] != len(contexts):
            raise ValueError(f"command reward: {videos.shape[0]} videos but {len(contexts)} contexts")
        self.calls += 1
        if self.options.work_dir is not None:
            os.makedirs(self.options.work_dir, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f"call-{self.calls:06d}-", dir=self.options.work_dir)
        try:
            paths = self._write_videos(folder, videos)
            entries = [{"path": p, "prompt": c.prompt, "sample_id": c.sample_id, "reference_path": c.reference_path}
                       for p, c in zip(paths, contexts)]
            scores = self.score_files(entries)
        finally:
            if not self.options.keep_videos:
                shutil.rmtree(folder, ignore_errors=True)
        valid = torch.tensor([s is not None for s in scores], dtype=torch.bool)
        values = torch.tensor([0.0 if s is None else s for s in scores], dtype=torch.float32)
        return RewardOutput(values, valid, {"unscored": float((~valid).sum())})
