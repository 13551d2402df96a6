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
    "is_file_uri",
    "open_backend",
    "validate_name",
    "validate_prefix",
]


def file_uri_path(uri: str, what: str = "repository location") -> str:
    """The path of a ``file:`` URI on this host, as RFC 8089 reads it: ``file:///PATH``,
    ``file://localhost/PATH`` and ``file:/PATH`` are the absolute /PATH, percent-escapes
    decoded (``file:///srv/a%20b`` is "/srv/a b", as file managers and ``Path.as_uri``
    write it).  UsageError (``what`` names the argument) for another host, no path, or a
    query or fragment (``?``, ``#``: they were taken into the directory's name).  Before,
    ``file://repo`` was opened as ./repo, ``file://localhost/srv/r`` as
    ./localhost/srv/r and ``file:/srv/r`` as ./file:/srv/r."""
    from urllib.parse import unquote_to_bytes

    rest = uri.partition(":")[2]
    if rest.startswith("//"):
        rest = rest[2:]
        if rest[:10].lower() == "localhost/":  # (host names in any case)
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            what_is_wrong = "has no path" if not rest else "names a host after file://"
            raise UsageError(f"{what} {uri!r} {what_is_wrong}: give file:///ABSOLUTE/PATH (three slashes) or a plain path")
    elif not rest.startswith("/"):
        raise UsageError(f"{what} {uri!r} is no file: URI of an absolute path: give file:///ABSOLUTE/PATH or a plain path")
    if "?" in rest or "#" in rest:
        raise UsageError(f"{what} {uri!r} has a query or fragment ('?' or '#'), which names no file: give a plain path "
                         f"(or write those characters as %3F and %23)")
    path = os.fsdecode(unquote_to_bytes(rest))  # (any bytes a Linux path may hold, %FF too)
    if "\0" in path:
        raise UsageError(f"{what} {uri!r} holds an escaped NUL byte (%00), which no path can")
    return path


def is_file_uri(location: str) -> bool:
    """Is ``location`` meant as a ``file:`` URI?  ``file:///PATH`` and
    ``file://localhost/PATH`` always (read as a relative path, they named a different file
    whenever a directory "file:" held one); ``file:/PATH`` and
    ``file://HOST/...`` where no such relative path exists (a directory literally named
    "file:" stays a path; otherwise file_uri_path reads or refuses them)."""
    if location[:5].lower() != "file:":
        return False
    rest = location[5:]
    if rest.startswith("///") or rest[:12].lower() == "//localhost/":
        return True
    return rest.startswith("/") and not os.path.lexists(location)


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
    if is_file_uri(location):
        return LocalBackend(file_uri_path(location))
    scheme, sep, rest = location.partition("://")
    if not sep:
        return LocalBackend(location)
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryBackend(rest)
    raise UsageError(
        f"unsupported repository location {location!r}: use a local path or memory://NAME "
        f"(sftp:// and s3:// are not supported yet)"
    )
