"""Control planes: turn what the user names (a path or a URI) into an open Source.

``open_source(spec, previous_state=...)`` is a context manager yielding a Source; for a
hypervisor it also owns the snapshot/export/bitmap resources and cleans them up on exit
(success, error, Ctrl-C, SIGTERM).  ``open_disks(spec, ...)`` is the same for a spec
that may mean several disks of one VM (``qemu:///SOCK``: every disk; ``?node=``,
``?device=`` repeated), all frozen at one instant.  The engine never knows which hypervisor a disk came from.

Which kind of source a SOURCE is (a running QEMU VM, an NBD export, an image file QEMU
reads, a raw file or device, a URI no kind reads) is decided in one place,
``source_kind``; each kind says how its disks are named and how they are opened.  A new
kind (another hypervisor) is a class beside the others, its URI scheme in
``_KIND_OF_SCHEME`` and its URI form in the message refusing other schemes
(``_Unsupported``).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from ..errors import UsageError

from .image_formats import FORMAT_CHOICES, QEMU_FORMATS, QEMU_IMAGE_SUFFIXES, raw_container_warning


def default_work_dir() -> str:
    """Where sockets and fleecing files live; the same place every run, so the next run
    finds what a killed one left."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(xdg) and not os.environ.get("PYVBAK_WORK_DIR"):
        # the XDG spec: a relative path is invalid and ignored (as repo/cache.py does)
        from ..repo.cache import home_problem

        problem = home_problem()
        if problem:
            raise UsageError(f"{problem}, so the work dir (sockets and fleecing files) cannot be kept under it: "
                             f"set HOME, or PYVBAK_WORK_DIR to a directory only you can write")
        xdg = os.path.join(os.path.expanduser("~"), ".cache")
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


#: the URI schemes of sources no kind reads (TLS NBD; ``file:`` URIs are paths to
#: source_spec), lowercased too (RFC 3986: schemes are case-insensitive) so that their
#: refusal names them one way
_OTHER_SCHEMES = ("nbds", "nbds+unix", "nbds+tcp", "file")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def source_spec(spec: str) -> str:
    """The SOURCE argument as the rest of this package reads it: a URI's scheme in lower
    case (``QEMU:///...`` was refused as an unsupported source).  UsageError for QEMU's
    own spellings, which are no URI pyvbak reads: ``qemu:PATH`` without ``//`` was taken
    for an image file name that did not exist, ``nbd:unix:PATH`` (qemu-img's legacy NBD
    form) too - unless a file of that name exists."""
    from ..backends import file_uri_path, is_file_uri

    if not spec:  # ("disk image  does not exist", exit 4: a usage error, not a missing file)
        raise UsageError("SOURCE is empty: give an image path, nbd://HOST[:PORT]/EXPORT, "
                         "nbd+unix:///EXPORT?socket=PATH or qemu:///QMP.SOCK?node=NODE")
    m = _SCHEME.match(spec)
    if is_file_uri(spec):
        # RFC 8089, as for a repository location (backends.file_uri_path): the plain
        # absolute path ("file://x.img" was read as the relative ./x.img, "file:///a%20b.img"
        # as a file named "a%20b.img")
        return file_uri_path(spec, "source")
    if os.path.lexists(spec):  # a path that exists is that path, however it is spelled ("File://x.img")
        # (made plainly a path: "file://x.img" of a directory "file:" was stripped to ./x.img)
        return "./" + spec if m else spec
    if m and (m.group(1).lower() in _KIND_OF_SCHEME or m.group(1).lower() in _OTHER_SCHEMES):
        return m.group(1).lower() + spec[len(m.group(1)):]
    lowered = spec.lower()
    if lowered.startswith(("qemu:", "nbd:")):  # (an existing path of that name returned above)
        if lowered.startswith("qemu:"):
            raise UsageError(f"source {spec!r}: a running VM is named qemu:///ABSOLUTE/PATH/QMP.SOCK?node=NODE "
                             f"(three slashes, then the socket's absolute path)")
        raise UsageError(f"source {spec!r}: give an NBD export as nbd+unix:///EXPORT?socket=PATH or "
                         f"nbd://HOST[:PORT]/EXPORT (QEMU's legacy nbd:... form is not read)")
    return spec


def _names_uri(spec: str) -> bool:
    """Whether ``spec`` is a URI, not a path: ``SCHEME://`` that is no ``file://`` URI and
    no existing file of that name."""
    return "://" in spec and not spec.startswith("file://") and not os.path.lexists(spec)


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


class _OneDisk:
    """A kind of source that is one disk: named ``--disk`` or after itself
    (``default_name``), opened alone (``open``: a context manager yielding (source,
    session), session None for a source that owns no hypervisor resources)."""

    def default_name(self, spec: str) -> str:
        """Default --disk: the image's file name without its extension (the last one:
        ``web01.data.img`` is ``web01.data``, not ``web01``, which another disk of the VM
        would share)."""
        base = os.path.basename(spec.rstrip("/")) or "disk0"
        return os.path.splitext(base)[0] or base

    def disk_names(self, spec: str, disk: str | None) -> list[str]:
        # '' is a name given (and refused as empty by check_vm_disk_names), not a default
        return [disk if disk is not None else self.default_name(spec)]

    @contextmanager
    def open_disks(self, spec: str, names: list[str], *, previous_states, verify_cbt, work_dir, image_format,
                   bitmap_owner):
        # the disk is opened by open_source, which decides again with image_format: a
        # file's --format changes how it is read, not which disks it is
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


class _RawFile(_OneDisk):
    """An image file or block device read as raw bytes (a path, or --format raw)."""

    @contextmanager
    def open(self, spec, *, previous_state, verify_cbt, work_dir, image_format):
        from ..errors import SourceError
        from ..sources.file import FileSource
        from .qemu.image_locks import held_for_writing

        with FileSource(spec) as src:
            if held_for_writing(src.fileno()):  # (as qemu-img refuses a qcow2 a VM holds: offline.image_chain)
                raise SourceError(f"disk image {spec} is in use (locked for writing, probably by the running VM): "
                                  f"back up a running VM through its QMP socket with a "
                                  f"qemu:///PATH/TO/QMP.SOCK?node=NODE URI instead")
            warnings = [src.in_use_elsewhere()]
            if image_format == "auto":
                warnings.append(raw_container_warning(spec))
            src.source_warnings = [w for w in warnings if w]  # run_backup reports them with its own
            yield src, None


class _QemuImage(_OneDisk):
    """An image file in a format QEMU reads that is not raw, served read-only by qemu-nbd
    (Hyper-V's vhdx/vhd, VMware's vmdk, VirtualBox's vdi, Xen/XCP-ng's vhd): named by
    --format, or by its name's suffix (image_formats.SUFFIX_FORMATS), which QEMU is told:
    never probed."""

    @contextmanager
    def open(self, spec, *, previous_state, verify_cbt, work_dir, image_format):
        from .qemu import QemuOfflineImage

        named = None if image_format == "auto" else image_format  # None: the one its name's suffix names
        with QemuOfflineImage(spec, previous_state=previous_state, work_dir=work_dir or default_work_dir(),
                              verify_cbt=verify_cbt, image_format=named) as session:
            with session.open_source() as nbd:
                yield SessionSource(session, nbd), session


class _NbdExport(_OneDisk):
    """``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``: read by pyvbak's
    own NBD client (sources/nbd.py)."""

    def default_name(self, spec: str) -> str:
        """Default --disk: the export's name."""
        from ..sources.nbd import parse_nbd_uri

        return (parse_nbd_uri(spec)["export"] or "disk0").replace("/", "-")

    @contextmanager
    def open(self, spec, *, previous_state, verify_cbt, work_dir, image_format):
        from ..sources.nbd import NbdSource
        from ..sources.nbd_protocol import TFLAG_READ_ONLY

        with NbdSource(spec) as src:
            if not src.client.transmission_flags & TFLAG_READ_ONLY:
                # (pyvbak's own exports, of a running VM's frozen view or a stopped image, are read-only)
                src.source_warnings = [
                    f"NBD export {spec} is writable: pyvbak reads it as it is, not frozen, so a write to it during the "
                    f"backup leaves this snapshot with blocks from before and after it; export a stopped disk or a "
                    f"snapshot read-only (qemu-nbd -r), or back up a running QEMU VM through its QMP socket "
                    f"(qemu:///PATH/TO/QMP.SOCK?node=NODE)"]
            yield src, None


class _Unsupported(_OneDisk):
    """A URI of a scheme no kind reads: refused as soon as its disks are named, which the
    CLI does before it opens (or creates) a repository - a mistyped ``ftp://…`` made the
    default repository first (session 25)."""

    def disk_names(self, spec: str, disk: str | None) -> list[str]:
        self.refuse(spec)

    def open(self, spec, **_):
        self.refuse(spec)

    @staticmethod
    def refuse(spec: str):
        scheme = spec.split("://", 1)[0]
        # (a new kind's URI form goes here too)
        raise UsageError(
            f"unsupported source '{scheme}://': give an image path, nbd://HOST[:PORT]/EXPORT, "
            "nbd+unix:///EXPORT?socket=PATH or qemu:///QMP.SOCK?node=NODE"
        )


class _QemuVm:
    """``qemu:///QMP.SOCK``: the disks of a running QEMU VM, named by node or device
    (``?node=``, ``?device=``); one without either means every disk of the VM, and QEMU is
    asked which those are.  They share one hypervisor session (qemu/hot.py): their
    point-in-time views are taken in one step, so together they are what the VM's disks
    held at one instant."""

    def disk_names(self, spec: str, disk: str | None) -> list[str]:
        from .qemu.vm_disks import parse_qemu_uri_disks, query_disk_names

        path, selectors = parse_qemu_uri_disks(spec)
        names = query_disk_names(path, selectors)
        if len(names) > 1 and disk is not None:
            raise UsageError(f"--disk names one disk, but {spec} means {len(names)} disks "
                             f"({', '.join(names)}): their snapshots are named after them; drop --disk")
        return [disk] if disk is not None else names

    @contextmanager
    def open_disks(self, spec: str, names: list[str], *, previous_states, verify_cbt, work_dir, image_format,
                   bitmap_owner):
        from .qemu import QemuHotBackup

        with QemuHotBackup(spec, previous_states=previous_states, disk_names=names,
                           work_dir=work_dir or default_work_dir(), verify_cbt=verify_cbt,
                           bitmap_owner=bitmap_owner) as session:
            yield [OpenedDisk(d.name, lambda d=d: _disk_source(d), d.commit)
                   for d in session.disks], list(session.cleaned_leftovers)

    @contextmanager
    def open(self, spec, *, previous_state, verify_cbt, work_dir, image_format):
        from .qemu import QemuHotBackup

        with QemuHotBackup(spec, previous_state=previous_state, work_dir=work_dir or default_work_dir(),
                           verify_cbt=verify_cbt) as session:
            with session.open_source() as nbd:
                yield SessionSource(session, nbd), session


RAW_FILE, QEMU_IMAGE, NBD_EXPORT, QEMU_VM = _RawFile(), _QemuImage(), _NbdExport(), _QemuVm()
UNSUPPORTED = _Unsupported()
#: the kind a URI's scheme (as source_spec leaves it: lower case) names
_KIND_OF_SCHEME = {"qemu": QEMU_VM, "nbd": NBD_EXPORT, "nbd+unix": NBD_EXPORT, "nbd+tcp": NBD_EXPORT}


def source_kind(spec: str, image_format: str = "auto"):
    """Which kind of source ``spec`` (as source_spec leaves it) is, read as
    ``image_format``.  In this order: --format naming a QEMU format makes it an image file
    (check_image_format refuses it for a URI); a URI is its scheme's kind, or refused if
    no kind reads that scheme (also one ending in an image suffix: ``http://h/y.qcow2``
    was taken for a missing image file); a name with a QEMU image suffix is an image file
    read through qemu-nbd, unless --format raw; anything else is a raw file or device."""
    if image_format in QEMU_FORMATS:
        return QEMU_IMAGE
    scheme, sep, _ = spec.partition("://")
    if sep and scheme in _KIND_OF_SCHEME:
        return _KIND_OF_SCHEME[scheme]
    if _names_uri(spec):
        return UNSUPPORTED
    if image_format == "auto" and spec.lower().endswith(QEMU_IMAGE_SUFFIXES):
        return QEMU_IMAGE
    return RAW_FILE


def disk_names(spec: str, disk: str | None = None) -> list[str]:
    """The disk names a backup of ``spec`` makes snapshots of, in order: ``--disk`` or
    the default name for one disk (an image's file name, an NBD export's name); a VM's
    kind names its disks itself (qemu://: by node or device)."""
    return source_kind(spec).disk_names(spec, disk)


def check_image_format(spec: str, image_format: str) -> None:
    """``backup --format``: one of FORMAT_CHOICES, and only for image files and devices."""
    if image_format not in FORMAT_CHOICES:
        raise UsageError(f"unknown image format {image_format!r}: give one of {', '.join(FORMAT_CHOICES)}")
    if image_format != "auto" and _names_uri(spec):
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

    The disks of a VM share one hypervisor session: their point-in-time views are taken in
    one step, so together they are what the VM's disks held at one instant; each disk's
    source is opened in turn."""
    with source_kind(spec).open_disks(spec, names, previous_states=previous_states, verify_cbt=verify_cbt,
                                      work_dir=work_dir, image_format=image_format,
                                      bitmap_owner=bitmap_owner) as opened:
        yield opened


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
    with source_kind(spec, image_format).open(spec, previous_state=previous_state, verify_cbt=verify_cbt,
                                              work_dir=work_dir, image_format=image_format) as opened:
        yield opened
