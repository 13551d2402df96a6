"""The Backend interface: the only way the repository layer touches storage.

A backend stores *objects*: immutable-or-replaced byte strings under relative names such as
``packs/ab/abcdef...`` or ``snapshots/ID.json``.  The interface is deliberately what an object
store (S3) can do too: whole-object writes only (no appends, no partial writes, no rename of
"directories"), so SFTP and S3 backends can be added later without touching the layers above.
Retry, failover and rate limiting are wrappers around this interface, never inside a backend.

Guarantees every backend gives (and the conformance suite in ``tests/backends/conformance.py``
checks):

* **Atomic writes.** A reader sees either no object / the previous object, or the complete new
  object; never a partial one, not even after a crash or ``kill -9`` mid-write.
* **Durable on return.** When ``write_new`` / ``replace`` / ``delete`` return, the change
  survives a power cut (local: file and directory are fsynced).
* **Create-only.** ``write_new`` never overwrites; it reports whether it created the object.
* **Thread-safe.** Every method may be called from several threads at once.
* **Errors are PyvbakErrors.** No bare ``OSError`` escapes a backend: a missing object is
  ``ObjectMissing``, a full disk or exceeded quota is ``pyvbak.errors.OutOfSpace``, a bad name
  is ``pyvbak.errors.UsageError``, anything else is ``BackendError`` naming the object and
  the backend.  See docs/BACKENDS.md.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from typing import Union

from pyvbak.errors import OutOfSpace, RepositoryError, UsageError

__all__ = [
    "Backend",
    "BackendError",
    "CollectingStream",
    "ObjectStream",
    "Buffer",
    "Data",
    "ObjectExists",
    "ObjectMissing",
    "OutOfSpace",
    "TEMP_PREFIX",
    "as_buffers",
    "out_of_space",
    "validate_name",
    "validate_prefix",
]

#: Name prefix of in-progress / interrupted writes.  Object names may not use it in any
#: component, so a temp object can never be mistaken for a real one.
TEMP_PREFIX = ".pyvbak-tmp-"

Buffer = Union[bytes, bytearray, memoryview]
#: What write_new / replace accept: one buffer, or a sequence of buffers written as their
#: concatenation (packs are written from many frames without joining them in memory).
Data = Union[Buffer, Iterable[Buffer]]


class ObjectMissing(RepositoryError):
    """The named object does not exist in the backend."""


class ObjectExists(RepositoryError):
    """The named object already exists where the caller required it not to.

    ``write_new`` does not raise it (it returns False); layers that treat an existing object
    as an error (e.g. "repository already initialised") raise it with their own message.
    """


class BackendError(RepositoryError):
    """Storage failed for a reason other than a missing object or lack of space
    (permission denied, I/O error, range beyond the end of an object, ...)."""


class AccessDenied(BackendError):
    """Storage refused this process access to an object (permission denied): a fact about
    the caller's rights, not about the stored data.  Readers stop (exit 3) instead of
    reporting the object's blocks as unreadable copies - which ``verify --repair
    --drop-unreadable`` would drop from an intact repository."""


class RangeBeyondEnd(BackendError):
    """A range read asked for bytes past the object's end: the object is shorter than its
    reader was told (a pack cut short, a damaged index record) - a fact about the stored
    data, unlike a read that failed (I/O error, timeout), which may succeed when retried."""


def out_of_space(name: str, location: str, detail: str = "") -> OutOfSpace:
    """The one OutOfSpace message every backend uses: what, where, and what to do."""
    extra = f" ({detail})" if detail else ""
    what = f"a new object in {name!r}" if name.endswith("/") else repr(name)  # a stream's: named at its end
    return OutOfSpace(
        f"out of space writing {what} to {location}{extra}: nothing partial of it was stored and "
        f"the repository is still valid; free space (or raise the quota) there, or prune old "
        f"snapshots, then run again"
    )


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid object name, else raise UsageError.

    Valid: a non-empty str of "/"-separated components, no leading or trailing "/", no empty,
    "." or ".." component, no backslash or NUL, and no component starting with TEMP_PREFIX.
    """
    if not isinstance(name, str):
        raise UsageError(f"object name must be a str, not {type(name).__name__}: {name!r}")
    if not name:
        raise UsageError("object name must not be empty")
    if "\\" in name or "\x00" in name:
        raise UsageError(f"object name {name!r} contains a backslash or NUL")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise UsageError(
                f"invalid object name {name!r}: must be relative, '/'-separated, without "
                f"empty, '.' or '..' components"
            )
        if part.startswith(TEMP_PREFIX):
            raise UsageError(f"invalid object name {name!r}: {TEMP_PREFIX!r} is reserved for temp files")
    return name


def validate_prefix(prefix: object) -> str:
    """A list() prefix: "" or a string prefix of valid names ("packs/", "packs/ab", "snap")."""
    if not isinstance(prefix, str):
        raise UsageError(f"list prefix must be a str, not {type(prefix).__name__}: {prefix!r}")
    if prefix == "":
        return prefix
    # "packs/" is a valid prefix although "packs/" is not a valid name: validate it with a
    # stand-in last component.
    validate_name(prefix + "x" if prefix.endswith("/") else prefix)
    return prefix


def check_folder_prefix(prefix: object) -> str:
    """cleanup_incomplete's prefix: "" or a folder ("locks/", "packs/ab/"); temp objects
    are named after no final name, only the folder they were written in."""
    validate_prefix(prefix)
    if prefix and not prefix.endswith("/"):
        raise UsageError(f"cleanup prefix {prefix!r} must be a folder ending in '/'")
    return prefix


def as_buffers(data: Data) -> tuple[list[memoryview], int]:
    """Normalise write data to a list of flat byte memoryviews and their total length.

    No copy is made; callers that keep the data (the memory backend) copy it themselves.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        items: Iterable = (data,)
    elif isinstance(data, str):
        raise UsageError("object data must be bytes-like, not str")
    else:
        try:
            items = list(data)
        except TypeError:
            raise UsageError(f"object data must be bytes-like or a list of them, not {type(data).__name__}") from None
    views: list[memoryview] = []
    total = 0
    for item in items:
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise UsageError(f"object data buffers must be bytes-like, not {type(item).__name__}")
        view = memoryview(item)
        if not view.c_contiguous:
            raise UsageError("object data buffers must be C-contiguous")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
            total += view.nbytes
    return views, total


class ObjectStream(abc.ABC):
    """One new object written piece by piece and named when it is complete (a pack is named
    by the hash of its table of contents, known only at its end).  One writer; not
    thread-safe.  Nothing is visible under any name before ``commit``; a stream that is
    neither committed nor aborted (a crash) leaves at most a temp object, which
    ``cleanup_incomplete`` removes like any interrupted write.
    """

    @abc.abstractmethod
    def write(self, data: Data) -> None:
        """Append ``data`` (what ``write_new`` accepts).  The stream may keep references to
        the buffers until it is committed or aborted: do not change them.  Raises like
        ``write_new`` (OutOfSpace, BackendError); the stream is then broken and its
        ``commit`` raises too."""

    @abc.abstractmethod
    def commit(self, name: str) -> bool:
        """Make everything written the object ``name``: exactly ``write_new(name, all the
        data)`` — True if this created it, False if ``name`` already existed (left
        untouched); atomic and durable on return.  ``name`` must lie under the folder the
        stream was opened for (UsageError otherwise).  Afterwards the stream is closed,
        whatever the outcome."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard what was written.  Idempotent; does nothing after ``commit``.  Never
        raises for storage errors (a temp object left behind is cleaned up later)."""


class CollectingStream(ObjectStream):
    """The default stream: keeps the pieces and hands them to ``write_new`` at commit."""

    def __init__(self, backend: "Backend", folder: str):
        self._backend, self._folder = backend, folder
        self._parts: list[memoryview] | None = []

    def write(self, data: Data) -> None:
        if self._parts is None:
            raise UsageError("write to a stream that was committed or aborted")
        self._parts.extend(as_buffers(data)[0])

    def commit(self, name: str) -> bool:
        if self._parts is None:
            raise UsageError("commit of a stream that was committed or aborted")
        parts, self._parts = self._parts, None  # closed whatever the outcome
        check_stream_name(name, self._folder)
        return self._backend.write_new(name, parts)

    def abort(self) -> None:
        self._parts = None


def check_stream_name(name: str, folder: str) -> str:
    validate_name(name)
    if not name.startswith(folder):
        raise UsageError(f"object {name!r} is not under the folder {folder!r} its stream was opened for")
    return name


class Backend(abc.ABC):
    """One storage location holding named objects.  All methods are thread-safe.

    Every method raises ``pyvbak.errors.UsageError`` for an invalid name (see
    ``validate_name``) and ``BackendError`` (naming the object and ``location``) for any
    storage failure not listed in its own contract.  Subclasses call ``validate_name``.
    """

    #: where the objects live, for messages: a path, "memory://NAME", "sftp://host/path", ...
    location: str

    @abc.abstractmethod
    def read(self, name: str) -> bytes:
        """The whole object.  Raises ObjectMissing if it does not exist."""

    @abc.abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the object starting at ``offset``.

        Raises ObjectMissing if the object does not exist, RangeBeyondEnd (a BackendError)
        if ``offset + length`` is beyond its end (a short read is never returned), UsageError
        if offset or length is negative.  ``length == 0`` returns b"" for any offset up to
        the object's size.
        """

    def read_range_into(self, name: str, offset: int, buf) -> None:
        """Fill the writable buffer ``buf`` with exactly ``len(buf)`` bytes of the object
        from ``offset``; same errors as ``read_range``.  Lets hot loops (restore, verify)
        reuse one buffer instead of allocating fresh memory per read, which costs ~0.8 s
        per GiB in page faults on this project's VMs.  Backends override it to read
        straight into ``buf``; this default copies."""
        view = memoryview(buf).cast("B")
        view[:] = self.read_range(name, offset, len(view))

    def prefetch(self, name: str, offset: int, length: int) -> None:
        """A hint: ``length`` bytes of the object from ``offset`` will be read soon.

        Never raises and may do nothing (the default).  Lets a reader keep its threads on
        CPU work while the storage fetches ahead: a local backend asks the kernel to read
        the range into the page cache (restore reads packs written with O_DIRECT, so
        cold)."""

    @abc.abstractmethod
    def write_new(self, name: str, data: Data) -> bool:
        """Create the object if it does not exist; return True if this call created it.

        Returns False, leaving the existing object untouched, if an object of that name
        already exists.  Names are content-addressed, so False normally means "already
        stored"; but the existing object may be a damaged copy, and a caller that must know
        (the pack writer) reads it back and ``replace``s it if it differs.  Of concurrent ``write_new`` calls for one name exactly
        one returns True.  Atomic (no partial object is ever visible, even after a crash)
        and durable on return.  ``data`` is bytes-like or a sequence of bytes-like objects
        written as their concatenation.  Raises OutOfSpace on a full disk / exceeded quota
        (nothing is left visible), BackendError for other failures.
        """

    def open_stream(self, folder: str) -> ObjectStream:
        """A stream for one new object to be named under ``folder`` (such as "packs/")
        once complete; see ObjectStream.  This default collects the pieces and writes them
        with ``write_new`` at commit.  A backend that can store the bytes as they come
        (a local file, an S3 multipart upload) overrides it, so that a large object is on
        its way to storage before its name is known: the local backend's last pack of a
        backup used to be written whole at the end (~30 ms for 13 MB on this project's
        VMs, bench/RESULTS.md "Pack streaming")."""
        check_folder_prefix(folder)
        if not folder:
            raise UsageError("open_stream needs a folder such as 'packs/'")
        return CollectingStream(self, folder)

    @abc.abstractmethod
    def replace(self, name: str, data: Data) -> None:
        """Create or atomically replace the object: concurrent readers see the whole old or
        the whole new content, never a mix.  Durable on return.  Raises OutOfSpace
        (the old object, if any, is untouched) or BackendError."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every object name that starts with ``prefix`` (a string prefix such as
        "packs/", "snapshots/" or "packs/ab"), each once, in no particular order.

        Never yields in-progress or interrupted temp objects.  Objects created or deleted
        while the iteration runs may or may not be yielded.  A prefix matching nothing (or
        a backend with no objects yet) yields nothing.
        """

    @abc.abstractmethod
    def stat(self, name: str) -> int:
        """The object's size in bytes.  Raises ObjectMissing if it does not exist."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the object exists.  Never raises ObjectMissing."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object, durably.  Raises ObjectMissing if it does not exist."""

    @abc.abstractmethod
    def cleanup_incomplete(self, older_than_seconds: float = 0, prefix: str = "") -> list[str]:
        """Remove leftovers of interrupted writes (temp objects) older than the given age
        and return their names (backend-specific, for a log line).  With ``prefix`` (a
        folder such as ``"locks/"``) only temp objects of writes to names under it are
        looked for: the whole repository is not listed.  A prefix that is not "" and
        does not end in "/" is a UsageError.

        Never removes the temp object of a write still in progress: in this process (the
        backend tracks its own writes), or in another process whose writer may still be
        running.  A backend that can tell (the local one: the writer's pid, in the temp
        name, runs on this host) keeps a live writer's temp objects at any age and removes
        a dead one's once older than ``older_than_seconds``; one that cannot (another
        host's temp file, an object store's unfinished multipart upload) keeps them until
        they are ``processes.FOREIGN_TEMP_MAX_AGE_S`` old, whatever ``older_than_seconds``
        says.  This is what lets a backup call it with age 0 under
        a *shared* lock while other backups write (repository.recover_leftovers).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources (connections, handles).  Idempotent; the backend is unusable
        afterwards."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location}>"
