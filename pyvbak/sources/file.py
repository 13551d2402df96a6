"""A disk image file or block device as a Source.

Reads use ``os.pread`` (thread-safe, releases the GIL).  ``extents`` reports holes of
sparse files via SEEK_DATA/SEEK_HOLE so they are never read.  The native scanner maps
the file itself, window by window (``pyvbak.native.scan_fd_range`` on ``fileno()``).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from ..errors import SourceError
from .base import Extent


def _stamp(st) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size


class FileSource:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.description = f"file:{os.path.abspath(self.path)}"
        self._fd: int | None = None
        self._stamp: tuple[int, int, int] | None = None  # a regular file's times and size when opened
        self._device = False  # a block device (else a regular file)
        self.size = 0

    def __enter__(self) -> "FileSource":
        try:
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer (holding the
            # repository lock); the type check below refuses it.  Regular files and block
            # devices ignore the flag.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise SourceError(f"disk image {self.path} does not exist: check the path") from None
        except PermissionError:
            raise SourceError(f"disk image {self.path} is not readable (permission denied): run as a user who can read it") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO and os.path.exists(self.path):  # a socket (or a FIFO's like)
                raise SourceError(f"{self.path} is neither a regular file nor a block device: give a disk image file "
                                  f"or block device") from None
            raise SourceError(f"cannot open disk image {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise SourceError(f"{self.path} is a directory, not a disk image: give an image file or block device")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            raise SourceError(f"{self.path} is neither a regular file nor a block device: give a disk image file or block "
                              f"device")
        try:
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:  # (/proc/self/mem: EINVAL, not to be said as a bare "Invalid argument")
            os.close(fd)
            raise SourceError(f"cannot tell the size of disk image {self.path}: {exc.strerror}; give a disk image file "
                              f"or block device") from None
        self._fd = fd
        self._device = stat.S_ISBLK(st.st_mode)
        self._stamp = None if self._device else _stamp(st)
        return self

    def in_use_elsewhere(self) -> str | None:
        """Why this block device may be written while it is read, or None: held by an
        exclusive user (mounted, or device mapper, RAID).  Linux refuses an O_EXCL open of
        such a device (EBUSY); this open only reads, and is closed at once."""
        if not self._device or self._fd is None:  # (a regular file: written_while_read)
            return None
        try:
            os.close(os.open(self.path, os.O_RDONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return (f"block device {self.path} is in use (mounted, or held by device mapper or RAID): it is read as "
                        f"it is, not frozen, so this snapshot may hold blocks from before and after a write to it; "
                        f"back up a snapshot of it (LVM, ZFS) or unmount it first")
        return None

    def written_while_read(self) -> str | None:
        """Why the backup of this file may mix data from two instants, or None: a regular
        file whose modification or change time moved since it was opened was written
        while it was read (a block device gives no such sign).  Read as it is, not frozen:
        the snapshot holds some blocks from before the write and some from after."""
        if self._stamp is None or self._fd is None:
            return None
        try:
            now = _stamp(os.fstat(self._fd))
        except OSError:
            return None
        if now == self._stamp:
            return None
        return (f"{self.path} was written while it was read (its modification time changed): this snapshot may hold "
                f"blocks from before and after that write; back up a stopped VM's disk or a snapshot of it (LVM, ZFS, "
                f"qemu-img), or a running QEMU VM through its QMP socket (qemu:///PATH/TO/QMP.SOCK?node=NODE)")

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def fileno(self) -> int:
        assert self._fd is not None, "source not opened"
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fileno(), length, offset)
        except OSError as exc:
            raise SourceError(f"read of {self.path} at offset {offset} failed: {exc.strerror}") from None
        if len(data) != length and offset + length <= self.size:
            raise SourceError(f"{self.path} shrank while being read (short read at offset {offset}): retry the backup")
        return data

    def read_ranges_into(self, ranges: list[tuple[int, int]], buffer) -> int:
        """Fill ``buffer`` with the (offset, length) ranges back to back (``preadv``
        straight into it: no fresh bytes per read); returns the bytes filled.  A range
        past the end of the file is clipped (the next one follows what it filled).
        Raises SourceError like ``read`` when the file shrank under it."""
        fd, view, pos = self.fileno(), memoryview(buffer).cast("B"), 0
        for off, ln in ranges:
            part = view[pos:pos + ln]
            got = 0
            while got < ln:
                try:
                    n = os.preadv(fd, [part[got:]], off + got)
                except OSError as exc:
                    raise SourceError(f"read of {self.path} at offset {off + got} failed: {exc.strerror}") from None
                if n == 0:
                    if off + ln <= self.size:
                        raise SourceError(f"{self.path} shrank while being read (short read at offset "
                                          f"{off + got}): retry the backup")
                    break
                got += n
            pos += got
        return pos

    def extents(self) -> Iterator[Extent]:
        fd, pos, end = self.fileno(), 0, self.size
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no more data: the rest is a hole...
                    if os.fstat(fd).st_size < end:  # ...or the file shrank since it was opened
                        raise SourceError(f"{self.path} shrank while being read (now {os.fstat(fd).st_size} "
                                          f"bytes, {end} when the backup started): retry the backup") from None
                    yield Extent(pos, end - pos, zero=True)
                    return
                yield Extent(pos, end - pos)  # SEEK_DATA unsupported: all data
                return
            if data > pos:
                yield Extent(pos, min(data, end) - pos, zero=True)
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            if hole > data:
                yield Extent(data, hole - data)
            pos = max(hole, data + 1) if hole <= data else hole

    def change_tracking(self, previous_state):
        return None
