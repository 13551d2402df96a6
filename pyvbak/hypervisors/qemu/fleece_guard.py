"""Keep image fleecing from ever failing a guest write.

While a hot backup runs, every guest write to a block not yet read first copies the old
block into the fleecing qcow2 in the work dir.  QEMU 7.2's backup job inserts its
copy-before-write filter with ``on-cbw-error=break-guest-write`` (the option cannot be
chosen through ``blockdev-backup``), so a full work-dir filesystem would make the *guest's*
write fail.  pyvbak therefore watches the free space of the work dir and, before it runs
out, breaks the *backup* instead: it marks the session broken (every later read raises,
so no snapshot is committed from a view that is no longer frozen) and cancels the job,
which removes the filter - guest writes go straight to the disk again.  The dirty bitmap
is merged back as for any failed backup, so the next backup still sees every write.

Free space is polled every ``POLL_SECONDS``; the reserve must absorb what the guest can
copy in between (50 ms at ~1 GB/s is 50 MB, well inside ``RESERVE_MIN_BYTES``).
"""

from __future__ import annotations

import os
import threading

POLL_SECONDS = 0.05
#: stop the backup when the work dir's free space falls below max(this, RESERVE_FRACTION)
RESERVE_MIN_BYTES = 256 * 1024 * 1024
RESERVE_FRACTION = 0.01


def free_bytes(path: str) -> tuple[int, int]:
    """(bytes available to this user, filesystem size) of the filesystem holding path."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def reserve_for(fs_size: int) -> int:
    return max(RESERVE_MIN_BYTES, int(fs_size * RESERVE_FRACTION))


def low_space_message(work_dir: str, free: int, reserve: int, nodes: str) -> str:
    """``nodes``: the disks being backed up, quoted (``'disk0', 'disk1'``)."""
    return (
        f"work dir {work_dir} has only {free >> 20} MiB free (pyvbak keeps {reserve >> 20} MiB) for copies "
        f"of the blocks the guest rewrites on {nodes} while they are backed up (whatever fills that file "
        f"system counts: a repository on it too); the VM was not affected - free space there or set "
        f"PYVBAK_WORK_DIR to a bigger filesystem"
    )


class FleeceSpaceGuard:
    """A daemon thread calling ``on_low(free, reserve)`` once, when the work dir's free
    space drops below the reserve; ``stop()`` ends it (idempotent, joins the thread)."""

    def __init__(self, work_dir: str, on_low):
        self.work_dir = work_dir
        self.on_low = on_low
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyvbak-fleece-guard", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "FleeceSpaceGuard":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                free, size = free_bytes(self.work_dir)
                reserve = reserve_for(size)
                if free < reserve:
                    self.on_low(free, reserve)
                    return
                self._stop.wait(POLL_SECONDS)
        except BaseException as exc:  # reported by the session's teardown
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)
