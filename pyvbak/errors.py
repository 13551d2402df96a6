"""Every error pyvbak reports to a user, each carrying its exit code.

The CLI prints ``str(err)`` as one line on stderr and exits with ``err.exit_code``; no
traceback is shown for a ``PyvbakError``.  Messages say what went wrong, where, and what
to do.  Anything that is not a ``PyvbakError`` is a bug and keeps its traceback.

Exit codes (stable, documented in README):
  1  generic failure              2  usage / bad argument
  3  repository problem           4  source (image, NBD, hypervisor) problem
  5  snapshot not found           6  integrity error (verify found missing/corrupt data)
  7  target exists                8  locked by another process
  9  out of space                 10 interrupted (Ctrl-C / SIGTERM)
"""

from __future__ import annotations


#: control characters as Python's repr writes them: what a message shows of a path or name
#: holding one (C0 and DEL)
_ESCAPES = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)}, 9: "\\t", 10: "\\n", 13: "\\r"}


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (a newline as ``\\n``): one line on a
    terminal, whatever a path or name in it holds.  A newline shown as a space made
    ``init $'R\\nx'`` say "R x already holds a pyvbak repository: use it (--repo R x)"."""
    return text.translate(_ESCAPES)


class _OneLineMessage:
    """A one-line message and an exit code (PyvbakError, Interrupted)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return one_line(self.message)


class PyvbakError(_OneLineMessage, Exception):
    """Base class: a user-facing error with a one-line message and an exit code."""


class UsageError(PyvbakError, ValueError):
    """An argument has a value pyvbak cannot use (block size, key, URI, ...)."""

    exit_code = 2


class RepositoryError(PyvbakError):
    """The repository is missing, not a repository, of a newer format, or damaged."""

    exit_code = 3


class SourceError(PyvbakError):
    """The disk being backed up cannot be read (missing file, NBD/QMP failure, ...)."""

    exit_code = 4


class SnapshotNotFound(PyvbakError):
    exit_code = 5


class IntegrityError(RepositoryError):
    """Stored data does not match its digest, or referenced data is missing."""

    exit_code = 6


class TargetExists(PyvbakError):
    exit_code = 7


class LockedError(RepositoryError):
    exit_code = 8


class OutOfSpace(PyvbakError):
    exit_code = 9


class Interrupted(_OneLineMessage, BaseException):
    """SIGTERM or SIGHUP (Ctrl-C is Python's KeyboardInterrupt): a stop request, raised
    wherever the main thread is.  Like KeyboardInterrupt it is no ``Exception``: as a
    PyvbakError, every ``except Exception`` (an optimisation's fallback, a warning) or
    ``except PyvbakError`` on its way swallowed it, and the command went on and exited 0
    (a backup during its allocation-map query, a restore in a prefetch hint, verify
    reporting a snapshot damaged).  Caught where a user-facing
    error is (cli/main.py), exit code 10."""

    exit_code = 10
