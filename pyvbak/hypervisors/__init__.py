"""Control planes: turn what the user names (a path or a URI) into an open Source.

``open_source(spec, previous_state=...)`` is a context manager yielding a Source; for a
hypervisor it also owns the snapshot/export/bitmap resources and cleans them up on exit
(success, error, Ctrl-C, SIGTERM).  ``open_disks(spec, ...)`` is the same for a spec
that may mean several disks of one VM (``qemu:///SOCK``: every disk; ``?node=``,
``?device=`` repeated), all frozen at one instant.  The engine never knows which hypervisor a disk came from.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from ..errors import UsageError

from .image_formats import FORMAT_CHOICES, QEMU_FORMATS, QEMU_IMAGE_SUFFIXES, raw_container_warning

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbd+tcp://")
# QEMU_IMAGE_SUFFIXES: image formats QEMU reads that are not raw, served read-only by
# qemu-nbd (covers Hyper-V's vhdx/vhd, VMware's vmdk, VirtualBox's vdi, Xen/XCP-ng's vhd);
# each names its format (image_formats.SUFFIX_FORMATS), which QEMU is told: never probed.


def default_work_dir() -> str:
    """Where sockets and fleecing files live; the same place every run, so the next run
    finds what a killed one left."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(xdg) and not os.environ.get("PYVBAK_WORK_DIR"):
        # the XDG spec: a relative path is invalid and ignored (as repo/cache.py does)
        home = os.path.expanduser("~")
        if not os.path.isabs(home):  # no HOME, no passwd entry: "~" would be a directory here
            raise UsageError("no home directory to keep the work dir (sockets and fleecing files) in: set HOME, "
                             "or PYVBAK_WORK_DIR to a directory only you can write")
        xdg = os.path.join(home, ".cache")
    base = os.environ.get("PYVBAK_WORK_DIR") or os.path.join(xdg, "pyvbak", "work")
    # absolute: QEMU opens the fleecing files and sockets named in it from its own working
    # directory (a relative PYVBAK_WORK_DIR failed as "Could not open 'relwork/...'")
    base = os.path.abspath(base)
    from ..repo.cache import make_private_dirs, untrusted_dir_reason

    # judged before anything is made in it, and after: whoever can write it could put a
    # socket of their own where a backup connects to QEMU, or read the fleecing files
    reason = untrusted_dir_reason(base)
    if reason is None:
        try:
            make_private_dirs(base)
        except OSError as exc:
            which = f" ({exc.filename})" if exc.filename and exc.filename != base else ""
            raise UsageError(f"cannot create the work dir {base} (sockets and fleecing files): {exc.strerror}{which}; "
                             "set PYVBAK_WORK_DIR to a writable directory") from None
        reason = untrusted_dir_reason(base)
    if reason is not None:
        raise UsageError(f"the work dir {base} (sockets and fleecing files) is not private: {reason}; "
                         f"{reason.advice()}, or set PYVBAK_WORK_DIR to a directory only you can write") from None
    return base


class SessionSource:
    """The engine's view of a hypervisor session: the NBD export of the frozen disk,
    with change tracking answered by the session (which checked the bitmap first)."""

    def __init__(self, session, nbd):
        self.session, self.nbd = session, nbd
        self.description = session.description
        self.size = nbd.size
        # what the session found about the image (a dirty bitmap it could not rotate):
        # run_backup reports them with its own warnings
        self.source_warnings = list(getattr(session, "source_warnings", None) or ())

    def _check(self) -> None:
        if self.session.broken:
            from ..errors import SourceError

            raise SourceError(self.session.broken)

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        data = self.nbd.read(offset, length)
        self._check()  # after too: data that arrived once the view broke is not trusted
        return data

    def read_into(self, offset: int, buffer) -> int:
        self._check()
        n = self.nbd.read_into(offset, buffer)
        self._check()  # as read(): data that arrived once the view broke is not trusted
        return n

    def read_ranges_into(self, ranges, buffer) -> int:
        self._check()
        n = self.nbd.read_ranges_into(ranges, buffer)
        self._check()  # as read()
        return n

    def extents(self):
        out = list(self.nbd.extents())
        self._check()
        return out

    def zero_ranges(self, within=None):
        out = self.nbd.zero_ranges(within=within)
        self._check()
        return out

    def done_reading(self) -> None:
        """The engine has read all it will: disconnect, and let a hot session remove this
        disk's point-in-time view now rather than after the commit (``release_view``)."""
        self.nbd.close()
        release = getattr(self.session, "release_view", None)
        if release is not None:
            release()

    def change_tracking(self, previous_state):
        from ..sources.base import ChangeTracking

        state = dict(self.session.change_tracking_state)
        # With --verify-cbt the session reports a fallback reason but still offers the
        # bitmap it would have trusted: the engine scans everything and compares.
        trusted = self.session.fallback_reason is None or getattr(self.session, "verify_cbt", False)
        if not (trusted and self.session.dirty_bitmap):
            return ChangeTracking(None, state, self.session.fallback_reason or "no dirty bitmap")
        return ChangeTracking(self.nbd.dirty_extents(), state, None)


#: the URI schemes a source may have (RFC 3986: schemes are case-insensitive)
_SCHEMES = ("qemu", "nbd", "nbd+unix", "nbd+tcp", "nbds", "nbds+unix", "nbds+tcp", "file")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def source_spec(spec: str) -> str:
    """The SOURCE argument as the rest of this package reads it: a URI's scheme in lower
    case (``QEMU:///...`` was refused as an unsupported source).  UsageError for QEMU's
    own spellings, which are no URI pyvbak reads: ``qemu:PATH`` without ``//`` was taken
    for an image file name that did not exist, ``nbd:unix:PATH`` (qemu-img's legacy NBD
    form) too - unless a file of that name exists."""
    from ..backends import file_uri_path, is_file_uri

    m = _SCHEME.match(spec)
    if is_file_uri(spec):
        # RFC 8089, as for a repository location (backends.file_uri_path): the plain
        # absolute path ("file://x.img" was read as the relative ./x.img, "file:///a%20b.img"
        # as a file named "a%20b.img")
        return file_uri_path(spec, "source")
    if os.path.lexists(spec):  # a path that exists is that path, however it is spelled ("File://x.img")
        # (made plainly a path: "file://x.img" of a directory "file:" was stripped to ./x.img)
        return "./" + spec if m else spec
    if m and m.group(1).lower() in _SCHEMES:
        return m.group(1).lower() + spec[len(m.group(1)):]
    lowered = spec.lower()
    if lowered.startswith(("qemu:", "nbd:")):  # (an existing path of that name returned above)
        if lowered.startswith("qemu:"):
            raise UsageError(f"source {spec!r}: a running VM is named qemu:///ABSOLUTE/PATH/QMP.SOCK?node=NODE "
                             f"(three slashes, then the socket's absolute path)")
        raise UsageError(f"source {spec!r}: give an NBD export as nbd+unix:///EXPORT?socket=PATH or "
                         f"nbd://HOST[:PORT]/EXPORT (QEMU's legacy nbd:... form is not read)")
    return spec


def default_disk_name(spec: str) -> str:
    """Default --disk: the image's file name without its extension (the last one:
    ``web01.data.img`` is ``web01.data``, not ``web01``, which another disk of the VM
    would share), or the NBD export."""
    if spec.startswith(NBD_SCHEMES):
        from ..sources.nbd import parse_nbd_uri

        return (parse_nbd_uri(spec)["export"] or "disk0").replace("/", "-")
    base = os.path.basename(spec.rstrip("/")) or "disk0"
    return os.path.splitext(base)[0] or base


def disk_names(spec: str, disk: str | None = None) -> list[str]:
    """The disk names a backup of ``spec`` makes snapshots of, in order: ``--disk`` or
    the default name for one disk.  A qemu:// URI names its disks by node or device
    (``?node=``, ``?device=``); one without either means every disk of the VM, and QEMU
    is asked which those are."""
    if spec.startswith("qemu://"):
        from .qemu.vm_disks import parse_qemu_uri_disks, query_disk_names

        path, selectors = parse_qemu_uri_disks(spec)
        names = query_disk_names(path, selectors)
        if len(names) > 1 and disk is not None:
            raise UsageError(f"--disk names one disk, but {spec} means {len(names)} disks "
                             f"({', '.join(names)}): their snapshots are named after them; drop --disk")
        return [disk] if disk is not None else names
    # '' is a name given (and refused as empty by check_vm_disk_names), not a default
    return [disk if disk is not None else default_disk_name(spec)]


class OpenedDisk:
    """One disk of ``open_disks``: ``name``; ``open()`` → context manager of its Source;
    ``commit()`` once its snapshot is durable (retires its old dirty-bitmap generation)."""

    def __init__(self, name: str, opener, committer=None):
        self.name, self._opener, self._committer = name, opener, committer

    def open(self):
        return self._opener()

    def commit(self) -> None:
        if self._committer is not None:
            self._committer()


def check_image_format(spec: str, image_format: str) -> None:
    """``backup --format``: one of FORMAT_CHOICES, and only for image files and devices."""
    if image_format not in FORMAT_CHOICES:
        raise UsageError(f"unknown image format {image_format!r}: give one of {', '.join(FORMAT_CHOICES)}")
    if image_format != "auto" and "://" in spec and not spec.startswith("file://") and not os.path.lexists(spec):
        raise UsageError(f"--format is for image files and block devices; {spec.split('://', 1)[0]}:// sources "
                         f"say their own format: drop --format")


@contextmanager
def open_disks(spec: str, names: list[str], *, previous_states: dict[str, dict | None],
               verify_cbt: bool = False, work_dir: str | None = None, image_format: str = "auto",
               bitmap_owner=None):
    """Yields (list of OpenedDisk, cleaned) for the disks ``disk_names`` gave; ``cleaned``
    fills with what the hypervisor session removed of an earlier, killed run.
    ``bitmap_owner``: QemuHotBackup's (which snapshot recorded a dirty bitmap).
    ``image_format``: how an image file or device is read (``check_image_format``).

    The disks of a qemu:// URI share one hypervisor session: their point-in-time views
    are taken in one step, so together they are what the VM's disks held at one instant;
    each disk's source is opened in turn."""
    if spec.startswith("qemu://"):
        from .qemu import QemuHotBackup

        with QemuHotBackup(spec, previous_states=previous_states, disk_names=names,
                           work_dir=work_dir or default_work_dir(), verify_cbt=verify_cbt,
                           bitmap_owner=bitmap_owner) as session:
            yield [OpenedDisk(d.name, lambda d=d: _disk_source(d), d.commit)
                   for d in session.disks], list(session.cleaned_leftovers)
        return
    name = names[0]
    holder: dict = {}
    cleaned: list[str] = []

    @contextmanager
    def opener():
        with open_source(spec, previous_state=previous_states.get(name), verify_cbt=verify_cbt,
                         work_dir=work_dir, image_format=image_format) as (src, session):
            holder["session"] = session
            cleaned.extend(getattr(session, "cleaned_leftovers", None) or [])
            yield src

    def committer():
        if holder.get("session") is not None:
            holder["session"].commit()

    yield [OpenedDisk(name, opener, committer)], cleaned


@contextmanager
def _disk_source(disk):
    with disk.open_source() as nbd:
        yield SessionSource(disk, nbd)


@contextmanager
def open_source(spec: str, *, previous_state: dict | None = None, verify_cbt: bool = False, work_dir: str | None = None,
                image_format: str = "auto"):
    """Yields (source, session); call ``session.commit()`` after a successful backup
    (session is None for sources that own no hypervisor resources).  ``image_format``: an
    image file or device is read as that format (``raw``, or through qemu-nbd), or with
    ``auto`` in the format its name's suffix names (image_formats.SUFFIX_FORMATS), raw
    without one."""
    spec = source_spec(spec)  # a library caller's "QEMU:///...", "file://localhost/..." (idempotent)
    check_image_format(spec, image_format)
    path = spec[len("file://") :] if spec.startswith("file://") else spec
    if image_format in QEMU_FORMATS:
        from .qemu import QemuOfflineImage

        with QemuOfflineImage(path, previous_state=previous_state, work_dir=work_dir or default_work_dir(),
                              verify_cbt=verify_cbt, image_format=image_format) as session:
            with session.open_source() as nbd:
                yield SessionSource(session, nbd), session
        return
    if spec.startswith(NBD_SCHEMES):
        from ..sources.nbd import NbdSource

        with NbdSource(spec) as src:
            yield src, None
        return
    if spec.startswith("qemu://") or (image_format == "auto" and spec.lower().endswith(QEMU_IMAGE_SUFFIXES)):
        from .qemu import QemuHotBackup, QemuOfflineImage

        kind = QemuHotBackup if spec.startswith("qemu://") else QemuOfflineImage
        work = work_dir or default_work_dir()
        # an image's path without file:// (QemuOfflineImage took the URI for a relative path)
        with kind(spec if kind is QemuHotBackup else path, previous_state=previous_state, work_dir=work, verify_cbt=verify_cbt) as session:
            with session.open_source() as nbd:
                yield SessionSource(session, nbd), session
        return
    if "://" in spec and not spec.startswith("file://") and not os.path.lexists(spec):
        scheme = spec.split("://", 1)[0]
        raise UsageError(
            f"unsupported source '{scheme}://': give an image path, nbd://HOST[:PORT]/EXPORT, "
            "nbd+unix:///EXPORT?socket=PATH or qemu:///QMP.SOCK?node=NODE"
        )
    from ..sources.file import FileSource

    with FileSource(path) as src:
        if image_format == "auto":
            warning = raw_container_warning(path)
            if warning:
                src.source_warnings = [warning]  # run_backup reports them with its own
        yield src, None
