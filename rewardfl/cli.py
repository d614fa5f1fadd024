"""Shared command-line behaviour: a user error is one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys

from .config import ConfigError

#: errors a user causes with config, paths or inputs (not bugs): printed as one line
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_error_exit(prog: str):
    """Decorate a ``main(argv)``: user errors print ``prog: error: ...`` (one line) and exit 2."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except USER_ERRORS as e:
                message = " ".join(str(e).split()) or type(e).__name__
                print(f"{prog}: error: {message}", file=sys.stderr)
                return 2

        return run

    return wrap
