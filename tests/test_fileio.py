"""rewardfl.fileio: the one atomic writer of files (by file object or by name) and of directories."""

import errno
import os
import subprocess
import sys

import pytest

from rewardfl import fileio


def test_atomic_path_renames_its_temporary_name_with_the_suffix_into_place(tmp_path):
    target = tmp_path / "sub" / "clip.mp4"
    with fileio.atomic_path(str(target), ".mp4") as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".tmp.mp4")
        assert os.path.basename(tmp).startswith(".clip.mp4.")
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["clip.mp4"]


def test_atomic_path_leaves_the_target_unchanged_and_names_it_on_an_error(tmp_path):
    target = tmp_path / "sheet.png"
    target.write_text("old")
    with pytest.raises(OSError) as raised:
        with fileio.atomic_path(str(target), ".png") as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a writer that names no file
    assert raised.value.filename == str(target) and raised.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["sheet.png"]


def test_a_killed_writers_temporary_file_with_a_suffix_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "clip.mp4"
    (tmp_path / f".clip.mp4.{pid}.tmp.mp4").write_text("torn")
    (tmp_path / f".clip.mp4.{pid}.tmp").write_text("torn")
    (tmp_path / f".other.mp4.{pid}.tmp.mp4").write_text("another target's")
    with fileio.atomic_write(str(target)) as f:
        f.write("whole")
    assert sorted(os.listdir(tmp_path)) == [f".other.mp4.{pid}.tmp.mp4", "clip.mp4"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_directory_moves_the_previous_one_to_the_given_old_name(tmp_path, monkeypatch, exchange):
    dest, tmp, old = tmp_path / "checkpoint-3", tmp_path / ".checkpoint-3.tmp", tmp_path / ".checkpoint-3.old"
    dest.mkdir()
    (dest / "a").write_text("previous")
    tmp.mkdir()
    (tmp / "b").write_text("new")
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
        real = os.replace
        moved = []
        monkeypatch.setattr(fileio.os, "replace", lambda a, b: (moved.append(b), real(a, b)))
    fileio.replace_directory(str(tmp), str(dest), old=str(old))
    assert os.listdir(dest) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    if not exchange:
        assert moved == [str(old), str(dest)]
