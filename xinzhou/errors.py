"""The project's own error types. Each message names the file, field, line or value that was wrong
and what was expected; the `xinzhou` command prints them as `xinzhou: error: <message>` (exit 1),
with the traceback only under `--debug`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class XinzhouError(Exception):
    """Base of the errors the command line reports as messages rather than tracebacks."""


class DataError(XinzhouError, ValueError):
    """Unreadable or malformed data: names the file (and line or row) and the problem."""


class CheckpointError(XinzhouError, ValueError):
    """A checkpoint that cannot be read or does not fit the model: names the file, key or field."""


class OutputError(XinzhouError):
    """An output path xinzhou refuses to write: it would lose files xinzhou did not write."""


@contextlib.contextmanager
def cli_errors(debug: bool = False, prog: str = "xinzhou") -> Iterator[None]:
    """For command-line entry points: a XinzhouError becomes `prog: error: <message>` on stderr and
    exit status 1 (the traceback only with debug); Ctrl-C becomes exit status 130."""
    try:
        yield
    except XinzhouError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
