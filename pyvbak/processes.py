"""Is the process that left a resource still running?  One answer for every layer.

Every resource pyvbak leaves outside itself (locks, temp objects, restore files, QEMU
nodes, qemu-nbd) carries the pid of its owner; cleanup removes it only when that pid no
longer runs a pyvbak.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists and looks like a Python/pyvbak process
    (guards against pid reuse by an unrelated program)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().lower()
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # a zombie (killed, not yet reaped) holds nothing any more
    try:
        if stat.rsplit(b")", 1)[1].split()[0] == b"Z":
            return False
    except IndexError:
        pass
    return b"python" in cmd or b"pyvbak" in cmd
