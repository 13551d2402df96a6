"""Names of everything pyvbak creates in QEMU and in the work directory.

Every resource carries the prefix ``pyvbak-`` and a run id ``<pid>-<4 hex>`` so that a
later run can tell (a) that pyvbak made it and (b) which run made it, and so whether that
run may still be going: the pid alone does not say (a pyvbak in another container or on
another machine may share the VM's QMP socket or the work dir, and pids are reused), so
the run's session lock in the VM, and its journal in the work dir, record the owner's
identity (``processes.identity()``) and ``cleanup.run_alive`` / ``session_lock.is_live``
judge the pid with it (offline runs write the journal too); a run with neither (older
pyvbak) is judged by its pid.  QEMU node names are limited to 31 characters, which bounds the run id.

  session lock (QOM object) pyvbak-<run>-lock   (session_lock.py; data: start time + owner)
  export / NBD export name   pyvbak-<run><d>
  fleecing node              pyvbak-<run><d>-fl
  copy-before-write filter   pyvbak-<run><d>-cbw
  snapshot-access node       pyvbak-<run><d>-acc   (the frozen view, QEMU >= 8.0)
  backup job id              pyvbak-<run><d>-job
  fleecing file              <work_dir>/pyvbak-<run><d>-fleece.raw   (QEMU < 8.0: .qcow2)
  NBD server socket          <work_dir>/pyvbak-<run>-nbd.sock
  journal                    <work_dir>/pyvbak-<run>.json   (written as .pyvbak-<run>.json.tmp, renamed; "owner";
                             offline: "qemu_nbd", its qemu-nbd's spawn record)
  qemu-nbd pid file          <work_dir>/pyvbak-<run>-qemu-nbd.pid   (offline)
  persistent dirty bitmaps   pyvbak-gen-<N>-<token>   (not per run: they outlive runs on
                             purpose; earlier pyvbak made them without the token)

``<d>`` tells the disks of one run apart: empty for its first disk, ``-d<i>`` for the
i-th (0-based) after it — a VM's disks are frozen at one instant by one run.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from pyvbak.errors import UsageError

PREFIX = "pyvbak-"
GEN_PREFIX = "pyvbak-gen-"
_RUN_RE = re.compile(r"^pyvbak-(\d+)-([0-9a-f]{4})(?:$|[-.])")
_GEN_RE = re.compile(r"^pyvbak-gen-(\d+)(?:-[0-9a-f]{8})?$")


#: bytes a UNIX socket path may have on Linux (``sun_path`` holds 108 with the final NUL)
SOCKET_PATH_MAX = 107


def check_socket_path(path: Path) -> None:
    """Refuse, before anything is created, a work dir too deep for the NBD socket in it
    (QEMU would refuse only after the bitmap rotation and the fleecing set-up)."""
    n = len(os.fsencode(path))
    if n > SOCKET_PATH_MAX:
        raise UsageError(
            f"work dir {path.parent} is too long a path for the NBD socket pyvbak creates in it "
            f"({n} bytes; UNIX socket paths hold at most {SOCKET_PATH_MAX}): set PYVBAK_WORK_DIR "
            "to a shorter directory"
        )


def new_run_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(2)}"


# Runs of this process in progress (from ``begin_run`` to ``end_run``).  A run id carries
# the pid, so a run of this process is judged by this set, not by the pid: another
# session of the same process (a job runner backing up several VMs at once) took a
# running session's files for a dead run's and removed them - its NBD socket, its
# fleecing file.
_running_here: set[str] = set()
_running_lock = threading.Lock()


def begin_run(run: str) -> None:
    with _running_lock:
        _running_here.add(run)


def end_run(run: str) -> None:
    """The run's teardown is over: what it left is a dead run's, for the next run to clean."""
    with _running_lock:
        _running_here.discard(run)


def running_here(run: str) -> bool:
    with _running_lock:
        return run in _running_here


def journal_temp(journal: Path) -> Path:
    """Where a journal is written before it is renamed into place: a name the work dir's
    ``pyvbak-*`` scans never see, so no other session finds a journal half-written (a
    run's first one, seen empty, made another VM's backup refuse).
    A killed run's is removed by ``cleanup.drop_dead_journal_temps``."""
    return journal.with_name(f".{journal.name}.tmp")


def run_of(name: str) -> str | None:
    """The run id inside a pyvbak resource name (or file name), else None."""
    m = _RUN_RE.match(name)
    return f"{m.group(1)}-{m.group(2)}" if m else None


def pid_of_run(run: str) -> int:
    return int(run.split("-", 1)[0])


def bitmap_name(generation: int) -> str:
    """A new generation's bitmap: its number (the order of generations on a disk) and a
    random token, so that no other backup chain ever makes the same name.  By number
    alone, a chain that found the disk without bitmaps (an image compacted with qemu-img
    convert, cbt-off, a raw disk's QEMU restarted) made pyvbak-gen-N again, and another
    chain - a second repository, another --vm name, a sibling VM's disk copied over this
    one - whose snapshot recorded its own pyvbak-gen-N trusted it: a silently wrong
    incremental."""
    return f"{GEN_PREFIX}{generation}-{secrets.token_hex(4)}"


def generation_of(bitmap: str) -> int | None:
    m = _GEN_RE.match(bitmap or "")
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunNames:
    run: str
    work_dir: Path
    disk_tag: str = ""  # "" for a run's first disk, "-d<i>" for the others

    def for_disk(self, index: int) -> "RunNames":
        """The names of the index-th (0-based) disk of this run."""
        return RunNames(self.run, self.work_dir, f"-d{index}" if index else "")

    @property
    def export(self) -> str:
        return f"{PREFIX}{self.run}{self.disk_tag}"

    @property
    def fleece_node(self) -> str:
        return f"{PREFIX}{self.run}{self.disk_tag}-fl"

    @property
    def access_node(self) -> str:
        return f"{PREFIX}{self.run}{self.disk_tag}-acc"

    @property
    def cbw_node(self) -> str:
        return f"{PREFIX}{self.run}{self.disk_tag}-cbw"

    @property
    def job(self) -> str:
        return f"{PREFIX}{self.run}{self.disk_tag}-job"

    @property
    def fleece_file(self) -> Path:
        """The fleecing file of a snapshot-access session (raw: only the copies)."""
        return self.work_dir / f"{PREFIX}{self.run}{self.disk_tag}-fleece.raw"

    @property
    def fleece_qcow2(self) -> Path:
        """The fleecing file of a QEMU < 8.0 session (qcow2 backed by the disk)."""
        return self.work_dir / f"{PREFIX}{self.run}{self.disk_tag}-fleece.qcow2"

    @property
    def nbd_socket(self) -> Path:
        return self.work_dir / f"{PREFIX}{self.run}-nbd.sock"

    @property
    def journal(self) -> Path:
        return self.work_dir / f"{PREFIX}{self.run}.json"
