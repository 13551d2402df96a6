"""Which image format a file source is read as, and what its header says it holds.

A path is read as a raw disk unless its name ends in a QEMU image suffix (``.qcow2``,
``.vmdk``, ...: the suffix names the format, ``SUFFIX_FORMATS``, and QEMU is told it) or
``backup --format`` names a format: probing a raw image's header to choose is unsafe (a guest that wrote a qcow2 onto its raw disk would have its disk backed
up as the inner image - QEMU refuses to guess for the same reason).  But a file read as
raw whose header is a container's is almost always a misnamed image (``vm.img`` holding
a qcow2): its backup is the container's bytes - restorable as that file, but not the
guest's disk, without the image's change tracking - so the backup says so
(``raw_container_warning``) and ``--format`` lets the user say what it is.

Magic numbers (each format's own specification): qcow/qcow2 ``QFI\\xfb`` at 0, QED
``QED\\0`` at 0, VMDK sparse extent ``KDMV`` at 0 or a text descriptor starting
``# Disk DescriptorFile``, VHDX ``vhdxfile`` at 0, VDI signature 0xbeda107f
(little-endian) at 0x40, VHD (QEMU's ``vpc``) ``conectix`` at 0 (dynamic) or in the
512-byte footer (fixed).  LUKS is left out on purpose: a guest's encrypted raw disk
starts with it too.
"""

from __future__ import annotations

import os
import re
import struct

#: formats ``backup --format`` accepts besides ``auto`` and ``raw``: read through qemu-nbd
QEMU_FORMATS = ("qcow2", "qcow", "qed", "vmdk", "vhdx", "vpc", "vdi")
FORMAT_CHOICES = ("auto", "raw", *QEMU_FORMATS)
#: names read through qemu-nbd by default, and the format each suffix names: QEMU is told it
#: (``-f``), never left to probe the header - a raw VMware extent is named ``NAME-flat.vmdk``
#: and its guest may have written any image header at its start (a guest-written qcow2
#: header can name a host file as its backing file)
SUFFIX_FORMATS = {".qcow2": "qcow2", ".qcow": "qcow", ".qed": "qed", ".vmdk": "vmdk", ".vhdx": "vhdx",
                  ".vhd": "vpc", ".vpc": "vpc", ".vdi": "vdi"}
QEMU_IMAGE_SUFFIXES = tuple(SUFFIX_FORMATS)

_VDI_SIGNATURE = 0xBEDA107F
_HEAD_BYTES = 512


def name_for_qemu(path: str | os.PathLike) -> str:
    """The image name to hand ``qemu-img``/``qemu-nbd``: absolute (a name with a ':' before
    its first '/' is a protocol to QEMU: ``a:b.qcow2`` is "Unknown protocol 'a'"), but
    neither normalised (``abspath`` drops ``link/..`` before the kernel follows the link:
    another image) nor resolved (QEMU finds a relative backing file or vmdk extent beside
    the name it is given, as the VM does)."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def format_of_name(path: str) -> str | None:
    """The image format ``path``'s name suffix (any case) names, or None (read as raw)."""
    lower = str(path).lower()
    for suffix, fmt in SUFFIX_FORMATS.items():
        if lower.endswith(suffix):
            return fmt
    return None


#: QEMU reads at most this much of a VMDK text descriptor (block/vmdk.c vmdk_read_desc)
_VMDK_DESCRIPTOR_MAX = (1 << 20) - 1
#: a text descriptor with NUL bytes (QEMU's padding after it updated the CID) is no larger
_VMDK_PADDED_MAX = 64 * 1024


def vmdk_descriptor_problem(path: str) -> str | None:
    """Why ``path``, read as vmdk, is not a VMDK descriptor file QEMU may follow, or None.

    A vmdk that is not a sparse extent (``KDMV``/``COWD`` magic) is a text descriptor whose
    extent lines name the files holding the disk - any file, absolute paths too.  A raw
    extent (``NAME-flat.vmdk``) whose guest wrote such a text at its start would have QEMU
    read host files as the disk.  A descriptor is a small text file (QEMU rewrites one as a
    512-byte sector: NUL-padded, with old text after the NUL): a file too large for QEMU to
    read whole, or larger than 64 KiB with a NUL byte, is a disk's data, not a descriptor.
    (Left: a disk of at most 64 KiB whose guest wrote a descriptor - no VM has such a disk.)"""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head in (b"KDMV", b"COWD"):
                return None
            f.seek(0, os.SEEK_END)
            if f.tell() > _VMDK_DESCRIPTOR_MAX:
                return "it is too large for a VMDK descriptor (a small text file) and is no sparse extent"
            f.seek(0)
            data = f.read()
            if b"\0" in data and len(data) > _VMDK_PADDED_MAX:
                return "it holds binary data, so it is neither a VMDK descriptor (text) nor a sparse extent"
    except OSError:
        return None  # (qemu-img says why it cannot read it)
    return None


#: what VMware names the raw extents holding a disk's bytes beside its descriptor NAME.vmdk:
#: NAME-flat.vmdk, split NAME-f001.vmdk (sparse extents, -s001, -delta, are no disk alone
#: either, but a sparse disk of its own may be named so: those are caught by the descriptor
#: beside them, and a sparse header is checked after qemu-img reads it)
_VMDK_EXTENT_NAME = re.compile(r"-(flat|f\d{3})\.vmdk$", re.IGNORECASE)
_VMDK_EXTENT_LINE = re.compile(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]+)"', re.MULTILINE)
#: siblings looked at for a descriptor naming the file (a datastore directory holds a few)
_VMDK_SIBLINGS_MAX = 2000


def vmdk_extent_problem(path: str, by_name: bool = True) -> str | None:
    """Why ``path`` is one of a VMware disk's extents rather than a disk to back up, or None.

    An extent holds the guest's bytes (a raw one all of them, from its first sector), and a
    guest can write there whatever header makes QEMU follow other files: a text descriptor
    or a sparse ``KDMV`` header with an embedded descriptor or a parent, naming a host file
    or another VM's disk.  So an extent is never
    read as a vmdk: one named by a descriptor beside it, or (``by_name``: its format comes
    from its name, not ``--format vmdk``) named as VMware names raw extents."""
    name = os.path.basename(path)
    if by_name and _VMDK_EXTENT_NAME.search(name):
        return (f"its name says it is a raw extent of a VMware disk (NAME{_VMDK_EXTENT_NAME.search(name).group(0)}; "
                f"if it is a vmdk disk of its own, say so with --format vmdk)")
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    try:
        siblings = [e for e in os.scandir(folder) if e.name.lower().endswith(".vmdk") and e.path != real]
    except OSError:
        return None
    for entry in siblings[:_VMDK_SIBLINGS_MAX]:
        try:
            if not entry.is_file() or entry.stat().st_size > _VMDK_DESCRIPTOR_MAX:
                continue
            with open(entry.path, "rb") as f:
                text = f.read(_VMDK_DESCRIPTOR_MAX)
        except OSError:
            continue
        if text[:4] in (b"KDMV", b"COWD"):
            continue
        for m in _VMDK_EXTENT_LINE.finditer(text):
            named = os.fsdecode(m.group(1))
            if os.path.realpath(os.path.join(folder, named)) == real:
                return f"the descriptor {entry.path} names it as one of its extents"
    return None


def vmdk_sparse_problem(path: str, info: dict) -> str | None:
    """Why a sparse vmdk (``KDMV``/``COWD``) ``qemu-img info`` describes as ``info`` is not a
    disk of its own, or None: its header can hold an embedded descriptor whose extents name
    any file - a raw extent whose guest wrote one (named like any disk, its descriptor in
    another directory) had a host file backed up.  A sparse disk's
    one extent is the file itself."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"KDMV", b"COWD"):
                return None
    except OSError:
        return None
    data = (info.get("format-specific", {}) or {}).get("data", {}) or {}
    real = os.path.realpath(path)
    others = list(dict.fromkeys(e.get("filename") for e in data.get("extents", []) or []
                                if isinstance(e, dict) and os.path.realpath(str(e.get("filename", ""))) != real))
    if others:
        return f"its sparse header names other files as its extents ({', '.join(map(str, others))})"
    return None


def container_format(path: str) -> str | None:
    """The image format ``path``'s header (and, for a fixed VHD, footer) names, or None:
    raw, unreadable, or not a file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        head = os.pread(fd, _HEAD_BYTES, 0)
        fmt = _format_of_head(head)
        if fmt is not None:
            return fmt
        size = os.lseek(fd, 0, os.SEEK_END)
        if size >= 2 * _HEAD_BYTES and os.pread(fd, 8, size - _HEAD_BYTES) == b"conectix":
            return "vpc"
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def _format_of_head(head: bytes) -> str | None:
    if head.startswith(b"QFI\xfb") and len(head) >= 8:
        return "qcow2" if struct.unpack(">I", head[4:8])[0] >= 2 else "qcow"
    if head.startswith(b"QED\x00"):
        return "qed"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"conectix"):
        return "vpc"
    if len(head) >= 0x44 and struct.unpack("<I", head[0x40:0x44])[0] == _VDI_SIGNATURE:
        return "vdi"
    return None


def raw_container_warning(path: str) -> str | None:
    """The warning for a path about to be read as raw whose header is an image format's."""
    fmt = container_format(path)
    if fmt is None:
        return None
    return (f"{path} holds a {fmt} image (by its header) but its name has no {fmt} suffix, so it was backed up "
            f"as raw bytes, not as the disk it holds: back it up with --format {fmt} (--format raw keeps raw "
            f"bytes without this warning)")
