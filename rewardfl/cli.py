"""Shared command-line behaviour: a user error is one line on stderr and exit code 2.

Exit codes of rewardfl's command-line tools:

* ``0``: done;
* ``1``: ran, but reports failures (``python -m rewardfl.plugins --load`` with a broken plugin);
* ``2`` (:data:`EXIT_USER_ERROR`): a user error (config, paths, arguments, a full or read-only
  disk); one line ``prog: error: ...`` on stderr naming the key, path or argument and the fix.
  argparse's own usage errors use 2 as well;
* ``3`` (:data:`EXIT_NOTHING_TRAINED`): training ran without error but took no optimizer step
  (e.g. every batch was skipped), so there is nothing to use;
* ``4`` (:data:`EXIT_STOPPED_BY_GUARD`): training was stopped by the reward-hacking guard
  (``stop_on_hacking: true``) after saving a checkpoint; the warning names the reward and the judge;
* ``143`` (:data:`EXIT_STOPPED_BY_SIGNAL`): training was stopped by SIGTERM/SIGINT after saving a
  checkpoint; ``128 + SIGTERM``, the code a shell and job schedulers (Slurm, Kubernetes) report for
  a process ended by SIGTERM, so a resubmitting script can tell "stopped" from "failed".
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import shutil
import sys

from .config import ConfigError
from .deps import explain_import_error

EXIT_USER_ERROR = 2
EXIT_NOTHING_TRAINED = 3
EXIT_STOPPED_BY_GUARD = 4
EXIT_STOPPED_BY_SIGNAL = 143

#: errors a user causes with config, paths or inputs (not bugs): printed as one line
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

#: OSErrors that come from where the user writes, not from a bug: a full, read-only or forbidden place
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES)


def finite_float(text: str) -> float:
    """argparse ``type=`` for a float option: rejects nan and inf (they would silently write NaN weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _free_space(path: str) -> str:
    """Free space on the file system holding ``path`` (its nearest existing parent), e.g. '1.2 GiB'."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} GiB"


def disk_error_message(e: OSError) -> str:
    """One line for an ENOSPC/EROFS/EACCES ``OSError``, naming ``e.filename`` and what to do."""
    path = e.filename if e.filename is not None else "(path unknown)"
    if e.errno == errno.ENOSPC:
        return (f"{path}: no space left on device ({_free_space(str(path))} free there); free some space or "
                "write elsewhere")
    if e.errno == errno.EROFS:
        return f"{path}: read-only file system; write somewhere writable"
    return f"{path}: permission denied; choose a path you may write to or fix its permissions"


def user_error_exit(prog: str, also: tuple[type[BaseException], ...] = ()):
    """Decorate a ``main(argv)``: user errors print ``prog: error: ...`` (one line) and return 2.

    ``prog`` is the module's name (``rewardfl.run``, ``rewardfl.score``, ...) for every tool.
    ``also``: further exception types this tool reports the same way (e.g. a failed download).
    An ``OSError`` for a full disk, a read-only file system or a forbidden path is a user error too,
    and so is a failed import of another distribution (missing, shadowed by a local folder, or an
    incompatible version; see :func:`rewardfl.deps.explain_import_error`), even when a library
    wrapped the ImportError in another exception.
    """

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except Exception as e:
                if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                    message = disk_error_message(e)
                elif isinstance(e, USER_ERRORS + also):
                    message = " ".join(str(e).split()) or type(e).__name__
                else:
                    message = explain_import_error(e)
                    if message is None:
                        raise  # a bug: the traceback is what helps
            print(f"{prog}: error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR

        return run

    return wrap
