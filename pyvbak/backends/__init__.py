"""Storage backends: one small interface (``Backend``), a local-filesystem and an in-memory
implementation, and a fault-injecting wrapper for tests.  See docs/BACKENDS.md."""

from __future__ import annotations

import os

from pyvbak.backends.base import (
    TEMP_PREFIX,
    AccessDenied,
    Backend,
    BackendError,
    Data,
    ObjectExists,
    ObjectMissing,
    RangeBeyondEnd,
    validate_name,
    validate_prefix,
)
from pyvbak.backends.faults import FaultInjectingBackend
from pyvbak.backends.local import LocalBackend
from pyvbak.backends.memory import MemoryBackend
from pyvbak.errors import OutOfSpace, UsageError

__all__ = [
    "TEMP_PREFIX",
    "AccessDenied",
    "Backend",
    "BackendError",
    "Data",
    "FaultInjectingBackend",
    "LocalBackend",
    "MemoryBackend",
    "ObjectExists",
    "ObjectMissing",
    "OutOfSpace",
    "RangeBeyondEnd",
    "file_uri_path",
    "open_backend",
    "validate_name",
    "validate_prefix",
]


def file_uri_path(location: str) -> str:
    """The path of a ``file://`` repository location, as RFC 8089 reads it:
    ``file:///PATH`` and ``file://localhost/PATH`` are the absolute /PATH on this host.
    UsageError for any other host, or none (``file://repo`` was opened as the relative
    directory ./repo, ``file://localhost/srv/r`` as ./localhost/srv/r)."""
    rest = location.partition("://")[2]
    if rest[:10].lower() == "localhost/":  # (host names in any case)
        rest = rest[len("localhost"):]
    if not rest.startswith("/"):
        what = "has no path" if not rest else "names a host after file://"
        raise UsageError(f"repository location {location!r} {what}: give file:///ABSOLUTE/PATH (three slashes) "
                         f"or a plain path")
    return rest


def open_backend(location: str | os.PathLike) -> Backend:
    """The backend for a repository location.

    * a filesystem path (or ``file:///PATH``, file_uri_path): ``LocalBackend``; the directory need not
      exist yet (writes create it);
    * ``memory://NAME``: the process-global in-memory store NAME (tests), created on first
      use and shared by every later open of the same NAME.

    Raises UsageError for an empty location or an unsupported scheme.
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str) or not location:
        raise UsageError(f"repository location must be a non-empty path or URL, not {location!r}")
    scheme, sep, rest = location.partition("://")
    if not sep:
        return LocalBackend(location)
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryBackend(rest)
    if scheme == "file":
        return LocalBackend(file_uri_path(location))
    raise UsageError(
        f"unsupported repository location {location!r}: use a local path or memory://NAME "
        f"(sftp:// and s3:// are not supported yet)"
    )
