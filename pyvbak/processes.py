"""Is the process that left a resource still running?  One answer for every layer.

Every resource pyvbak leaves outside itself (locks, temp objects, restore files, QEMU
nodes, qemu-nbd) carries the pid of its owner; cleanup removes it only when that pid no
longer runs a pyvbak.
"""

from __future__ import annotations

import os


def boot_id() -> str | None:
    """This boot of this host (Linux), or None: a process of another boot is gone."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def identity() -> dict:
    """What an owner record carries besides host and pid, so that a later check can tell
    this process from another that got its pid after it died (``owner_alive``)."""
    return {"boot": boot_id(), "start": start_time(os.getpid())}


def owner_alive(pid: int, owner: dict | None = None) -> bool:
    """``pid_alive``, and - when ``owner`` records the boot and start time (``identity``) -
    the process with that pid is the same one: after a reboot, or once its pid went to a
    newer process (a Python one included), the owner is dead."""
    owner = owner or {}
    boot, start = owner.get("boot"), owner.get("start")
    if boot is not None and boot_id() not in (None, boot):
        return False
    if not pid_alive(pid):
        return False
    if start is not None and pid != os.getpid():
        now = start_time(pid)
        if now is not None and now != start:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists and looks like a Python/pyvbak process
    (guards against pid reuse by an unrelated program; ``owner_alive`` also against
    reuse by another Python process)."""
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
