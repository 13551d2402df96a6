"""Local-filesystem backend: one file per object under a root directory.

How each guarantee of the Backend interface is met:

* atomic: data goes to a temp file ``<dir>/.pyvbak-tmp-<pid>-<random>`` in the target
  directory (same filesystem), is fsynced, then published in one step — ``os.link`` for
  create-only (fails with EEXIST if the object exists, so exactly one of racing writers wins),
  ``os.replace`` for replace — after which the directory is fsynced.
* kill -9: the only trace is a temp file whose name starts with TEMP_PREFIX; ``list`` skips
  such names, ``cleanup_incomplete`` removes them.
* reads: ``read_range`` uses ``os.pread`` on an fd, so a concurrent ``replace`` cannot mix
  versions (the fd keeps the old inode).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as stat_mod
import threading
import time
from collections.abc import Iterator

from pyvbak.backends.base import (
    TEMP_PREFIX,
    Backend,
    BackendError,
    Data,
    ObjectMissing,
    as_buffers,
    out_of_space,
    validate_name,
    validate_prefix,
)
from pyvbak.errors import UsageError

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Temp files of writes in progress in this process (absolute paths), shared by all
# LocalBackend instances so cleanup_incomplete(0) on one never removes another's live write.
_live_temps: set[str] = set()
_live_lock = threading.Lock()


def temp_name() -> str:
    """A fresh temp-file basename: recognisable, and unique across processes and threads."""
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


class LocalBackend(Backend):
    """Objects stored as files below ``root``; "/" in names maps to subdirectories.

    The root and intermediate directories are created on demand by writes; reading from a
    root that does not exist yet reports missing objects.  Files are created with mode 0600
    (disk images hold secrets), directories 0700, both subject to the umask.
    """

    file_mode = 0o600
    dir_mode = 0o700

    def __init__(self, root: str | os.PathLike):
        root = os.path.abspath(os.fspath(root))
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"backend location {root} exists and is not a directory")
        self.root = root
        self.location = root
        self._closed = False

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
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return BackendError(
                f"permission denied {action} {path} (object {name!r} in local backend "
                f"{self.location}){where}: {exc.strerror}; check ownership and permissions of "
                f"{failed_at if where else 'that path'} and its parent directories"
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
            # the new entry must survive a crash before anything inside it relies on it
            self._fsync_dir(os.path.dirname(d))

    def _write_temp(self, dirpath: str, data: Data) -> str:
        """Write data to a fresh fsynced temp file in dirpath; return its path."""
        views, _ = as_buffers(data)
        self._ensure_dir(dirpath)
        tmp = os.path.join(dirpath, temp_name())
        with _live_lock:
            _live_temps.add(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, self.file_mode)
            try:
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
            with open(path, "rb", buffering=0) as f:
                return f.readall()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}") from None
        except OSError as exc:
            raise self._error(exc, name, path, "reading") from exc

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        if offset < 0 or length < 0:
            raise UsageError(f"read_range of {name!r}: offset ({offset}) and length ({length}) must be >= 0")
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"object {name!r} not found in local backend {self.location}") from None
        except OSError as exc:
            raise self._error(exc, name, path, "opening") from exc
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise ObjectMissing(f"object {name!r} not found in local backend {self.location}")
            if offset + length > st.st_size:
                raise BackendError(
                    f"read_range of {name!r} in local backend {self.location}: bytes "
                    f"[{offset}, {offset + length}) beyond its end ({st.st_size} bytes)"
                )
            parts = []
            pos, left = offset, length
            while left:
                chunk = os.pread(fd, left, pos)
                if not chunk:  # cannot happen for an immutable file; never return short
                    raise BackendError(f"short read of {path} at {pos} (object {name!r} in local backend {self.location})")
                parts.append(chunk)
                pos += len(chunk)
                left -= len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as exc:
            raise self._error(exc, name, path, "reading") from exc
        finally:
            os.close(fd)

    def write_new(self, name: str, data: Data) -> bool:
        path = self._path(name)
        dirpath = os.path.dirname(path)
        tmp = None
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "a directory exists where the object should be", path)
            tmp = self._write_temp(dirpath, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            self._fsync_dir(dirpath)
            return True
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) and tmp is not None and os.path.exists(tmp):
                raise BackendError(
                    f"cannot create {path} (object {name!r}) in local backend {self.location}: the "
                    f"filesystem refused a hard link ({exc.strerror}); pyvbak needs hard links for "
                    f"atomic create-only writes, use a filesystem that supports them"
                ) from exc
            raise self._error(exc, name, path, "writing") from exc
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

    def cleanup_incomplete(self, older_than_seconds: float = 0) -> list[str]:
        if self._closed:
            raise UsageError(f"backend {self.location} is closed")
        cutoff = time.time() - older_than_seconds
        removed = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for fn in filenames:
                if not fn.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(dirpath, fn)
                with _live_lock:
                    if path in _live_temps:
                        continue
                if _writer_alive(fn):
                    continue  # another live process on this host is still writing it
                try:
                    if os.lstat(path).st_mtime > cutoff:
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise self._error(exc, fn, path, "removing temp file") from exc
                removed.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        return removed

    def close(self) -> None:
        self._closed = True


def _writer_alive(temp_name: str) -> bool:
    """Temp names carry the writer's pid (``.pyvbak-tmp-<pid>-<random>``): a temp file whose
    writer still runs is a write in progress, not a leftover, whatever its age."""
    try:
        pid = int(temp_name[len(TEMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # our own: _live_temps above already protects writes in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
