"""A folder of the user's videos -> the ``metadata.csv`` the trainer reads, every video checked.

For each video file under the folder (recursively, in natural order), :func:`prepare_videos`:

1. reads its frame count, size and fps (ffmpeg);
2. decodes the first ``num_frames`` frames as training will (``rewardfl.data.frames_of``): a
   video that ffmpeg cannot read, or with fewer frames, is skipped;
3. resizes the first frame as training will (``target_size``, ``resize_and_crop``) and asks the
   reward whether it can be a reference (``Reward.reference_problem``; for ``face_identity``:
   exactly one face, large enough for the recognizer);
4. writes the CSV (``video,prompt``, paths relative to the CSV's folder) atomically at the end.

Every video's result is appended to a state file beside the CSV (``OUT.prepare.jsonl``, one
JSON line per video, flushed as it goes), so an interrupted run picks up where it stopped: a
video whose size and mtime are unchanged is not read again. A state written with other settings
(frames, size, reward) is started over.

Prompts: ``prompt`` (one for every video), ``prompts`` (a CSV ``video,prompt`` with paths
relative to the video folder, or bare file names), else a ``NAME.txt`` beside the video, else
empty.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
from typing import Callable, Iterable, Optional

import torch

from ..fileio import atomic_write, read_utf8
from . import _natural_key, decoder_reason, frames_of, resize_and_crop, target_size

__all__ = ["VIDEO_EXTENSIONS", "VideoResult", "PrepareSummary", "find_videos", "probe_video", "read_prompts",
           "prepare_videos", "state_path"]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")

#: bump when the same video and settings would get another result
STATE_VERSION = 1


@dataclasses.dataclass
class VideoResult:
    """One video's outcome: ``reason`` None when it goes into the CSV; its kind is the text
    before the first colon (``no face``, ``several faces``, ``too few frames``, ``unreadable``)."""

    video: str  # relative to the video folder, "/" separated
    reason: Optional[str]
    frames: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None
    prompt: str = ""
    size_bytes: int = 0
    mtime_ns: int = 0

    @property
    def kind(self) -> Optional[str]:
        return None if self.reason is None else self.reason.split(":", 1)[0]


@dataclasses.dataclass
class PrepareSummary:
    csv_path: str
    kept: list
    skipped: list
    reused: int  # results read back from the state file of an earlier run

    def line(self) -> str:
        kinds = collections.Counter(r.kind for r in self.skipped)
        detail = f" ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})" if kinds else ""
        resumed = f"; {self.reused} read from the earlier run's state" if self.reused else ""
        return (f"wrote {self.csv_path}: {len(self.kept)} video{'s' if len(self.kept) != 1 else ''}; "
                f"skipped {len(self.skipped)}{detail}{resumed}")


def state_path(csv_path: str) -> str:
    return csv_path + ".prepare.jsonl"


def find_videos(folder: str, exclude: Iterable[str] = ()) -> list[str]:
    """Video files under ``folder`` (by extension, hidden files and folders left out), relative
    ``/``-separated paths in natural order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"VIDEO_DIR: not a folder: {folder}")
    exclude = {os.path.abspath(p) for p in exclude}
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS) or os.path.abspath(path) in exclude:
                continue
            found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    return sorted(found, key=_natural_key)


def probe_video(path: str) -> tuple[int, int, int, float]:
    """``(frames, width, height, fps)`` of a video file, as ffmpeg reads it (frames counted by
    decoding, the size after any rotation). Raises what the decoder raises."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", output_params=["-frames:v", "1"])
    try:
        meta = next(reader)
    finally:
        reader.close()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(path)
    width, height = meta["size"]
    return int(frames), int(width), int(height), float(meta.get("fps") or 0.0)


def read_prompts(path: str) -> dict[str, str]:
    """A prompts CSV (header ``video,prompt``) -> {video cell: prompt}."""
    text = read_utf8(path, "save the prompts file as UTF-8").removeprefix("\ufeff")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    rows = [r for r in rows if any(c.strip() for c in r)]
    header = [c.strip() for c in rows[0]] if rows else []
    if "video" not in header or "prompt" not in header:
        raise ValueError(f"--prompts {path}: needs a header line 'video,prompt' and one line per video "
                         f"(found: {', '.join(header) or 'an empty file'})")
    v, p = header.index("video"), header.index("prompt")
    prompts = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"--prompts {path}:{line}: {len(row)} fields but the header has {len(header)}; "
                             "quote prompts that contain commas")
        prompts[row[v].strip().replace(os.sep, "/")] = row[p]
    return prompts


def _prompt_for(video: str, folder: str, prompt: Optional[str], prompts: Optional[dict]) -> Optional[str]:
    """The video's prompt; None when a prompts file is given and does not list it."""
    if prompt is not None:
        return prompt
    if prompts is not None:
        if video in prompts:
            return prompts[video]
        return prompts.get(os.path.basename(video))
    sidecar = os.path.join(folder, os.path.splitext(video)[0] + ".txt")
    return read_utf8(sidecar, "save it as UTF-8").strip() if os.path.isfile(sidecar) else ""


def check_video(path: str, *, num_frames: int, max_pixels: int, height: Optional[int], width: Optional[int],
                reference_problem: Callable[[torch.Tensor], Optional[str]]) -> VideoResult:
    """One video's :class:`VideoResult` (``video``/``prompt`` left for the caller)."""
    try:
        frames, w, h, fps = probe_video(path)
        _, decoded = frames_of(path, num_frames)
        try:
            first = next(decoded, None)
            count = 0 if first is None else 1 + sum(1 for _ in decoded)
        finally:
            decoded.close()
    except Exception as e:  # decoders raise many types
        return VideoResult("", f"unreadable: {decoder_reason(e)}")
    info = dict(frames=frames, width=w, height=h, fps=fps)
    if first is None:
        return VideoResult("", "unreadable: no frames", **info)
    if count < num_frames:
        return VideoResult("", f"too few frames: {count}, data.num_frames is {num_frames}", **info)
    size = target_size(first.shape[0], first.shape[1], max_pixels=max_pixels, height=height, width=width)
    frame = resize_and_crop(first, size).float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1], as training reads it
    return VideoResult("", reference_problem(frame), **info)


def _read_state(path: str, settings: dict) -> dict[str, VideoResult]:
    """Results of an earlier run with the same settings (a torn last line is ignored)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if header != {"settings": settings}:
        return {}
    results = {}
    for text in lines[1:]:
        try:
            r = VideoResult(**json.loads(text))
        except (json.JSONDecodeError, TypeError):
            continue  # the line being written when the run stopped
        results[r.video] = r
    return results


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def prepare_videos(folder: str, csv_path: str, *, num_frames: int, max_pixels: int, height: Optional[int] = None,
                   width: Optional[int] = None, reference_problem: Callable[[torch.Tensor], Optional[str]],
                   checker: str = "", prompt: Optional[str] = None, prompts: Optional[dict] = None,
                   progress: Optional[Callable[[Iterable], Iterable]] = None) -> PrepareSummary:
    """Check every video under ``folder`` and write ``csv_path`` (see the module docstring).

    ``reference_problem`` judges first frames ``(3, H, W)`` in [-1, 1] (``Reward.reference_problem``);
    ``checker`` names it in the state's settings (a run with another checker starts over);
    ``progress`` wraps the iteration over videos (e.g. ``tqdm``).
    """
    folder = os.path.abspath(folder)
    csv_path = os.path.abspath(csv_path)
    settings = {"version": STATE_VERSION, "num_frames": num_frames, "max_pixels": max_pixels, "height": height,
                "width": width, "checker": checker}
    state_file = state_path(csv_path)
    done = _read_state(state_file, settings)
    videos = find_videos(folder)
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    results, reused = [], 0
    # appended as it goes (a later line for the same video wins); other settings start it over
    with open(state_file, "a" if done else "w", encoding="utf-8") as state:
        if not done:
            state.write(json.dumps({"settings": settings}) + "\n")
        elif state.tell() and not _ends_with_newline(state_file):
            state.write("\n")  # end the line torn by the interruption
        for video in (progress(videos) if progress else videos):
            path = os.path.join(folder, video)
            st = os.stat(path)
            text = _prompt_for(video, folder, prompt, prompts)
            old = done.get(video)
            if old is not None and (old.size_bytes, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
                result, reused = old, reused + 1
            else:
                result = check_video(path, num_frames=num_frames, max_pixels=max_pixels, height=height, width=width,
                                     reference_problem=reference_problem)
                result.video, result.size_bytes, result.mtime_ns = video, st.st_size, st.st_mtime_ns
            result.prompt = text or ""
            if text is None and result.reason is None:
                result.reason = "no prompt: the prompts file does not list it"
            results.append(result)
            if result is not old:
                state.write(json.dumps(dataclasses.asdict(result)) + "\n")
                state.flush()
    kept = [r for r in results if r.reason is None]
    if not kept:
        raise ValueError(f"VIDEO_DIR {folder}: no usable video among {len(results)} found "
                         f"({', '.join(VIDEO_EXTENSIONS)}); the state file {state_file} lists why each was skipped")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["video", "prompt"])
    csv_folder = os.path.dirname(csv_path)
    for r in kept:
        writer.writerow([os.path.relpath(os.path.join(folder, r.video), csv_folder).replace(os.sep, "/"), r.prompt])
    with atomic_write(csv_path) as f:
        f.write(out.getvalue())
    return PrepareSummary(csv_path, kept, [r for r in results if r.reason is not None], reused)


def summary_lines(summary: PrepareSummary) -> list[str]:
    """What the command prints: each skipped video with its reason, then the summary line."""
    return [f"skipped {r.video}: {r.reason}" for r in summary.skipped] + [summary.line()]
