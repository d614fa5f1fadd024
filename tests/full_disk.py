"""A real full disk for tests: a small tmpfs in a private mount namespace (``unshare -rm``), so that
every writer (torch's, safetensors', ffmpeg's, ours) meets a real ENOSPC from the kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def can_mount_tmpfs() -> bool:
    """A private mount namespace with a tmpfs (``unshare -rm``: root, or unprivileged user namespaces)."""
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def on_a_full_tmpfs(tmp_path, args: list[str], size: str = "32m") -> subprocess.CompletedProcess:
    """``python args...`` in a private mount namespace where ``tmp_path/disk`` is a small tmpfs (the
    child fills it with :func:`fill_disk`); skips where no tmpfs can be mounted."""
    if not can_mount_tmpfs():
        pytest.skip("needs unshare -rm to mount a small tmpfs (root or user namespaces)")
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs {disk} && exec \"$@\""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def fill_disk(folder: str, leave: int) -> str:
    """A file that takes all but ``leave`` bytes of ``folder``'s file system; returns its path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))
    return path
