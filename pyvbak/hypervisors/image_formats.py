"""Which image format a file source is read as, and what its header says it holds.

A path is read as a raw disk unless its name ends in a QEMU image suffix (``.qcow2``,
``.vmdk``, ...) or ``backup --format`` names a format: probing a raw image's header to
choose is unsafe (a guest that wrote a qcow2 onto its raw disk would have its disk backed
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
import struct

#: formats ``backup --format`` accepts besides ``auto`` and ``raw``: read through qemu-nbd
QEMU_FORMATS = ("qcow2", "qcow", "qed", "vmdk", "vhdx", "vpc", "vdi")
FORMAT_CHOICES = ("auto", "raw", *QEMU_FORMATS)
#: names read through qemu-nbd by default (the format then comes from ``qemu-img info``)
QEMU_IMAGE_SUFFIXES = (".qcow2", ".qcow", ".qed", ".vmdk", ".vhdx", ".vhd", ".vpc", ".vdi")

_VDI_SIGNATURE = 0xBEDA107F
_HEAD_BYTES = 512


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
