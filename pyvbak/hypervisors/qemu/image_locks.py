"""Whether a QEMU process holds an image file or block device for writing, as another
process sees it: QEMU's own image locks.

QEMU (file-posix, ``locking=auto``: the default for files and devices) takes Linux OFD
byte-range read locks on every image it opens: on byte 100 + N for each block permission
N it holds, and on byte 200 + N for each it does not share.  Permission 1 is WRITE, so a
lock on byte 101 means a QEMU process may write the image: a running VM's disk, or a
writable export of it.  Checked here (on this machine: a raw file exported writable by
qemu-storage-daemon held bytes 100, 101 and 203; ``qemu-nbd -r`` 100 and 203; a node
nothing uses, none).  A qcow2 in that state is refused because ``qemu-img info`` cannot
take its lock; a raw file was read while the VM wrote it, a torn snapshot without a word
(session 26's audit).
"""

from __future__ import annotations

import fcntl
import os
import struct

#: QEMU's lock byte for "a process holds the WRITE permission" (100 + bit 1)
WRITE_LOCK_BYTE = 101
_FLOCK = "hhqqi4x"  # struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid; padded)


def held_for_writing(fd: int) -> bool:
    """Whether another process holds QEMU's write-permission lock on the open file
    ``fd``; False where this cannot be asked (no OFD locks: not Linux, or a file system
    without locks)."""
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:
        return False
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, WRITE_LOCK_BYTE, 1, 0)
    try:
        answer = fcntl.fcntl(fd, getlk, probe)
    except OSError:
        return False
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
