"""Is the process that left a resource still running?  One answer for every layer.

Every resource pyvbak leaves outside itself (locks, temp objects, restore files, QEMU
nodes, qemu-nbd) carries the pid of its owner (and its identity, or for temp files a
scope token); cleanup removes it only when that owner is known to be gone - never for an
owner this process cannot judge (another machine or pid namespace: its temp files go once
a day old).  A child pyvbak may have to signal later (a qemu-nbd) is recorded
with ``spawn_record`` and signalled only while ``same_process`` says its pid still runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import subprocess


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of this host (Linux), or None."""
    return _read_first_line("/proc/sys/kernel/random/boot_id")


def machine_id() -> str | None:
    """This machine (systemd's /etc/machine-id), or None: two machines may share a host name."""
    return _read_first_line("/etc/machine-id")


def pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[INODE]``), or None: a container's pids mean
    nothing outside it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


#: a temp file of another machine or pid namespace (``scope_token``) is left alone
#: until it is this old: its writer cannot be judged from here, and no single write (one
#: pack, one restore) of a live one takes a day
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600

_scope: list[str] = []


def scope_token() -> str:
    """8 hex digits naming this machine and pid namespace: put into temp-file names next
    to the pid, so that a cleanup in another container or on another host sharing the
    directory (NFS) does not take a live writer's pid for a dead one of its own.  Not the
    boot: this host's own temp files from before a reboot (a power loss) are this scope's,
    judged by pid, not kept a day as a stranger's."""
    if not _scope:
        _scope.append(hashlib.sha256(f"{machine_id()}|{pid_namespace()}".encode()).hexdigest()[:8])
    return _scope[0]


def temp_writer_alive(pid: int, scope: str | None, mtime: float, start: int | None = None) -> bool:
    """Whether the writer of a temp file named with ``pid`` (+ its ``scope_token``, and
    the process start time when the name has it) may still be writing it: a writer of
    another scope is, until the file is FOREIGN_TEMP_MAX_AGE_S old; one of this scope
    is judged by its pid (and start time).  Names without a scope (older pyvbak): by pid."""
    import time

    if scope is not None and scope != scope_token():
        return time.time() - mtime < FOREIGN_TEMP_MAX_AGE_S
    if not pid_alive(pid):
        return False
    return not start or start_time(pid) in (None, start)


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """A process with ``pid`` exists (in /proc) and is not a zombie (killed, not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> list[str] | None:
    """``pid``'s arguments (/proc/PID/cmdline, argv[0] first), or None when unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]] if raw else []


def spawn_record(pid: int) -> dict:
    """What tells child ``pid`` (just started by this process) from a later process that
    gets its pid: ``{"pid", "start", "boot"}``, for ``same_process``."""
    return {"pid": pid, "start": start_time(pid), "boot": boot_id()}


def same_process(record: dict) -> bool:
    """Whether the process a ``spawn_record`` describes still runs: its pid runs, in this
    boot, a process started at the recorded time.  False when the record lacks either or
    /proc does not say (then it cannot be told from a newer process with its pid)."""
    pid, start, boot = record.get("pid"), record.get("start"), record.get("boot")
    if not isinstance(pid, int) or pid <= 0 or start is None or boot is None or boot != boot_id():
        return False
    return start_time(pid) == start and running(pid)


def identity() -> dict:
    """What an owner record carries besides host and pid, so that a later check can tell
    whether it can judge the owner at all (same machine, same pid namespace) and this
    process from one that got its pid after it died (``owner_alive``)."""
    return {"machine": machine_id(), "pidns": pid_namespace(), "boot": boot_id(),
            "start": start_time(os.getpid())}


def can_judge(owner: dict) -> bool:
    """Whether this process can tell if ``owner`` (an ``identity`` record of this host
    name) still runs: not when it is another machine under the same host name, nor a
    process of another pid namespace (a container).  Records without the fields (older
    pyvbak) are judged by their pid."""
    machine, ns = owner.get("machine"), owner.get("pidns")
    if machine is not None and machine_id() not in (None, machine):
        return False
    if ns is not None and pid_namespace() not in (None, ns):
        return False
    return True


def owner_alive(pid: int, owner: dict | None = None) -> bool:
    """Whether the owner recorded as ``pid`` (+ ``identity`` fields) may still run: True
    whenever this process cannot judge it (``can_judge``).  Within one boot, a recorded
    start time that differs from the pid's current one means the pid went to a newer
    process (a Python one included) and the owner is dead; a record of an earlier boot of
    this same machine (its machine id recorded and equal to ours) is dead too; without a
    recorded machine id the pid alone decides, as for records without the fields."""
    owner = owner or {}
    if not can_judge(owner):
        return True
    start = owner.get("start")
    same_boot = owner.get("boot") is not None and owner.get("boot") == boot_id()
    if (not same_boot and owner.get("boot") is not None and boot_id() is not None
            and owner.get("machine") is not None and owner.get("machine") == machine_id()):
        return False  # this machine, an earlier boot: no process outlives a reboot
    if same_boot and start is not None:
        now = start_time(pid)
        if now is None:  # no such process, or /proc hides it
            return pid_alive(pid)
        return now == start and pid_alive(pid)
    return pid_alive(pid)


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


@contextlib.contextmanager
def spawned_helper(args: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """Context manager: ``subprocess.Popen`` of a helper process that dies with pyvbak
    (``die_with_parent``); Ctrl-C, SIGTERM and SIGHUP are held (``interrupts.held``) until
    the block, which records the process, is done, then raised.  A ``preexec_fn`` makes
    Python run its fork handlers in the parent, and an exception a signal handler raised in
    one of them was dropped ("Exception ignored"): the backup went on and exited 0."""
    import subprocess  # (here: most users of this module start no helper)

    from . import interrupts

    with interrupts.held():
        yield subprocess.Popen(args, preexec_fn=die_with_parent, **popen_kwargs)


def run_helper(args: list[str], *, timeout: float | None = None, input=None,
               **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, ...)`` for a short helper (qemu-img,
    mkfs) that never outlives the command which started it: a stop request (Ctrl-C,
    SIGTERM, SIGHUP) that comes while it starts is held until its process is recorded,
    and any exception (that request, the timeout) kills and reaps it before going on.
    subprocess.run lost the child when the request came inside its Popen: ``qemu-img
    create`` went on and made a fleecing image in the work dir after the teardown had
    removed its name.  stdin is /dev/null unless
    ``input`` is given."""
    import subprocess

    from . import interrupts

    proc = None
    try:
        with interrupts.held():
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kwargs)
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.communicate()  # reaped, its pipes closed: nothing of it is left running
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def die_with_parent() -> None:
    """``preexec_fn`` of a helper process pyvbak starts (qemu-nbd, the demo's
    qemu-storage-daemon): it gets SIGTERM when pyvbak dies, even by kill -9, so nothing
    keeps serving or holding an image for a pyvbak that is gone (Linux; elsewhere the
    next run's cleanup is the backstop).  The thread that starts it must outlive it: the
    signal follows the thread's exit, not the process's."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass
