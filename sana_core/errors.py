"""One exception type for user-facing problems, and the CLI wrapper that prints it as one line."""
from __future__ import annotations

import functools
import sys


class SanaError(Exception):
    """A problem the user can fix (bad path, bad config, bad data). Printed as one line, exit code 2."""


def cli_main(fn):
    """Wrap an entry point so that SanaError (and missing files) end the program with one clear line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SanaError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except FileNotFoundError as e:
            print(f"error: file not found: {e.filename or e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
