"""The training videos: DiffSynth-Studio's ``metadata.csv`` format read into clips.

The CSV has a header line with at least the columns ``video`` and ``prompt``::

    video,prompt
    videos/astronaut_zoom_in.mp4,"a woman in a spacesuit smiles, the camera slowly zooms in"
    frames/clip_07,a man turns his head        <- a folder of frames
    photos/face.jpg,a portrait                 <- a single image: a one-frame reference

``video`` is a path relative to the CSV's folder (absolute paths work too). It
names one of:

* a video file (mp4, mov, webm, ... anything ffmpeg reads), decoded with
  imageio-ffmpeg; only the first ``num_frames`` frames are decoded;
* a folder of frames: its image files (``IMAGE_EXTENSIONS``) in natural order
  (``f2.png`` before ``f10.png``), the first ``num_frames`` of them;
* a single image: a **one-frame** clip ``(1, 3, H, W)`` whatever ``num_frames``
  is. It is a reference (its frame conditions generation and gives the face to
  match), not a still video; nothing is repeated.

A video file or folder with fewer than ``num_frames`` frames is an error naming
its CSV line (never silently shortened). Extra columns are passed through as
strings. Empty lines are skipped; an empty ``prompt`` is allowed.

Each frame is resized (bilinear, antialiased, aspect kept) to cover the target
size and centre-cropped to it, as DiffSynth-Studio's ``ImageCropAndResize``
does. The target is ``height`` x ``width`` when given; otherwise the first
frame's size scaled down (never up) so that ``H * W <= max_pixels``, then each
side rounded down to a multiple of 16.

Errors name the CSV file and the line as an editor shows it (``path:LINE:``,
1-based, the header is line 1, so the first data row is line 2), what is wrong
and how to fix it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import read_utf8

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoDataset",
    "collate",
    "load_clip",
    "frames_of",
    "decoder_reason",
    "target_size",
    "resize_and_crop",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

REQUIRED_COLUMNS = ("video", "prompt")
# keys of an item; a CSV column with one of these names would be shadowed
ITEM_KEYS = ("video", "first_frame", "prompt", "path", "sample_id", "index", "line")


# --------------------------------------------------------------------------- frames


def target_size(frame_height: int, frame_width: int, *, max_pixels: int,
                height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
    """``(H, W)`` of the clips made from frames of ``frame_height x frame_width``.

    ``height`` x ``width`` when both are given; otherwise the frame size scaled
    down (never up) to at most ``max_pixels`` pixels, each side then rounded
    down to a multiple of 16 (DiffSynth-Studio's rule). Raises ValueError when
    that leaves a side below 16.
    """
    if height is not None and width is not None:
        return int(height), int(width)
    h, w = frame_height, frame_width
    if h * w > max_pixels:
        scale = math.sqrt(h * w / max_pixels)
        h, w = int(h / scale), int(w / scale)
    h, w = h // 16 * 16, w // 16 * 16
    if h < 16 or w < 16:
        raise ValueError(f"frames of {frame_width}x{frame_height} (WxH) give a {w}x{h} clip under "
                         f"max_pixels={max_pixels} with sides rounded down to multiples of 16; "
                         "use larger frames, a larger data.max_pixels, or set data.height and data.width")
    return h, w


def resize_and_crop(frame: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """One RGB frame ``(H0, W0, 3)`` uint8 -> ``(3, H, W)`` uint8 in [0, 255].

    Scales (bilinear, antialiased, aspect kept; matches PIL's ``BILINEAR`` to
    within 1 level) so the frame covers ``size = (H, W)``, then crops the centre.
    """
    h, w = size
    h0, w0 = frame.shape[:2]
    scale = max(h / h0, w / w0)
    rh, rw = max(h, round(h0 * scale)), max(w, round(w0 * scale))
    x = torch.from_numpy(np.require(frame, np.uint8, ["C", "W"])).permute(2, 0, 1)[None]  # W: torch wants writable
    if (rh, rw) != (h0, w0):
        # uint8 channels-last is torch's fast path and rounds like PIL
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(rh, rw),
                          mode="bilinear", antialias=True, align_corners=False)
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    return x[0, :, top:top + h, left:left + w]


class _ClipError(ValueError):
    """A problem :func:`load_clip` found itself (as opposed to a decoder's exception)."""


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_image(path: str) -> np.ndarray:
    """An image file as RGB ``(H, W, 3)`` uint8, EXIF rotation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _frame_files(folder: str) -> list[str]:
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _iter_video_file(path: str, num_frames: int) -> Iterator[np.ndarray]:
    """The first ``num_frames`` frames of a video file, RGB ``(H, W, 3)`` uint8."""
    import imageio_ffmpeg

    # "-frames:v" stops ffmpeg after the frames we use: long videos cost no more than short ones
    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", output_params=["-frames:v", str(num_frames)])
    try:
        meta = next(reader)
        w, h = meta["size"]  # the size after ffmpeg applied any rotation
        for raw in reader:
            yield np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
    finally:
        reader.close()


def decoder_reason(e: BaseException) -> str:
    """The cause of a decoder's exception in one short line.

    imageio-ffmpeg's messages are a summary line, then ``=== stderr ===`` and all of ffmpeg's
    stderr, which starts with its version banner (the first 300 characters are all banner). The
    reason is in ffmpeg's log lines, ``[in#0 @ 0x55...] moov atom not found``: those, without the
    ``[...]`` prefix, else ffmpeg's last line.
    """
    summary, _, stderr = str(e).partition("=== stderr ===")
    summary = " ".join(summary.split()).rstrip(":")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    logged = [m.group(1) for ln in lines if (m := re.match(r"\[[^\]]* @ 0x[0-9a-f]+\] (.*)", ln))]
    reasons = list(dict.fromkeys(logged or lines[-1:]))  # unique, in order
    if reasons:
        summary = f"{summary}: ffmpeg says: {'; '.join(reasons)}" if summary else f"ffmpeg says: {'; '.join(reasons)}"
    return f"{type(e).__name__}: {summary[:300]}" if summary else type(e).__name__


def frames_of(path: str, num_frames: int) -> tuple[str, Iterator[np.ndarray]]:
    """``(kind, frames)``: up to ``num_frames`` uint8 ``(H, W, 3)`` RGB frames of a video file, a folder
    of frames or an image, read lazily (a shorter clip just gives fewer); kind is 'video file',
    'folder' or 'image'."""
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files:
            raise _ClipError(f"folder has no image files ({', '.join(IMAGE_EXTENSIONS)}): {path}")
        return "folder", (_read_image(f) for f in files[:num_frames])
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return "image", iter([_read_image(path)])
    return "video file", _iter_video_file(path, num_frames)


def load_clip(path: str, *, num_frames: int, max_pixels: int,
              height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
    """The first ``num_frames`` frames of ``path``: ``(F, 3, H, W)`` float32 in [-1, 1].

    ``path`` is a video file, a folder of frames or a single image (then
    ``F = 1``); sizes as in :func:`target_size`. Raises FileNotFoundError for a
    missing path, ValueError for an unreadable or too-short one (messages name
    the path; :class:`VideoDataset` adds the CSV line).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"not found: {path}")
    kind, frames = "video file", iter(())
    clip = None
    count = 0
    try:
        kind, frames = frames_of(path, num_frames)
        for frame in frames:
            if clip is None:
                try:
                    size = target_size(frame.shape[0], frame.shape[1], max_pixels=max_pixels,
                                       height=height, width=width)
                except ValueError as e:
                    raise _ClipError(str(e)) from None
                first_shape = frame.shape
                clip = torch.empty((1 if kind == "image" else num_frames, 3, *size), dtype=torch.uint8)
            elif frame.shape != first_shape:
                raise _ClipError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]} (WxH) but frame 0 is "
                                 f"{first_shape[1]}x{first_shape[0]}; all frames of a clip need one size")
            clip[count] = resize_and_crop(frame, size)
            count += 1
    except _ClipError:
        raise
    except Exception as e:  # decoder errors come in many types (OSError, RuntimeError, PIL's ...)
        raise ValueError(f"cannot read {kind} {path}: {decoder_reason(e)} "
                         "(check that the file is a valid video/image, e.g. play it or re-encode it "
                         "with ffmpeg -i IN -c:v libx264 OUT.mp4)") from e
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    if clip is None:
        raise ValueError(f"{kind} has no frames: {path} (re-encode it, or remove the row)")
    if count < clip.shape[0]:
        raise ValueError(f"{kind} has only {count} frame{'s' if count != 1 else ''} but data.num_frames is "
                         f"{num_frames}: {path} (use a longer clip, a smaller data.num_frames (4k+1), "
                         "or remove the row)")
    return clip.float().div_(127.5).sub_(1.0)  # uint8 [0, 255] -> float32 [-1, 1]


# --------------------------------------------------------------------------- the CSV


class VideoDataset(torch.utils.data.Dataset):
    """Rows of a DiffSynth-Studio ``metadata.csv`` as clips (see the module docstring).

    ``dataset[i]`` is a dict:

    * ``video``: ``(F, 3, H, W)`` float32 in [-1, 1]; ``F = num_frames``, or 1
      for a single-image row;
    * ``first_frame``: ``(3, H, W)``, ``video[0]`` (it conditions generation);
    * ``prompt``: str; ``path``: the absolute path of the video/folder/image;
    * ``sample_id``: the ``video`` cell as written (stable: a cache key);
    * ``index``: ``i``; ``line``: the row's line in the CSV (header = line 1);
    * every extra CSV column, as a str.

    Construction reads the CSV and checks that every file exists (fast: no
    decoding); frames are decoded on access and nothing is cached.
    """

    def __init__(self, metadata_path: str, *, num_frames: int, max_pixels: int,
                 height: Optional[int] = None, width: Optional[int] = None, key: str = "data.metadata_path"):
        """``key``: what the user gave the path as (``data.metadata_path``, ``data.eval_metadata_path``,
        ``--metadata``), for the error when it is not found."""
        # num_frames, height/width and max_pixels are validated where the config enters (config.validate)
        self.metadata_path = os.path.abspath(metadata_path)
        self.num_frames = num_frames
        self.max_pixels = max_pixels
        self.height = height
        self.width = width
        self.rows = _read_metadata(self.metadata_path, key)
        _check_files_exist(self.metadata_path, self.rows)

    @classmethod
    def from_config(cls, config) -> "VideoDataset":
        """From a :class:`rewardfl.config.TrainConfig` (``data.*`` keys, paths resolved)."""
        d = config.data
        if d.metadata_path is None:
            raise ValueError("data.metadata_path: not set; point it at a metadata.csv with video and prompt "
                             "columns (`python -m rewardfl.demo` builds the example dataset)")
        return cls(config.resolve_path(d.metadata_path), num_frames=d.num_frames, max_pixels=d.max_pixels,
                   height=d.height, width=d.width)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            video = load_clip(row["path"], num_frames=self.num_frames, max_pixels=self.max_pixels,
                              height=self.height, width=self.width)
        except (ValueError, FileNotFoundError) as e:
            error = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
            raise error(f"{self.metadata_path}:{row['line']}: video '{row['sample_id']}': {e}") from e
        extras = {k: v for k, v in row.items() if k not in ITEM_KEYS}
        return {"video": video, "first_frame": video[0], "prompt": row["prompt"], "path": row["path"],
                "sample_id": row["sample_id"], "index": index, "line": row["line"], **extras}


def _read_metadata(csv_path: str, key: str = "data.metadata_path") -> list[dict[str, Any]]:
    """Rows of the CSV as dicts: ``sample_id``, ``path``, ``prompt``, ``line`` and extra columns."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"{key}: file not found: {csv_path} (point it at a metadata.csv "
                                "with video and prompt columns)")
    folder = os.path.dirname(csv_path)
    how = "a header line 'video,prompt' and then one line per clip"
    text = read_utf8(csv_path, "save the CSV as UTF-8 (spreadsheets: 'CSV UTF-8')")
    text = text.removeprefix("\ufeff")  # a BOM from spreadsheets
    with io.StringIO(text, newline="") as f:  # newline="": the csv module handles line ends itself
        reader = csv.reader(f)
        header = None
        rows = []
        while True:
            line = reader.line_num + 1  # where the next record starts
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ValueError(f"{csv_path}:{line}: not valid CSV: {e} (check quotes: a field with commas "
                                 "must be in double quotes)") from e
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [name.strip() for name in record]
                missing = [c for c in REQUIRED_COLUMNS if c not in header]
                if missing:
                    raise ValueError(f"{csv_path}:{line}: missing column{'s' if len(missing) > 1 else ''} "
                                     f"{', '.join(missing)} in the header (found: {', '.join(header)}); "
                                     f"the file needs {how}")
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise ValueError(f"{csv_path}:{line}: column {', '.join(dupes)} appears twice in the header")
                shadowed = [c for c in header if c in ITEM_KEYS and c not in REQUIRED_COLUMNS]
                if shadowed:
                    raise ValueError(f"{csv_path}:{line}: column name{'s' if len(shadowed) > 1 else ''} "
                                     f"{', '.join(shadowed)} clash with the dataset's own item keys; rename them")
                continue
            if len(record) != len(header):
                raise ValueError(f"{csv_path}:{line}: {len(record)} fields but the header has {len(header)} "
                                 f"({', '.join(header)}); quote fields that contain commas")
            cells = dict(zip(header, record))
            video = cells.pop("video").strip()
            if not video:
                raise ValueError(f"{csv_path}:{line}: empty 'video' cell; give the clip's path relative to "
                                 f"{folder}")
            prompt = cells.pop("prompt")
            rows.append({"sample_id": video, "path": os.path.normpath(os.path.join(folder, video)),
                         "prompt": prompt, "line": line, **cells})
    if header is None:
        raise ValueError(f"{csv_path}: the file is empty; it needs {how}")
    if not rows:
        raise ValueError(f"{csv_path}: no data rows after the header; add one line per clip (video,prompt)")
    return rows


def _check_files_exist(csv_path: str, rows: Sequence[dict]) -> None:
    missing = [r for r in rows if not os.path.exists(r["path"])]
    if not missing:
        return
    first = missing[0]
    more = ""
    if len(missing) > 1:
        lines = ", ".join(str(r["line"]) for r in missing[1:6])
        more = f"; {len(missing) - 1} more row(s) too (line {lines}{', ...' if len(missing) > 6 else ''})"
    raise FileNotFoundError(f"{csv_path}:{first['line']}: video '{first['sample_id']}' not found: {first['path']} "
                            f"(paths in the video column are relative to the CSV's folder; fix the path or "
                            f"remove the row){more}")


# --------------------------------------------------------------------------- batches


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of B items for ``DataLoader(collate_fn=collate)``.

    ``video``: ``(B, F, 3, H, W)`` float32 in [-1, 1] (all items must have one
    shape); ``first_frame``: ``(B, 3, H, W)``; every other key: a list of B
    values (``prompt``, ``path``, ``sample_id``, ``index``, ``line``, extras).
    """
    if not items:
        raise ValueError("collate: empty batch")
    shapes = {tuple(item["video"].shape) for item in items}
    if len(shapes) > 1:
        described = ", ".join(f"'{item['sample_id']}' {tuple(item['video'].shape)}" for item in items)
        raise ValueError(f"cannot batch clips of different shapes (F, 3, H, W): {described}; set data.height and "
                         "data.width so every clip gets one size, use clips with at least data.num_frames frames "
                         "(single images give one frame), or set per_device_train_batch_size: 1")
    batch: dict[str, Any] = {
        "video": torch.stack([item["video"] for item in items]),
        "first_frame": torch.stack([item["first_frame"] for item in items]),
    }
    for key in items[0]:
        if key not in batch:
            batch[key] = [item.get(key) for item in items]
    return batch
