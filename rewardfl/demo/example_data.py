"""The example dataset: short, slow pan/zoom clips of real face photos, built on first use.

No photos or videos are committed: the photos come from the package registry
(``rewardfl.demo.assets``; ``skimage.data.astronaut()`` works too) and this module
renders them into ``OUT_DIR/videos/*.mp4`` plus ``OUT_DIR/metadata.csv``
(DiffSynth-Studio's format, read by :class:`rewardfl.data.VideoDataset`)::

    python -m rewardfl.demo.example_data data/example_video_dataset        # from rewardfl.demo.assets' photos
    python -m rewardfl.demo.example_data OUT_DIR photo1.jpg photo2.jpg@120,80,260,250

``PHOTO@x0,y0,x1,y1`` gives the face box in the photo's pixels; the clip is then
framed around the face (it fills about ``face_fraction`` of the frame's short
side, so detectors still find it at 64x64). Without a box the photo is cropped
centrally. Every photo gets ``clips_per_photo`` clips, each with one camera
motion from :data:`MOTIONS`; frames are rendered with PIL's antialiased
resampling from a sub-pixel crop window, so the output is deterministic.

A second call with the same photos (by content) and settings does nothing: the
inputs are recorded in ``OUT_DIR/videos/.build.json``, written last.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np

from rewardfl.archives import file_sha256  # the file hash the asset fetcher checks downloads with
from rewardfl.cli import user_error_exit
from rewardfl.fileio import atomic_path, atomic_write, stamp_matches, write_stamp

from .assets import fetch_face_assets

__all__ = ["MOTIONS", "EXAMPLE_PHOTOS", "HELDOUT_PEOPLE", "TRAINING_SOLVAY_PEOPLE", "solvay_faces", "training_solvay_faces", "build_example_dataset", "build_from_face_assets", "crop_windows",
           "largest_face_box", "main"]

#: bump when the rendering changes, so that existing datasets are rebuilt
BUILD_VERSION = 1

#: camera motion -> (start, end) of (zoom, dx, dy): zoom scales the crop window
#: (< 1: closer), dx/dy shift its centre in units of the window's short side
MOTIONS = {
    "zoom_in": ((1.0, 0.0, 0.0), (0.8, 0.0, 0.0)),
    "pan_right": ((0.9, -0.08, 0.0), (0.9, 0.08, 0.0)),
    "zoom_out": ((0.8, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "pan_left": ((0.9, 0.08, 0.0), (0.9, -0.08, 0.0)),
    "tilt_down": ((0.9, 0.0, -0.06), (0.9, 0.0, 0.06)),
}
_MOTION_WORDS = {
    "zoom_in": "the camera slowly zooms in",
    "pan_right": "the camera slowly pans to the right",
    "zoom_out": "the camera slowly zooms out",
    "pan_left": "the camera slowly pans to the left",
    "tilt_down": "the camera slowly tilts down",
}

Box = tuple[float, float, float, float]

#: photos of ``rewardfl.demo.assets`` used by :func:`build_from_face_assets` -> subject for the prompts
#: (four different people; licences in the fetched photos/CREDITS.md)
EXAMPLE_PHOTOS = {"person_a_1": "a man", "person_b_1": "a woman", "impostor_1": "a man", "impostor_2": "a man"}


def crop_windows(photo_size: tuple[int, int], face_box: Optional[Box], motion: str, *, num_frames: int,
                 size: tuple[int, int], face_fraction: float = 0.5) -> np.ndarray:
    """Crop windows ``(num_frames, 4)`` float64 ``(x0, y0, x1, y1)`` in photo pixels, one per frame.

    ``photo_size`` is ``(width, height)``; ``size`` the clip's ``(H, W)``. The
    window has the clip's aspect ratio; its short side is the face box's long
    side / ``face_fraction`` (or the photo's short side without a box), times
    the motion's zoom. Windows are shrunk and shifted to stay inside the photo.
    """
    pw, ph = photo_size
    h, w = size
    if face_box is None:
        cx, cy, side = pw / 2.0, ph / 2.0, float(min(pw, ph))
    else:
        x0, y0, x1, y1 = face_box
        if not (0 <= x0 < x1 <= pw and 0 <= y0 < y1 <= ph):
            raise ValueError(f"face box {face_box} is not inside the {pw}x{ph} photo (x0 < x1 <= width, "
                             "y0 < y1 <= height, in pixels)")
        cx, cy, side = (x0 + x1) / 2.0, (y0 + y1) / 2.0, max(x1 - x0, y1 - y0) / face_fraction
    (z0, dx0, dy0), (z1, dx1, dy1) = MOTIONS[motion]
    t = np.linspace(0.0, 1.0, num_frames)
    zoom, dx, dy = z0 + (z1 - z0) * t, dx0 + (dx1 - dx0) * t, dy0 + (dy1 - dy0) * t
    short = side * zoom
    ww, wh = short * (w / min(h, w)), short * (h / min(h, w))
    # a window larger than the photo shrinks (keeping the aspect); then it slides inside
    fit = np.minimum(1.0, np.minimum(pw / ww, ph / wh))
    ww, wh = ww * fit, wh * fit
    centre_x = np.clip(cx + dx * side, ww / 2, pw - ww / 2)
    centre_y = np.clip(cy + dy * side, wh / 2, ph - wh / 2)
    return np.stack([centre_x - ww / 2, centre_y - wh / 2, centre_x + ww / 2, centre_y + wh / 2], axis=1)


def _render_clip(photo, windows: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """Frames ``(H, W, 3)`` uint8 RGB: each window of the PIL ``photo`` resized to ``size``."""
    from PIL import Image

    h, w = size
    return [np.asarray(photo.resize((w, h), Image.Resampling.LANCZOS, box=tuple(float(v) for v in win)))
            for win in windows]


def _write_mp4(path: str, frames: Sequence[np.ndarray], fps: int) -> None:
    import imageio.v2 as imageio

    # H.264 yuv420p at high quality: plays everywhere, codec loss stays small (a few levels)
    with atomic_path(path, ".mp4") as tmp, imageio.get_writer(
            tmp, fps=fps, codec="libx264", quality=None, pixelformat="yuv420p", macro_block_size=1,
            output_params=["-crf", "12"], ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(path))[0]).strip("_") or "photo"


def build_example_dataset(out_dir: str, photos: Sequence[str], *, face_boxes: Optional[Sequence[Optional[Box]]] = None,
                          subjects: Optional[Sequence[str]] = None, num_frames: int = 17,
                          size: tuple[int, int] = (128, 128), clips_per_photo: int = 2, fps: int = 16,
                          face_fraction: float = 0.5, csv_name: str = "metadata.csv", force: bool = False) -> str:
    """Render the clips and ``metadata.csv`` into ``out_dir``; returns the CSV's path.

    ``photos``: image files, each with an optional face box ``(x0, y0, x1, y1)``
    in its pixels (``face_boxes``, one entry per photo, None = central crop) and
    an optional subject phrase for the prompts (``subjects``, default "a person").
    Photo ``i`` gets ``clips_per_photo`` clips with the motions
    ``list(MOTIONS)[(i + j) % 5]``, each ``num_frames`` frames (4k+1) of
    ``size = (H, W)`` (multiples of 16) at ``fps``, written as
    ``videos/{i:02d}_{photo}_{motion}.mp4``, listed in ``out_dir/csv_name``.
    Does nothing when ``out_dir`` already holds the same build (unless
    ``force``); refuses to overwrite a CSV it did not write (unless ``force``).
    """
    photos = [os.path.abspath(p) for p in photos]
    n = len(photos)
    if n == 0:
        raise ValueError("photos: give at least one face photo")
    face_boxes = list(face_boxes) if face_boxes is not None else [None] * n
    subjects = list(subjects) if subjects is not None else ["a person"] * n
    if len(face_boxes) != n or len(subjects) != n:
        raise ValueError(f"face_boxes/subjects: need one entry per photo ({n}), got {len(face_boxes)} and {len(subjects)}")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames: must be of the form 4k+1 (1, 5, 9, ...), got {num_frames}")
    h, w = size
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"size: (H, W) must be positive multiples of 16, got {size}")
    if not 1 <= clips_per_photo <= len(MOTIONS):
        raise ValueError(f"clips_per_photo: must be 1..{len(MOTIONS)} (one clip per motion), got {clips_per_photo}")
    if not 0 < face_fraction <= 1:
        raise ValueError(f"face_fraction: must be in (0, 1], got {face_fraction}")
    for p in photos:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"photo not found: {p} "
                                    "(python -m rewardfl.demo.assets fetch downloads the face photos)")

    videos_dir = os.path.join(out_dir, "videos")
    csv_path = os.path.join(out_dir, csv_name)
    manifest_path = os.path.join(videos_dir, ".build.json")
    motions = list(MOTIONS)
    rows = []
    for i, (photo, subject) in enumerate(zip(photos, subjects)):
        for j in range(clips_per_photo):
            motion = motions[(i + j) % len(motions)]
            rows.append((i, motion, f"videos/{i:02d}_{_slug(photo)}_{motion}.mp4",
                         f"{subject} looks at the camera, {_MOTION_WORDS[motion]}, close-up portrait"))
    manifest = {
        "version": BUILD_VERSION, "num_frames": num_frames, "size": [h, w], "fps": fps,
        "face_fraction": face_fraction,
        "photos": [{"sha256": file_sha256(p), "face_box": list(b) if b is not None else None}
                   for p, b in zip(photos, face_boxes)],
        "rows": [[video, prompt] for _, _, video, prompt in rows],
    }
    if not force and _is_built(out_dir, csv_path, manifest_path, manifest):
        return csv_path
    if os.path.exists(csv_path) and not os.path.exists(manifest_path) and not force:
        raise ValueError(f"{csv_path} exists and was not written by the example builder (no {manifest_path}); "
                         "choose another folder, or pass force=True / --force to replace it")

    from PIL import Image, ImageOps

    os.makedirs(videos_dir, exist_ok=True)
    # mark the build incomplete first: a crash below must not leave a "built" marker (but the folder stays ours)
    write_stamp(manifest_path, {"incomplete": True})
    for i, photo in enumerate(photos):
        with Image.open(photo) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        for k, motion, video, _ in rows:
            if k != i:
                continue
            windows = crop_windows(image.size, face_boxes[i], motion, num_frames=num_frames, size=(h, w),
                                   face_fraction=face_fraction)
            _write_mp4(os.path.join(out_dir, video), _render_clip(image, windows, (h, w)), fps)
    with atomic_write(csv_path) as f:
        writer = csv.writer(f)
        writer.writerow(["video", "prompt"])
        writer.writerows([video, prompt] for _, _, video, prompt in rows)
    write_stamp(manifest_path, manifest)
    return csv_path


def _is_built(out_dir: str, csv_path: str, manifest_path: str, manifest: dict) -> bool:
    if not stamp_matches(manifest_path, manifest):
        return False
    return os.path.isfile(csv_path) and all(os.path.isfile(os.path.join(out_dir, v)) for v, _ in manifest["rows"])


def largest_face_box(photo: str, yunet_model: str, *, score_threshold: float = 0.6) -> Optional[Box]:
    """The largest face's box ``(x0, y0, x1, y1)`` in ``photo`` (pixels, EXIF rotation applied), or None.

    Uses OpenCV's YuNet runner (``cv2.FaceDetectorYN``) with ``yunet_model``
    (an fp32 ``face_detection_yunet_2023mar.onnx``, e.g. from ``rewardfl.demo.assets``);
    only to frame the clips, not part of the reward.
    """
    import cv2
    from PIL import Image, ImageOps

    with Image.open(photo) as im:
        bgr = np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB"))[:, :, ::-1])
    h, w = bgr.shape[:2]
    detector = cv2.FaceDetectorYN.create(yunet_model, "", (w, h), score_threshold)
    _, faces = detector.detect(bgr)
    if faces is None or len(faces) == 0:
        return None
    x, y, bw, bh = max(faces, key=lambda f: f[2] * f[3])[:4]
    x0, y0 = max(0.0, float(x)), max(0.0, float(y))
    return x0, y0, min(float(w), float(x + bw)), min(float(h), float(y + bh))


def face_boxes(photo: str, yunet_model: str, *, score_threshold: float = 0.6) -> list[Box]:
    """Every face's box ``(x0, y0, x1, y1)`` in ``photo`` (pixels), left to right, by YuNet (as
    :func:`largest_face_box`)."""
    import cv2
    from PIL import Image, ImageOps

    with Image.open(photo) as im:
        bgr = np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB"))[:, :, ::-1])
    h, w = bgr.shape[:2]
    detector = cv2.FaceDetectorYN.create(yunet_model, "", (w, h), score_threshold, 0.3, 5000)
    _, faces = detector.detect(bgr)
    boxes = [(max(0.0, float(x)), max(0.0, float(y)), min(float(w), float(x + bw)), min(float(h), float(y + bh)))
             for x, y, bw, bh in (f[:4] for f in (faces if faces is not None else []))]
    return sorted(boxes)


#: the held-out people of the demo: faces of the 1927 Solvay conference photo (29 people), the
#: largest ones, left to right; no training clip shows any part of them (:func:`training_solvay_faces`)
HELDOUT_PHOTO = "solvay_conference_1927"
#: how many: the clip-level intervals call no difference on fewer than 5 clips
#: (``rewardfl.evaluation.metrics.MIN_CLIPS_FOR_CLAIM``); 12 gives them 11 degrees of freedom
HELDOUT_PEOPLE = 12
#: the demo's further training people: the Solvay photo's next faces by size after the held-out ones
#: whose clips show no part of a held-out face (:func:`training_solvay_faces`: 14 of the other 17)
TRAINING_SOLVAY_PEOPLE = 8


def solvay_faces(assets) -> list[Box]:
    """The Solvay photo's faces (YuNet boxes), largest first: the first :data:`HELDOUT_PEOPLE` are
    the held-out people; training takes some of the others (:func:`training_solvay_faces`)."""
    yunet = os.path.join(assets.yunet_sface, "face_detection_yunet_2023mar.onnx")
    return sorted(face_boxes(assets.photo(HELDOUT_PHOTO), yunet), key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def training_solvay_faces(assets, faces: Optional[list] = None, *, num_frames: int = 17,
                          size: tuple[int, int] = (128, 128), face_fraction: float = 0.5) -> list[Box]:
    """The Solvay photo's faces after the held-out ones (by size, largest first) whose clips, with any
    camera motion, show no part of a held-out face: no frame's crop window overlaps a held-out face
    box (the photo is crowded, and a clip frames about twice its face, so some neighbours are left out)."""
    from PIL import Image

    faces = solvay_faces(assets) if faces is None else faces
    held = faces[:HELDOUT_PEOPLE]
    with Image.open(assets.photo(HELDOUT_PHOTO)) as im:
        photo_size = im.size

    def clear(box) -> bool:
        for motion in MOTIONS:
            for x0, y0, x1, y1 in crop_windows(photo_size, box, motion, num_frames=num_frames, size=size,
                                               face_fraction=face_fraction):
                if any(min(x1, hx1) > max(x0, hx0) and min(y1, hy1) > max(y0, hy0) for hx0, hy0, hx1, hy1 in held):
                    return False
        return True

    return [box for box in faces[HELDOUT_PEOPLE:] if clear(box)]


def build_heldout_from_face_assets(out_dir: str, *, assets=None, count: int = HELDOUT_PEOPLE,
                                   **build_kwargs) -> str:
    """Held-out clips of ``count`` people neither the warm start nor training sees: the ``count``
    largest faces of the Solvay photo, one clip each; returns the CSV path."""
    if assets is None:
        assets = fetch_face_assets()
    boxes = solvay_faces(assets)
    if len(boxes) < count:
        raise ValueError(f"count: the held-out photo holds {len(boxes)} faces YuNet finds, asked for {count}")
    boxes = sorted(boxes[:count])
    photo = assets.photo(HELDOUT_PHOTO)
    return build_example_dataset(out_dir, [photo] * count, face_boxes=boxes, subjects=["a person"] * count,
                                 clips_per_photo=1, **build_kwargs)


def build_from_face_assets(out_dir: str, *, assets=None, photo_names: Sequence[str] = tuple(EXAMPLE_PHOTOS),
                           solvay_people: int = 0, **build_kwargs) -> str:
    """The example dataset from the fetched face photos (``rewardfl.demo.assets``); returns the CSV path.

    Fetches the assets when ``assets`` (a ``FaceAssets``) is None, frames each
    photo around its largest YuNet face and calls :func:`build_example_dataset`
    with ``build_kwargs``. ``solvay_people``: also that many of the Solvay photo's faces after the
    held-out ones, by size, whose clips show no part of a held-out face (:func:`training_solvay_faces`).
    Up to date datasets return at once (after a stat of the asset cache and a hash of the photos).
    """
    if assets is None:
        assets = fetch_face_assets()
    yunet = os.path.join(assets.yunet_sface, "face_detection_yunet_2023mar.onnx")
    photos = [assets.photo(name) for name in photo_names]
    boxes = [largest_face_box(p, yunet) for p in photos]
    subjects = [EXAMPLE_PHOTOS.get(name, "a person") for name in photo_names]
    if solvay_people:
        faces = solvay_faces(assets)
        extra = training_solvay_faces(assets, faces, **{k: build_kwargs[k] for k in ("num_frames", "size",
                                      "face_fraction") if k in build_kwargs})[:solvay_people]
        if len(extra) < solvay_people:
            raise ValueError(f"solvay_people: the Solvay photo holds {len(faces)} faces YuNet finds, "
                             f"{HELDOUT_PEOPLE} held out and {len(extra)} whose clips show none of them; "
                             f"asked for {solvay_people}")
        photos += [assets.photo(HELDOUT_PHOTO)] * solvay_people
        boxes += sorted(extra)
        subjects += ["a person"] * solvay_people
    return build_example_dataset(out_dir, photos, face_boxes=boxes, subjects=subjects, **build_kwargs)


def _parse_photo(arg: str) -> tuple[str, Optional[Box]]:
    """``PHOTO`` or ``PHOTO@x0,y0,x1,y1``."""
    path, sep, box = arg.rpartition("@")
    if sep and re.fullmatch(r"\s*[-+.\d]+(\s*,\s*[-+.\d]+){3}\s*", box):
        return path, tuple(float(v) for v in box.split(","))
    return arg, None


@user_error_exit("rewardfl.demo.example_data")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.demo.example_data",
                                     description="Render pan/zoom clips of face photos into a metadata.csv dataset.")
    parser.add_argument("out_dir", help="dataset folder (metadata.csv and videos/ are written there)")
    parser.add_argument("photos", nargs="*", metavar="PHOTO[@x0,y0,x1,y1]",
                        help="face photo, optionally with its face box in pixels (default: the photos of "
                             "python -m rewardfl.demo.assets fetch, framed by YuNet)")
    parser.add_argument("--yunet", metavar="ONNX", help="frame photos given without a box around their largest "
                        "face found by this YuNet model (else: central crop)")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip, 4k+1 (default 17)")
    parser.add_argument("--size", default="128x128", help="clip size HxW, multiples of 16 (default 128x128)")
    parser.add_argument("--clips-per-photo", type=int, default=2)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size: expected HxW such as 128x128, got {args.size!r}")
    settings = dict(num_frames=args.num_frames, size=(h, w), clips_per_photo=args.clips_per_photo,
                    fps=args.fps, force=args.force)
    if not args.photos:
        csv_path = build_from_face_assets(args.out_dir, **settings)
    else:
        photos, boxes = zip(*(_parse_photo(p) for p in args.photos))
        if args.yunet:
            boxes = [b if b is not None or not os.path.isfile(p) else largest_face_box(p, args.yunet)
                     for p, b in zip(photos, boxes)]
        csv_path = build_example_dataset(args.out_dir, photos, face_boxes=boxes, **settings)
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
