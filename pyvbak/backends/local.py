"""Local-filesystem backend: one file per object under a root directory.

How each guarantee of the Backend interface is met:

* atomic: data goes to a temp file ``<dir>/.pyvbak-tmp-<pid>-<scope>-<random>`` (scope:
  processes.scope_token) in the target
  directory (same filesystem), is fsynced, then published in one step — ``os.link`` for
  create-only (fails with EEXIST if the object exists, so exactly one of racing writers wins),
  ``os.replace`` for replace — after which the directory is fsynced.
* kill -9: the only trace is a temp file whose name starts with TEMP_PREFIX; ``list`` skips
  such names, ``cleanup_incomplete`` removes them (one of another scope only once a day old).
* reads: ``read_range`` uses ``os.pread`` (``read_range_into``: ``os.preadv`` straight into
  the caller's buffer) on an fd, so a concurrent ``replace`` cannot mix versions (the fd keeps
  the old inode).
* large writes bypass the page cache (O_DIRECT) through a reused per-thread staging buffer;
  see ``_write_direct`` for the measurement and the fallback.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat as stat_mod
import threading
import time
from collections.abc import Iterator

from pyvbak.backends.base import (
    TEMP_PREFIX,
    AccessDenied,
    Backend,
    BackendError,
    Data,
    ObjectMissing,
    ObjectStream,
    RangeBeyondEnd,
    check_stream_name,
    as_buffers,
    out_of_space,
    validate_name,
    validate_prefix,
)
from pyvbak.backends.base import check_folder_prefix as _check_folder_prefix
from pyvbak import native
from pyvbak.errors import UsageError
from pyvbak.processes import scope_token, temp_writer_alive

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

_O_DIRECT = getattr(os, "O_DIRECT", 0)

# -- direct I/O for large writes ------------------------------------------------------------
# Filling page-cache pages is expensive on the VMs this runs on: writing 1 GiB buffered costs
# 0.3-2.7 s of system CPU (dd bs=16M; the high end when the guest's free pages went back to
# the host), with O_DIRECT ~0.1 s.  So objects of at least DIRECT_MIN_BYTES are copied into a
# page-aligned staging buffer that each thread keeps and reuses (its pages are faulted in
# once: fresh anonymous memory costs ~0.8 s/GiB to touch, recycled ~0.02 s/GiB) and written
# with O_DIRECT; the unaligned tail goes through the normal fd.  bench/backend_write.py, 64 x
# 16 MiB packs of ~300 frames: buffered 0.65-0.72 CPU s/GiB, direct 0.23-0.30 (2.2-3.0x), wall
# 0.9-1.4x; a full backup of a 2 GiB image saves 0.3-0.5 s of system CPU (~6-9 % of its CPU);
# the 1 MiB threshold is where the sweep stops being a wash (bench/RESULTS.md, "Local backend
# writes").  A side effect that is wanted: packs (written once, not read back during a
# backup) no longer evict the disk image being read from the page cache.
#: objects smaller than this are written buffered (see bench/RESULTS.md for the measurement)
DIRECT_MIN_BYTES = 1 << 20
#: prefetch asks the kernel for at most this much per call (see LocalBackend.prefetch)
PREFETCH_PIECE_BYTES = 1 << 20
#: O_DIRECT needs buffer address, length and file offset aligned to the logical block size;
#: 4096 covers 512-byte and 4K-sector devices.
DIRECT_ALIGN = 4096
#: the largest staging buffer per thread; bigger objects are written in pieces of this size
STAGING_MAX_BYTES = 16 << 20
#: a stream (open_stream) writes what it was given once this much is pending: the pieces go
#: to the disk while the caller produces the rest (bench/RESULTS.md, "Pack streaming")
STREAM_PIECE_BYTES = 2 << 20
#: PYVBAK_DIRECT_IO=0 turns the direct path off (e.g. to compare, or on a filesystem where
#: O_DIRECT is accepted but slow); the constructor's ``direct_io`` overrides it.
DIRECT_IO_ENV = "PYVBAK_DIRECT_IO"

# st_dev of filesystems that refused O_DIRECT (EINVAL on open or write, e.g. some FUSE or
# network filesystems): later writes there go straight to the buffered path.
_no_direct_devs: set[int] = set()
_staging = threading.local()
# writes that took each path, for tests and benchmarks
direct_stats = {"direct": 0, "buffered": 0, "fallbacks": 0}


def _staging_buffer(size: int) -> memoryview:
    """This thread's page-aligned staging buffer, at least ``size`` bytes.

    An anonymous mmap is page aligned; it is kept for the thread's lifetime so its pages are
    touched once.  When it has to grow the old map is dropped, not closed: a traceback may
    still hold a slice of it, and it is unmapped when the last view goes away."""
    view = getattr(_staging, "view", None)
    if view is None or view.nbytes < size:
        grown = max(size, 2 * view.nbytes if view is not None else 0)
        grown = min(-(-grown // DIRECT_ALIGN) * DIRECT_ALIGN, max(size, STAGING_MAX_BYTES))
        view = memoryview(mmap.mmap(-1, grown))
        _staging.view = view
    return view


def _direct_default() -> bool:
    return os.environ.get(DIRECT_IO_ENV, "1").strip().lower() not in ("0", "no", "false", "off")


# Temp files of writes in progress in this process (absolute paths), shared by all
# LocalBackend instances so cleanup_incomplete(0) on one never removes another's live write.
_live_temps: set[str] = set()
_live_lock = threading.Lock()


def temp_name() -> str:
    """A fresh temp-file basename: recognisable, unique across processes and threads, and
    naming its writer (``.pyvbak-tmp-<pid>-<scope>-<random>``: processes.scope_token)."""
    return f"{TEMP_PREFIX}{os.getpid()}-{scope_token()}-{secrets.token_hex(8)}"


class LocalBackend(Backend):
    """Objects stored as files below ``root``; "/" in names maps to subdirectories.

    The root and intermediate directories are created on demand by writes; reading from a
    root that does not exist yet reports missing objects.  Files are created with mode 0600
    (disk images hold secrets), directories 0700, both subject to the umask - unless the
    repository's root directory lets its group or others in (see ``_sharing``).
    """

    file_mode = 0o600
    dir_mode = 0o700

    def __init__(self, root: str | os.PathLike, *, direct_io: bool | None = None):
        """``direct_io``: write objects of at least DIRECT_MIN_BYTES with O_DIRECT (the
        default, unless the environment sets PYVBAK_DIRECT_IO=0); False forces the buffered
        path everywhere."""
        root = os.path.abspath(os.fspath(root))
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"backend location {root} exists and is not a directory")
        self.root = root
        self.location = root
        self.direct_io = (_direct_default() if direct_io is None else bool(direct_io)) and bool(_O_DIRECT)
        self._closed = False
        self._shared: tuple[int, int, int, int] | None = None  # (file mode, dir mode, uid, gid)

    def _sharing(self) -> tuple[int, int, int, int] | None:
        """How new files and directories follow the repository's root directory, or None
        for the private defaults (0600/0700 less the umask).

        Group: only a root directory with the setgid bit that grants its group access (an
        administrator's ``chgrp G REPO; chmod 2770 REPO``, or 2750 for members who only
        read) shares new objects with the group: files group-readable, directories with
        the root's group bits, whatever the umask - they were always 0600/0700, and such
        a repository lost its group at the next backup.  A plain directory's group and
        other bits (0755 from mkdir) say nothing: disk images stay private.  Owner: a
        process running as root in a repository another user owns gives new objects that
        owner - a root cron job's backup left 0600 root-owned objects that locked the
        owner out of every command."""
        if self._shared is None:
            try:
                st = os.stat(self.root)
            except OSError:
                return None  # not made yet: the defaults
            mode = stat_mod.S_IMODE(st.st_mode)
            group = mode & 0o070 if mode & stat_mod.S_ISGID and mode & 0o040 else 0
            chown = hasattr(os, "geteuid") and os.geteuid() == 0 and st.st_uid != 0
            self._shared = (self.file_mode | (group & 0o040), self.dir_mode | group | (stat_mod.S_ISGID if group else 0),
                            st.st_uid if chown else -1, st.st_gid if chown else -1)
        f_mode, d_mode, uid, gid = self._shared
        if f_mode == self.file_mode and d_mode == self.dir_mode and uid == -1:
            return None
        return self._shared

    def _share(self, target, *, directory: bool = False) -> None:
        """A new file (by descriptor) or directory (by path) made as ``_sharing`` says -
        best effort: a file system without owners or modes (vfat) refuses, and the object
        is written anyway."""
        shared = self._sharing()
        if shared is None:
            return
        f_mode, d_mode, uid, gid = shared
        chown, chmod = (os.chown, os.chmod) if directory else (os.fchown, os.fchmod)
        try:
            if uid != -1:
                chown(target, uid, gid)
            chmod(target, d_mode if directory else f_mode)
        except OSError:
            pass

    # -- helpers ---------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        return os.path.join(self.root, *validate_name(name).split("/"))

    def _error(self, exc: OSError, name: str, path: str, action: str) -> Exception:
        """Map an OSError to the interface's errors."""
        if exc.errno in _SPACE_ERRNOS:
            return out_of_space(name, f"local backend {self.location}", exc.strerror or "")
        # the path the OS call failed on (a parent directory, a temp file) when it differs
        where = ""
        failed_at = os.fspath(exc.filename) if exc.filename is not None else path
        if failed_at != path:
            where = f" at {failed_at}"
        if exc.errno == errno.EROFS:
            return BackendError(
                f"cannot write {path} (object {name!r} in local backend {self.location}){where}: "
                "the repository is on a read-only file system"
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            # A file being created (a temp file, a lock) does not exist: what refused is
            # its directory - name that, not a file the user cannot find.
            check = failed_at if os.path.lexists(failed_at) else os.path.dirname(failed_at)
            return AccessDenied(
                f"permission denied {action} {path} (object {name!r} in local backend {self.location}): "
                f"check ownership and permissions of {check}"
            )
        return BackendError(
            f"error {action} {path} (object {name!r} in local backend {self.location}){where}: "
            f"{exc.strerror or exc}"
        )

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, dirpath: str) -> None:
        """Create dirpath and missing parents (below or at the root), each one durably."""
        if os.path.isdir(dirpath):
            return
        missing = []
        d = dirpath
        while not os.path.isdir(d):
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            try:
                os.mkdir(d, self.dir_mode)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise NotADirectoryError(errno.ENOTDIR, "an object exists where a directory is needed", d)
                continue  # a concurrent writer created it (and fsyncs its parent)
            if d != self.root:
                self._share(d, directory=True)
            # the new entry must survive a crash before anything inside it relies on it
            self._fsync_dir(os.path.dirname(d))

    def _write_temp(self, dirpath: str, data: Data) -> str:
        """Write data to a fresh fsynced temp file in dirpath; return its path."""
        views, total = as_buffers(data)
        self._ensure_dir(dirpath)
        tmp = os.path.join(dirpath, temp_name())
        with _live_lock:
            _live_temps.add(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, self.file_mode)
            try:
                self._share(fd)
                if not (self.direct_io and total >= DIRECT_MIN_BYTES and self._write_direct(fd, tmp, views, total)):
                    direct_stats["buffered"] += 1
                    for view in views:
                        while view:
                            n = os.write(fd, view)
                            view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self._discard(tmp)
            raise
        return tmp

    @staticmethod
    def _write_direct(fd: int, tmp: str, views: list[memoryview], total: int) -> bool:
        """Write ``views`` (``total`` bytes) to the new, empty temp file ``tmp`` open as
        ``fd``: the largest DIRECT_ALIGN multiple through a second, O_DIRECT fd from this
        thread's staging buffer, the tail through ``fd``.  Return False, with ``fd``'s file
        position still 0, if the filesystem does not do O_DIRECT (EINVAL); the caller then
        writes everything buffered, overwriting whatever got written here.  Other OSErrors
        (ENOSPC, EIO) propagate; the caller removes the temp file."""
        aligned = total - total % DIRECT_ALIGN
        dev = os.fstat(fd).st_dev
        if not aligned or dev in _no_direct_devs:
            return False
        try:
            dfd = os.open(tmp, os.O_WRONLY | _O_DIRECT | _O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _no_direct_devs.add(dev)
            direct_stats["fallbacks"] += 1
            return False
        try:
            stage = _staging_buffer(min(aligned, STAGING_MAX_BYTES))
            cap = min(stage.nbytes, STAGING_MAX_BYTES) // DIRECT_ALIGN * DIRECT_ALIGN
            file_off = 0  # where the staged bytes go in the file
            fill = 0  # bytes of the stage taken by ``parts``
            parts: list[memoryview] = []  # copied into the stage in one native call
            for view in views:
                pos, n = 0, view.nbytes
                while pos < n:
                    k = min(n - pos, cap - fill)
                    parts.append(view[pos:pos + k] if k < n else view)
                    fill += k
                    pos += k
                    if fill == cap:
                        native.gather_into(stage, parts)
                        _pwrite_direct(dfd, fd, stage[:cap], file_off)
                        file_off += cap
                        fill, parts = 0, []
            native.gather_into(stage, parts)
            # what is left: an aligned part (direct) and the unaligned tail (buffered fd)
            head = fill - fill % DIRECT_ALIGN
            if head:
                _pwrite_direct(dfd, fd, stage[:head], file_off)
            if fill > head:
                _pwrite_all(fd, stage[head:fill], file_off + head)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # accepted the open, refused the I/O: a filesystem without real O_DIRECT
            _no_direct_devs.add(dev)
            direct_stats["fallbacks"] += 1
            os.lseek(fd, 0, os.SEEK_SET)
            return False
        finally:
            os.close(dfd)
        direct_stats["direct"] += 1
        return True

    @staticmethod
    def _discard(tmp: str) -> None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # cleanup_incomplete removes it later; the original error matters more
        with _live_lock:
            _live_temps.discard(tmp)

    # -- interface -------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        path = self._path(name)
        try:
            # O_NONBLOCK: a FIFO where an object should be would block the open for ever;
            # only a regular file is an object (a link to /dev/zero read until memory ran out)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}") from None
        except OSError as exc:
            raise self._error(exc, name, path, "reading") from exc
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                raise ObjectMissing(f"object {name!r} not found in local backend {self.location}: "
                                    f"{path} is not a regular file")
            os.set_blocking(fd, True)
            with open(fd, "rb", buffering=0, closefd=False) as f:
                return f.readall()
        except OSError as exc:
            raise self._error(exc, name, path, "reading") from exc
        finally:
            os.close(fd)

    def _open_range(self, name: str, path: str, offset: int, length: int, what: str) -> int:
        """An fd on the object, after checking [offset, offset+length) lies inside it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_CLOEXEC)  # a FIFO: no hang
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}") from None
        except OSError as exc:
            raise self._error(exc, name, path, "opening") from exc
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise ObjectMissing(f"object {name!r} not found in local backend {self.location}")
            if offset + length > st.st_size:
                raise RangeBeyondEnd(
                    f"{what} of {name!r} in local backend {self.location}: bytes "
                    f"[{offset}, {offset + length}) beyond its end ({st.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        if offset < 0 or length < 0:
            raise UsageError(f"read_range of {name!r}: offset ({offset}) and length ({length}) must be >= 0")
        fd = self._open_range(name, path, offset, length, "read_range")
        try:
            parts = []
            pos, left = offset, length
            while left:
                chunk = os.pread(fd, left, pos)
                if not chunk:  # cannot happen for an immutable file; never return short
                    raise RangeBeyondEnd(f"short read of {path} at {pos} (object {name!r} in local backend {self.location})")
                parts.append(chunk)
                pos += len(chunk)
                left -= len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as exc:
            raise self._error(exc, name, path, "reading") from exc
        finally:
            os.close(fd)

    def read_range_into(self, name: str, offset: int, buf) -> None:
        path = self._path(name)
        try:
            view = memoryview(buf)
        except TypeError:
            raise UsageError(f"read_range_into of {name!r}: buf must be a writable buffer, not {type(buf).__name__}") from None
        if view.readonly or not view.c_contiguous:
            raise UsageError(f"read_range_into of {name!r}: buf must be a writable, C-contiguous buffer")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = view.nbytes
        if offset < 0:
            raise UsageError(f"read_range_into of {name!r}: offset ({offset}) must be >= 0")
        fd = self._open_range(name, path, offset, length, "read_range_into")
        try:
            done = 0
            while done < length:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:  # cannot happen for an immutable file; never leave buf half-filled silently
                    raise RangeBeyondEnd(
                        f"short read of {path} at {offset + done} (object {name!r} in local backend {self.location})"
                    )
                done += n
        except OSError as exc:
            raise self._error(exc, name, path, "reading") from exc
        finally:
            os.close(fd)

    def prefetch(self, name: str, offset: int, length: int) -> None:
        # POSIX_FADV_WILLNEED starts asynchronous readahead of the range and returns, but
        # the kernel reads at most max(read_ahead_kb, max_sectors_kb) per call (8 MiB on
        # this project's VMs, 128 KiB-1 MiB on many disks): one call for a 16 MiB pack
        # range left half of it to be read synchronously by the restore worker (`fincore`
        # after a 16 MiB WILLNEED: 8 MiB cached).  Hence one call per PREFETCH_PIECE_BYTES.
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except Exception:  # a hint: the read itself reports a missing object
            return
        try:
            for pos in range(offset, offset + length, PREFETCH_PIECE_BYTES):
                os.posix_fadvise(fd, pos, min(PREFETCH_PIECE_BYTES, offset + length - pos), os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError, OverflowError):  # (a damaged record's offset: the read says so)
            pass
        finally:
            os.close(fd)

    def open_stream(self, folder: str) -> ObjectStream:
        _check_folder_prefix(folder)
        if not folder:
            raise UsageError("open_stream needs a folder such as 'packs/'")
        return _LocalObjectStream(self, folder)

    def _link_new(self, tmp: str, name: str) -> bool:
        """Publish the complete, fsynced temp file ``tmp`` as ``name``, create-only (the
        second half of write_new); True if created.  The caller removes ``tmp``."""
        path = self._path(name)
        dirpath = os.path.dirname(path)
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "a directory exists where the object should be", path)
            self._ensure_dir(dirpath)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            self._fsync_dir(dirpath)
            return True
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) and os.path.exists(tmp):
                raise BackendError(
                    f"cannot create {path} (object {name!r}) in local backend {self.location}: the "
                    f"filesystem refused a hard link ({exc.strerror}); pyvbak needs hard links for "
                    f"atomic create-only writes, use a filesystem that supports them"
                ) from exc
            raise self._error(exc, name, path, "writing") from exc

    def write_new(self, name: str, data: Data) -> bool:
        path = self._path(name)
        dirpath = os.path.dirname(path)
        tmp = None
        try:
            try:
                if os.path.isdir(path):  # before the data is written, not after
                    raise IsADirectoryError(errno.EISDIR, "a directory exists where the object should be", path)
                tmp = self._write_temp(dirpath, data)
            except OSError as exc:
                raise self._error(exc, name, path, "writing") from exc
            return self._link_new(tmp, name)
        finally:
            if tmp is not None:
                self._discard(tmp)

    def replace(self, name: str, data: Data) -> None:
        path = self._path(name)
        dirpath = os.path.dirname(path)
        tmp = None
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "a directory exists where the object should be", path)
            tmp = self._write_temp(dirpath, data)
            os.replace(tmp, path)
            with _live_lock:
                _live_temps.discard(tmp)
            tmp = None
            self._fsync_dir(dirpath)
        except OSError as exc:
            raise self._error(exc, name, path, "writing") from exc
        finally:
            if tmp is not None:
                self._discard(tmp)

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        # Start the walk at the deepest directory the prefix fully names.
        head, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *head.split("/")) if head else self.root
        rel_start = head + "/" if head else ""
        yield from self._walk(start, rel_start, prefix)

    def _walk(self, dirpath: str, rel: str, prefix: str) -> Iterator[str]:
        try:
            it = os.scandir(dirpath)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._error(exc, rel or ".", dirpath, "listing") from exc
        subdirs = []
        with it:
            for entry in it:
                if entry.name.startswith(TEMP_PREFIX):
                    continue
                name = rel + entry.name
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    # descend only where names below can still match the prefix
                    sub = name + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        subdirs.append((entry.path, sub))
                elif name.startswith(prefix):
                    yield name
        for path, sub in subdirs:
            yield from self._walk(path, sub, prefix)

    def stat(self, name: str) -> int:
        path = self._path(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}") from None
        except OSError as exc:
            raise self._error(exc, name, path, "inspecting") from exc
        if not stat_mod.S_ISREG(st.st_mode):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}")
        return st.st_size

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectMissing:
            return False
        return True

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            if os.path.isdir(path):
                raise ObjectMissing(f"object {name!r} not found in local backend {self.location}")
            os.unlink(path)
            self._fsync_dir(os.path.dirname(path))
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}") from None
        except OSError as exc:
            raise self._error(exc, name, path, "deleting") from exc

    def cleanup_incomplete(self, older_than_seconds: float = 0, prefix: str = "") -> list[str]:
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        _check_folder_prefix(prefix)
        cutoff = time.time() - older_than_seconds
        removed = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, prefix.rstrip("/")) if prefix else self.root):
            for fn in filenames:
                if not fn.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(dirpath, fn)
                with _live_lock:
                    if path in _live_temps:
                        continue
                try:
                    mtime = os.lstat(path).st_mtime
                    if mtime > cutoff or _writer_alive(fn, mtime):
                        continue  # young enough, or its writer is still writing it
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise self._error(exc, fn, path, "removing temp file") from exc
                removed.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        return removed

    def close(self) -> None:
        self._closed = True


class _LocalObjectStream(ObjectStream):
    """A temp file in the folder, filled as pieces arrive (O_DIRECT in aligned pieces of
    STREAM_PIECE_BYTES or more, like write_new's large objects), fsynced and hard-linked
    under its name at commit.  The temp file carries the writer's pid like any other, so a
    killed writer's stream is a recognisable leftover."""

    def __init__(self, backend: LocalBackend, folder: str):
        self._backend, self._folder = backend, folder
        self._dir = os.path.join(backend.root, *folder.rstrip("/").split("/"))
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._offset = 0  # bytes already in the file
        self._fd = self._dfd = -1
        self._broken: BaseException | None = None
        self._done = False
        self._tmp: str | None = None
        try:
            self._create(backend, folder)
        except BaseException:
            # (a Ctrl-C or SIGTERM between creating the temp file and returning the stream
            # left it: the caller never had the stream to abort)
            self.abort()
            raise

    def _create(self, backend: LocalBackend, folder: str) -> None:
        try:
            backend._ensure_dir(self._dir)
            self._tmp = os.path.join(self._dir, temp_name())
            with _live_lock:
                _live_temps.add(self._tmp)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, backend.file_mode)
            backend._share(self._fd)
        except OSError as exc:
            self.abort()
            raise backend._error(exc, folder, self._dir, "creating a temp file in") from exc
        if backend.direct_io and os.fstat(self._fd).st_dev not in _no_direct_devs:
            try:
                self._dfd = os.open(self._tmp, os.O_WRONLY | _O_DIRECT | _O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    self.abort()
                    raise backend._error(exc, folder, self._tmp, "opening") from exc
                _no_direct_devs.add(os.fstat(self._fd).st_dev)

    def _check(self) -> None:
        if self._done:
            raise UsageError("the stream was committed or aborted")
        if self._broken is not None:
            raise BackendError(f"an earlier write of this stream to {self._dir} failed: {self._broken}")

    def write(self, data: Data) -> None:
        self._check()
        views, total = as_buffers(data)
        self._pending.extend(views)
        self._pending_bytes += total
        if self._pending_bytes >= STREAM_PIECE_BYTES:
            self._write_pending(final=False)

    def _write_pending(self, final: bool) -> None:
        """Write the pending pieces: all of them when ``final``, else the largest
        DIRECT_ALIGN multiple (the rest, under 4 KiB, stays pending)."""
        total = self._pending_bytes
        keep = 0 if final else total % DIRECT_ALIGN
        n = total - keep
        try:
            if self._dfd >= 0 and n >= DIRECT_ALIGN:
                stage = _staging_buffer(min(n, STAGING_MAX_BYTES))
                cap = min(stage.nbytes, STAGING_MAX_BYTES) // DIRECT_ALIGN * DIRECT_ALIGN
                views, self._pending = self._pending, []
                taken, parts, fill = 0, [], 0
                rest: list[memoryview] = []
                for v in views:  # cut the views into stage-sized pieces, then `keep` bytes stay
                    pos = 0
                    while pos < v.nbytes:
                        if taken == n:
                            rest.append(v[pos:])
                            break
                        k = min(v.nbytes - pos, cap - fill, n - taken)
                        parts.append(v[pos:pos + k])
                        fill += k
                        taken += k
                        pos += k
                        if fill == cap or taken == n:
                            native.gather_into(stage, parts)
                            self._write_stage(stage, fill)
                            fill, parts = 0, []
                self._pending, self._pending_bytes = rest, keep
            else:
                views, self._pending = self._pending, []
                self._pending_bytes = 0
                for v in views:
                    _pwrite_all(self._fd, v, self._offset)
                    self._offset += v.nbytes
        except OSError as exc:
            raise self._fail(self._backend._error(exc, self._folder, self._tmp, "writing")) from exc

    def _write_stage(self, stage: memoryview, fill: int) -> None:
        """The first ``fill`` staged bytes at the file's end: the aligned head direct, the
        tail buffered."""
        head = fill - fill % DIRECT_ALIGN if self._dfd >= 0 else 0
        if head:
            try:
                _pwrite_direct(self._dfd, self._fd, stage[:head], self._offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # took the O_DIRECT open, refuses the I/O: this file system goes buffered
                _no_direct_devs.add(os.fstat(self._fd).st_dev)
                direct_stats["fallbacks"] += 1
                os.close(self._dfd)
                self._dfd = -1
                _pwrite_all(self._fd, stage[:head], self._offset)
        if fill > head:
            _pwrite_all(self._fd, stage[head:fill], self._offset + head)
        self._offset += fill

    def _fail(self, exc: BaseException) -> BaseException:
        self._broken = exc
        return exc

    def commit(self, name: str) -> bool:
        if self._done:
            raise UsageError("the stream was committed or aborted")
        try:
            self._check()
            check_stream_name(name, self._folder)
            self._write_pending(final=True)
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise self._backend._error(exc, name, self._tmp, "writing") from exc
            self._close_fds()
            return self._backend._link_new(self._tmp, name)
        finally:
            self.abort()  # closes and removes the temp file (the object, if made, is a link)

    def _close_fds(self) -> None:
        for attr in ("_dfd", "_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._pending, self._pending_bytes = [], 0
        self._close_fds()
        if self._tmp is not None:
            self._backend._discard(self._tmp)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pwrite_direct(dfd: int, fd: int, view: memoryview, offset: int) -> None:
    """Write an aligned piece of the staging buffer with O_DIRECT.  A short direct write
    (the disk filling up) may end unaligned, so the rest goes through the buffered fd,
    where the next write reports the error."""
    n = os.pwrite(dfd, view, offset)
    if n < view.nbytes:
        _pwrite_all(fd, view[n:], offset + n)


def _writer_alive(temp_name: str, mtime: float) -> bool:
    """Temp names carry the writer's pid and scope (``.pyvbak-tmp-<pid>-<scope>-<random>``;
    older ones ``<pid>-<random>``): a temp file whose writer still runs is a write in
    progress, not a leftover, whatever its age - and one of another container or host
    (whose pid means nothing here) is left alone for a day (processes.temp_writer_alive)."""
    parts = temp_name[len(TEMP_PREFIX):].split("-")
    try:
        pid = int(parts[0])
    except ValueError:
        return False
    scope = parts[1] if len(parts) == 3 else None
    if pid == os.getpid() and scope in (None, scope_token()):
        return False  # our own: _live_temps above already protects writes in progress
    return temp_writer_alive(pid, scope, mtime)
