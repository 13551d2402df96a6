"""The qcow2 fleecing image of QEMU < 8.0 (docs/QEMU.md, "Point-in-time view"): an empty
qcow2 of the disk's size and cluster size, made for every disk of every hot backup.

``qemu-img create`` costs ~10 ms a disk (a process and its libraries; 12.7 ms more set-up
per disk than the snapshot-access form: bench/RESULTS.md, "Session 14 run (QEMU < 8.0 gets
the qcow2 view; its image copied from a template)"), and an empty qcow2
of a given size and cluster size is always the same bytes (a few hundred KiB: header,
L1 and refcount tables; no id, no time).  So qemu-img makes one per (size, cluster size)
once (for the backup that needs it first: its image, checked, is kept), as a template in pyvbak's local cache (``<cache root>/fleece-templates``, 0700;
none with the cache off: ``PYVBAK_CACHE_DIR=``, then every backup runs qemu-img), and
each backup writes a copy into its work dir.  A template's
name carries the SHA-256 of its bytes, checked before each use with its header (magic,
version 3, size, cluster size, no backing file, no snapshot, no feature bit, an L1 table
of zeros - so every read not yet copied goes to the disk) and its owner (this user's
regular file, writable by no one else): a template changed on disk (bit rot, a stray or
planted write) is removed and made again, never copied.  A cache that cannot hold one is
no error: the image is then made by qemu-img where it is needed.  Templates not used
for TEMPLATE_KEEP_S go (``drop_old_templates``).  The work dir holds only runs' resources
(its leftover cleanup judges everything named ``pyvbak-*`` there).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import struct
import subprocess
import time
from pathlib import Path

from pyvbak.errors import SourceError
from pyvbak.processes import run_helper

#: a template unused this long is removed (a VM resized or gone)
TEMPLATE_KEEP_S = 30 * 86400
#: a template being made (``.tmp``) older than this was a killed run's
TEMPLATE_TMP_KEEP_S = 3600
TEMPLATE_PREFIX = "qcow2-"
QCOW2_MAGIC = b"QFI\xfb"
#: the version-3 qcow2 header (QEMU's docs/interop/qcow2.txt): magic, version,
#: backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
#: l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
#: snapshots_offset, incompatible_features, compatible_features, autoclear_features
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQ")


def _open_templates_dir() -> int | None:
    """A descriptor of the templates directory (made 0700 if missing), opened without
    following a link and checked to be this user's and writable by no one else; None when
    there is no local cache or it is not such a directory (then qemu-img makes every
    image).  Everything below works through the descriptor: a ``fleece-templates`` made a
    link to another directory by whoever can write the cache root (root running with a
    user's cache; a umask of 000) had this user's files there removed."""
    from pyvbak.repo.cache import cache_root, make_private_dirs, untrusted_cache_reason

    root = cache_root()
    if not root or untrusted_cache_reason():
        return None
    d = os.path.join(root, "fleece-templates")
    try:
        make_private_dirs(root)
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        return None
    return fd


def _pattern(size: int, cluster: int) -> str:
    return f"{TEMPLATE_PREFIX}{size}-{cluster}-"


def template_name(size: int, cluster: int, data: bytes) -> str:
    return f"{_pattern(size, cluster)}{hashlib.sha256(data).hexdigest()[:32]}.qcow2"


def looks_right(data: bytes, size: int, cluster: int) -> bool:
    """An empty version-3 qcow2 of this size and cluster size as ``qemu-img create`` makes
    it: no backing file, no encryption, no snapshot, no feature bit (none that would send
    its data elsewhere: an external data file is one - a template planted with it had QEMU
    write the guest's old blocks into another file), and an L1
    table of zeros (no cluster of its own: every read goes to the backing disk until the
    filter copies a block into it)."""
    if len(data) < _HEADER.size:
        return False
    (magic, version, backing_offset, _, cluster_bits, virtual_size, crypt, l1_size, l1_offset, _, _,
     snapshots, _, incompatible, compatible, autoclear) = _HEADER.unpack_from(data)
    if not (magic == QCOW2_MAGIC and version == 3 and backing_offset == 0 and crypt == 0
            and snapshots == 0 and incompatible == 0 and compatible == 0 and autoclear == 0
            and 1 << cluster_bits == cluster and virtual_size == size):
        return False
    l1 = data[l1_offset:l1_offset + 8 * l1_size]
    return len(l1) == 8 * l1_size and not any(l1)


def _template(dfd: int, size: int, cluster: int) -> bytes | None:
    """The bytes of an intact template in the directory ``dfd``, or None; damaged ones
    (and links, and files not this user's alone) are removed."""
    try:
        names = [n for n in os.listdir(dfd) if n.startswith(_pattern(size, cluster)) and n.endswith(".qcow2")]
    except OSError:
        return None
    for name in sorted(names):
        data = None
        try:  # (O_NONBLOCK: a FIFO of that name would block the open before it is found out)
            ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            ffd = None  # a link (ELOOP), or gone
        if ffd is not None:
            try:
                st = os.fstat(ffd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                    with os.fdopen(os.dup(ffd), "rb") as f:
                        data = f.read()
                    if name == template_name(size, cluster, data) and looks_right(data, size, cluster):
                        try:
                            os.utime(ffd)  # in use: kept (drop_old_templates)
                        except OSError:
                            pass  # a read-only cache: still a good template
                        return data
            except OSError:
                continue
            finally:
                os.close(ffd)
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError:
            pass
    return None


def _qemu_img_create(path, size: int, cluster: int) -> None:
    try:
        r = run_helper(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(path), str(size)],
                       text=True, timeout=60)
    except FileNotFoundError:
        raise SourceError("qemu-img not found: install the Debian package 'qemu-utils'") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"qemu-img create {path} timed out") from None
    if r.returncode != 0:
        raise SourceError(f"cannot create the fleecing image {path}: {r.stderr.strip()}")


def _keep_template(dfd: int, size: int, cluster: int, data: bytes) -> None:
    """Store ``data`` (an image qemu-img made for a backup, checked) as the template:
    written by this process through a new file's own descriptor (O_EXCL, no link
    followed: nothing another hand could redirect), then renamed whole.  Best effort: a
    cache that cannot hold it costs nothing but the next backup's qemu-img run (a template
    made apart from the image, in a cache without room or without /proc, cost two qemu-img
    runs per disk on every backup).  A killed run's
    temporary file goes with ``drop_old_templates``."""
    if not looks_right(data, size, cluster):
        return
    tmp = f"{_pattern(size, cluster)}{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        ffd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError:
        return
    try:
        try:
            os.fchmod(ffd, 0o600)  # this user's alone, whatever the umask (_template checks it)
            view = memoryview(data)
            while view:
                view = view[os.write(ffd, view):]
        finally:
            os.close(ffd)
        os.replace(tmp, template_name(size, cluster, data), src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        pass
    finally:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:  # gone (renamed)
            pass


def create(path: Path, size: int, cluster: int) -> bool:
    """Write a new, empty qcow2 fleecing image of ``size`` bytes at ``path`` (which must
    not exist): a copy of the template, or else qemu-img's, kept as the template for the
    next backups; whether it came from a template."""
    dfd = _open_templates_dir()
    try:
        data = None
        if dfd is not None:
            try:
                data = _template(dfd, size, cluster)
            except OSError:  # a cache that cannot be read: a speed-up only
                data = None
        if data is None:
            _qemu_img_create(path, size, cluster)
            if dfd is not None:
                try:
                    made = Path(path).read_bytes()
                except OSError:
                    made = b""
                _keep_template(dfd, size, cluster, made)
            return False
    finally:
        if dfd is not None:
            os.close(dfd)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SourceError(f"cannot create the fleecing image {path}: {e.strerror}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise SourceError(f"cannot write the fleecing image {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return True


def _remove(which) -> None:
    """Remove the entries of the templates directory that ``which(entry)`` selects (a
    ``DirEntry``); never an error of its own."""
    dfd = _open_templates_dir()
    if dfd is None:
        return
    try:
        for e in os.scandir(dfd):
            try:
                if which(e):
                    os.unlink(e.name, dir_fd=dfd)
            except OSError:
                pass
    except OSError:
        pass
    finally:
        os.close(dfd)


def forget_template(size: int, cluster: int) -> None:
    """QEMU refused an image made from the template: the next backup makes it again (QEMU's
    refusal is what the user hears)."""
    _remove(lambda e: e.name.startswith(_pattern(size, cluster)) and e.name.endswith(".qcow2"))


def drop_old_templates() -> None:
    """Templates unused for TEMPLATE_KEEP_S, and half-made ones of killed runs."""
    now = time.time()

    def old(e) -> bool:
        if not e.name.startswith(TEMPLATE_PREFIX):
            return False
        keep = TEMPLATE_TMP_KEEP_S if e.name.endswith(".tmp") else TEMPLATE_KEEP_S
        return now - e.stat(follow_symlinks=False).st_mtime >= keep
    _remove(old)
