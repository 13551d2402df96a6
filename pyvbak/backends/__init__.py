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
    "open_backend",
    "validate_name",
    "validate_prefix",
]


def open_backend(location: str | os.PathLike) -> Backend:
    """The backend for a repository location.

    * a filesystem path (or ``file://PATH``): ``LocalBackend``; the directory need not
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
        if not rest:
            raise UsageError(f"repository location {location!r} has no path")
        return LocalBackend(rest)
    raise UsageError(
        f"unsupported repository location {location!r}: use a local path or memory://NAME "
        f"(sftp:// and s3:// are not supported yet)"
    )
