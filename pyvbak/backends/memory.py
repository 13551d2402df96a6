"""In-memory backend for tests: a dict of name -> bytes guarded by a lock.

Same semantics as every other backend (it passes the conformance suite).  Stores named
``memory://NAME`` live for the whole process, so a test can open the same "repository" twice
(``open_backend("memory://x")``) just as a second run would reopen a directory; ``drop``
forgets one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from pyvbak.backends.base import (
    TEMP_PREFIX,
    Backend,
    Data,
    ObjectMissing,
    RangeBeyondEnd,
    as_buffers,
    validate_name,
    validate_prefix,
)
from pyvbak.backends.base import check_folder_prefix as _check_folder_prefix
from pyvbak.errors import UsageError


class _Store:
    """The shared state behind one memory://NAME."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, bytes] = {}
        # leftovers of "interrupted writes": temp name -> creation time.  Only tests create
        # them (simulate_interrupted_write); a memory write itself cannot be interrupted.
        self.incomplete: dict[str, float] = {}


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _join(data: Data) -> bytes:
    views, _ = as_buffers(data)
    # b"".join copies, so later changes to a caller's bytearray cannot alter the object
    return b"".join(views)


class MemoryBackend(Backend):
    """Objects in a process-global named store (``name``), or a private one if name is None."""

    def __init__(self, name: str | None = None):
        if name is None:
            self._store = _Store()
            self.location = f"memory://<private {id(self._store):x}>"
        else:
            if not name or "/" in name:
                raise UsageError(f"memory backend name must be non-empty without '/': {name!r}")
            with _stores_lock:
                self._store = _stores.setdefault(name, _Store())
            self.location = f"memory://{name}"
        self._closed = False

    @staticmethod
    def drop(name: str) -> None:
        """Forget the named store (its objects are gone for every later open)."""
        with _stores_lock:
            _stores.pop(name, None)

    def _check(self, name: str) -> str:
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        return validate_name(name)

    def _missing(self, name: str) -> ObjectMissing:
        return ObjectMissing(f"object {name!r} not found in memory backend {self.location}")

    def read(self, name: str) -> bytes:
        self._check(name)
        with self._store.lock:
            data = self._store.objects.get(name)
        if data is None:
            raise self._missing(name)
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self._check(name)
        if offset < 0 or length < 0:
            raise UsageError(f"read_range of {name!r}: offset ({offset}) and length ({length}) must be >= 0")
        data = self.read(name)
        if offset + length > len(data):
            raise RangeBeyondEnd(
                f"read_range of {name!r} in memory backend {self.location}: bytes "
                f"[{offset}, {offset + length}) beyond its end ({len(data)} bytes)"
            )
        return data[offset : offset + length]

    def write_new(self, name: str, data: Data) -> bool:
        self._check(name)
        blob = _join(data)
        with self._store.lock:
            if name in self._store.objects:
                return False
            self._store.objects[name] = blob
        return True

    def replace(self, name: str, data: Data) -> None:
        self._check(name)
        blob = _join(data)
        with self._store.lock:
            self._store.objects[name] = blob

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        with self._store.lock:
            names = [n for n in self._store.objects if n.startswith(prefix)]
        return iter(names)

    def stat(self, name: str) -> int:
        return len(self.read(name))

    def exists(self, name: str) -> bool:
        self._check(name)
        with self._store.lock:
            return name in self._store.objects

    def delete(self, name: str) -> None:
        self._check(name)
        with self._store.lock:
            if self._store.objects.pop(name, None) is None:
                raise self._missing(name)

    def cleanup_incomplete(self, older_than_seconds: float = 0, prefix: str = "") -> list[str]:
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        _check_folder_prefix(prefix)
        cutoff = time.time() - older_than_seconds
        with self._store.lock:
            removed = [t for t, created in self._store.incomplete.items() if created <= cutoff and t.startswith(prefix)]
            for t in removed:
                del self._store.incomplete[t]
        return removed

    def simulate_interrupted_write(self, name: str, age_seconds: float = 0) -> str:
        """Test hook: leave what a write of ``name`` killed mid-way would leave (a temp
        object, invisible to list/read), created ``age_seconds`` ago.  Returns its name."""
        validate_name(name)
        head, _, _ = name.rpartition("/")
        temp = (head + "/" if head else "") + f"{TEMP_PREFIX}sim-{time.monotonic_ns()}"
        with self._store.lock:
            self._store.incomplete[temp] = time.time() - age_seconds
        return temp

    def close(self) -> None:
        self._closed = True
