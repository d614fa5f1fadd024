"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

* :func:`atomic_write`: a context manager yielding a file object on a temporary
  name in the target's folder; on success the data is flushed, fsynced and
  renamed over the target (a rename within one folder is atomic); on error the
  temporary file is removed and the target is untouched, and an ``OSError`` names
  the target (a full disk says which file). A temporary file left by a killed
  writer (its process gone) is removed by the next write of the same target.
* :func:`atomic_path`: the same for writers that want a file name, not a file object (ffmpeg,
  an image library): it yields the temporary name.
* :func:`write_json` and :func:`write_safetensors` on top of them.
* :func:`replace_directory`: a directory written whole under a temporary name takes the place of
  ``NAME`` (exchanged in one step where the file system can, else moved aside first), and
  :func:`recover_directory` puts back what a kill in between left.
* Build stamps (:func:`stamp_matches`, :func:`write_stamp`): a JSON file that
  records the inputs a generated folder was built from, written last, so that a
  rerun with the same inputs skips the work and an interrupted build is redone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import struct
from typing import Any, Iterator, Optional

import torch

__all__ = ["atomic_write", "atomic_path", "remove_stale_temporaries", "pid_alive", "replace_directory",
           "recover_directory", "write_json", "write_safetensors", "stamp_matches", "write_stamp", "read_utf8"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", *, encoding: Optional[str] = "utf-8") -> Iterator[Any]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` holds all of it or is unchanged."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """``with atomic_path(path, ".png") as tmp: image.save(tmp)``: the temporary name beside ``path``
    (ending in ``suffix``, for writers that pick the format from the extension), renamed over ``path``
    when the block ends without an error, removed otherwise. One writer per target and process."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path, os.getpid()) + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # f.write names no file
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from e
        raise


def _temporary_name(path: str, pid: int) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{pid}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove what :func:`atomic_write` or :func:`atomic_path` left of ``path`` in a process that was
    killed (a ``.NAME.PID.tmp``, or ``.NAME.PID.tmp.EXT``, whose process is gone); returns the paths removed."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.tmp(\.\w+)?$")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for entry in names:
        m = pattern.match(entry)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
    return removed


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), b)


def replace_directory(tmp: str, dest: str, old: Optional[str] = None) -> None:
    """``dest`` becomes the complete directory ``tmp`` (usually ``dest + ".tmp"``; same file system), whole:
    nothing of the previous ``dest`` stays in it. Where the file system can, the two are exchanged in one
    step, so that ``dest`` exists at every moment; elsewhere the previous one moves to ``old`` (default
    ``dest + ".old"``) first and a kill between the two renames leaves it there for
    :func:`recover_directory` (or the caller's own clean-up, for another ``old``)."""
    old = dest + ".old" if old is None else old
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(dest) and _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous one
        return
    if os.path.isdir(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(dest: str) -> None:
    """What a kill during :func:`replace_directory` of ``dest`` left: the previous ``dest + ".old"`` goes
    back when ``dest`` is missing; an unfinished ``dest + ".tmp"`` (and a leftover ``.old``) is removed."""
    old = dest + ".old"
    if not os.path.exists(dest) and os.path.isdir(old):
        os.replace(old, dest)
    for leftover in (old, dest + ".tmp"):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def write_json(path: str, obj, **dump_kwargs) -> None:
    """``obj`` as JSON (strict: no NaN), atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, allow_nan=False, **dump_kwargs)


_DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def write_safetensors(path: str, tensors, metadata: Optional[dict] = None) -> None:
    """A safetensors file, atomically, written one tensor at a time.

    ``tensors``: a dict ``name -> tensor``, or an iterable of ``(name, shape, dtype, make)`` where
    ``make()`` returns the tensor when its turn comes (so a 14B expert never sits in memory twice).
    ``metadata``: str -> str. Readable by ``safetensors.torch.load_file``.
    """
    if isinstance(tensors, dict):
        items = [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in tensors.items()]
    else:
        items = list(tensors)
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in items:
        code = _DTYPE_CODES.get(str(dtype).replace("torch.", ""))
        if code is None:
            raise ValueError(f"write_safetensors: unsupported dtype {dtype} for {name}")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in items:
            t = make().detach().to("cpu").contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"write_safetensors: {name} is {tuple(t.shape)} {t.dtype}, "
                                   f"header says {tuple(shape)} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def stamp_matches(path: str, expected: dict) -> bool:
    """The stamp at ``path`` exists and records exactly ``expected``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f) == json.loads(json.dumps(expected))
    except (OSError, ValueError):
        return False


def write_stamp(path: str, data: dict) -> None:
    """Record what a folder was built from; write it last (it marks the build complete)."""
    write_json(path, data, indent=1, sort_keys=True)


def read_utf8(path: str, fix: str, error: type = ValueError) -> str:
    """The text of ``path``; not UTF-8 is ``error("PATH:LINE: not UTF-8 text (byte 0x..); " + fix)``."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # decoded whole, so e.start is the file offset: name the line
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); {fix}") from None
