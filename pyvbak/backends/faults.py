"""FaultInjectingBackend: a wrapper that makes writes fail on purpose, for tests of the
layers above ("disk full during backup leaves the repository valid").

A failing write behaves like a real backend's failing write: it raises and stores nothing
(no partial object becomes visible).  By default a fault is *sticky* — once the "disk is
full", every later matching write fails too — until ``heal()`` is called.

Examples::

    # the disk fills after 1 MiB of writes of any object
    b = FaultInjectingBackend(inner, fail_after_bytes=1 << 20)
    # the 3rd write of a data pack fails with EIO-like BackendError; index writes still work
    b = FaultInjectingBackend(inner, fail_on_write=3, prefix="data/",
                              exception=BackendError("injected I/O error"), sticky=False)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Union

from pyvbak.backends.base import Backend, Data, as_buffers, out_of_space, validate_name
from pyvbak.errors import UsageError

ExceptionSpec = Union[BaseException, type, Callable[[str], BaseException], None]


class FaultInjectingBackend(Backend):
    """Wraps ``inner``; writes (write_new/replace) of names starting with ``prefix`` fail:

    * ``fail_after_bytes=N``: the write that would take the total bytes of matching writes
      beyond N fails (writes totalling exactly N succeed);
    * ``fail_on_write=N``: the Nth matching write (1-based) fails.

    ``exception`` is what is raised: None for ``OutOfSpace`` naming the object and the
    wrapped backend, an exception instance, an exception class (called with a message), or
    a callable taking the object name and returning the exception.  Reads, list, stat,
    exists, delete, cleanup_incomplete and close pass straight through.

    Counters (``writes``, ``bytes_written``: matching writes that succeeded; ``faults``:
    writes that were failed) let a test assert how far the caller got.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        fail_after_bytes: int | None = None,
        fail_on_write: int | None = None,
        prefix: str = "",
        exception: ExceptionSpec = None,
        sticky: bool = True,
    ):
        if fail_after_bytes is None and fail_on_write is None:
            raise UsageError("FaultInjectingBackend needs fail_after_bytes or fail_on_write")
        if fail_on_write is not None and fail_on_write < 1:
            raise UsageError("fail_on_write counts from 1")
        self.inner = inner
        self.location = inner.location
        self.fail_after_bytes = fail_after_bytes
        self.fail_on_write = fail_on_write
        self.prefix = prefix
        self.exception = exception
        self.sticky = sticky
        self.writes = 0
        self.bytes_written = 0
        self.faults = 0
        self._attempts = 0
        self._tripped = False
        self._healed = False
        self._lock = threading.Lock()

    def heal(self) -> None:
        """Space was freed: later writes succeed (the trigger does not fire again)."""
        with self._lock:
            self._tripped = False
            self._healed = True

    def _make_exception(self, name: str) -> BaseException:
        spec = self.exception
        if spec is None:
            return out_of_space(name, f"{self.inner.location} (injected fault)")
        if isinstance(spec, BaseException):
            return spec
        if isinstance(spec, type) and issubclass(spec, BaseException):
            return spec(f"injected fault writing {name!r} to {self.inner.location}")
        return spec(name)

    def _guarded(self, name: str, data: Data, op: Callable[[str, Data], object]):
        validate_name(name)
        views, size = as_buffers(data)  # once: data may be a one-shot iterable of frames
        if not name.startswith(self.prefix):
            return op(name, views)
        with self._lock:
            self._attempts += 1
            fail = self._tripped
            if not fail and not self._healed:
                if self.fail_on_write is not None and self._attempts == self.fail_on_write:
                    fail = True
                if self.fail_after_bytes is not None and self.bytes_written + size > self.fail_after_bytes:
                    fail = True
            if fail:
                self.faults += 1
                self._tripped = self.sticky
            else:
                # reserve the bytes before writing so concurrent writers see the budget
                self.bytes_written += size
        if fail:
            raise self._make_exception(name)
        try:
            result = op(name, views)
        except BaseException:
            with self._lock:
                self.bytes_written -= size
            raise
        with self._lock:
            self.writes += 1
        return result

    def write_new(self, name: str, data: Data) -> bool:
        return self._guarded(name, data, self.inner.write_new)

    def replace(self, name: str, data: Data) -> None:
        self._guarded(name, data, self.inner.replace)

    def read(self, name: str) -> bytes:
        return self.inner.read(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.read_range(name, offset, length)

    def prefetch(self, name: str, offset: int, length: int) -> None:
        self.inner.prefetch(name, offset, length)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def stat(self, name: str) -> int:
        return self.inner.stat(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def cleanup_incomplete(self, older_than_seconds: float = 0, prefix: str = "") -> list[str]:
        return self.inner.cleanup_incomplete(older_than_seconds, prefix)

    def close(self) -> None:
        self.inner.close()
