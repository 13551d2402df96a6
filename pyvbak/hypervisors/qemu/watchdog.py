"""A small process that cleans a VM up at once when its hot backup dies without cleaning up.

A ``kill -9`` of pyvbak (or the OOM killer, a crash) skips every ``finally``: the VM keeps
pyvbak's copy-before-write filter, and every first guest write to a block copies the old
block into the fleecing image in the work dir, with no space guard any more (fleece_guard
lives in the dead process).  QEMU 7.2 fails the *guest's* write when that file system
fills up (``on-cbw-error=break-guest-write``), and a nightly job's next run, which would
clean up (cleanup.py), may be a day away.

So each hot backup session starts a watchdog: a child in a session of its own (a terminal's
Ctrl-C and a process-group kill do not reach it) that blocks reading a pipe from pyvbak.
The session writes ``done`` when its own teardown is over; the watchdog then exits.  End
of file without ``done`` means pyvbak is gone without its teardown: the watchdog connects
to the VM's QMP socket (free again: QEMU serves one client per monitor), takes the VM's
session lock and removes what dead runs left - exports, NBD server, jobs and their
filters, fleecing nodes and files, session locks - exactly as the next run would
(``cleanup.clean_leftovers``).  The dirty bitmaps stay as they are, with the dead run's
journal in the work dir: the next backup settles them on that evidence, knowing from the
repository which generation the last good backup recorded.  What it did goes to the
stderr pyvbak had (a cron job's mail, a terminal).

The child starts as ``python -S`` with a few lines of code (~9 ms, 0.4 ms of the parent's
time to spawn): the package is imported only when there is something to clean.  A watchdog
that is itself killed changes nothing: the next run cleans up as before.
$PYVBAK_WATCHDOG=0 starts none (the tests of the next run's cleanup).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ENV = "PYVBAK_WATCHDOG"
DONE = b"done\n"
#: how long the watchdog keeps trying to reach the VM's monitor after pyvbak died
CONNECT_SECONDS = 10.0

# Runs with -S (no site): sys.path is set from argv before pyvbak is imported.
_BOOT = """\
import os, sys
data = b""
while True:
    try:
        chunk = os.read(0, 64)
    except InterruptedError:
        continue
    except OSError:
        break
    if not chunk:
        break
    data += chunk
if data.endswith(b"done\\n"):
    sys.exit(0)
import json, socket
args = json.loads(sys.argv[1])
# queue at the monitor before anything else: QEMU serves its clients one after the other,
# and a backup started right after the death then waits for this cleanup, not the reverse
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(args["qmp_path"])
except OSError:
    sock.close()
    sock = None
sys.path[:0] = args.pop("path")
from pyvbak.hypervisors.qemu.watchdog import clean_up_after
sys.exit(clean_up_after(sock=sock, **args))
"""


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


class Watchdog:
    """``start()`` spawns the watchdog of one session; ``done()`` (idempotent) tells it the
    session cleaned up after itself."""

    def __init__(self, qmp_path: str | os.PathLike, work_dir: str | os.PathLike, run: str, qmp_timeout: float):
        self.args = {"qmp_path": str(qmp_path), "work_dir": str(work_dir), "run": run,
                     "pid": os.getpid(), "qmp_timeout": qmp_timeout}
        self._proc: subprocess.Popen | None = None

    def start(self) -> "Watchdog":
        import json

        import pyvbak

        # the directory pyvbak is imported from (an editable install's is not on sys.path
        # without site) and the dependencies' directories
        path = [str(Path(pyvbak.__file__).resolve().parent.parent)] + [p for p in sys.path if p]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _BOOT, json.dumps(dict(self.args, path=path))],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            self._proc = None  # no watchdog (no fork: out of processes): the next run cleans up
        return self

    def done(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(DONE)
            proc.stdin.close()
        except OSError:
            pass  # it is gone already: nothing to tell


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"pyvbak watchdog: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def clean_up_after(qmp_path: str, work_dir: str, run: str, pid: int, qmp_timeout: float, sock=None) -> int:
    """The watchdog's work once backup run ``run`` (process ``pid``) is gone without its
    teardown: 0 when the VM holds nothing of it any more, 1 when something could not be
    removed (the next run tries again).  ``sock``: a connection to the monitor, made first."""
    from pyvbak.errors import PyvbakError
    from pyvbak.processes import running

    from . import cleanup, session_lock
    from .naming import new_run_id
    from .qmp import QmpClient

    deadline = time.monotonic() + CONNECT_SECONDS
    while running(pid) and time.monotonic() < deadline:  # the pipe closes as it exits
        time.sleep(0.01)
    what = f"backup run {run} (pid {pid}) ended without its cleanup"
    own = new_run_id()
    while True:
        try:
            qmp = QmpClient(qmp_path, timeout=qmp_timeout).connect(sock)
            break
        except PyvbakError as exc:  # its connection may still be closing, or the VM is gone
            sock = None  # used up: the retries connect anew
            if time.monotonic() > deadline:
                _say(f"{what}; could not reach the VM to clean up ({exc}); the next backup of it cleans up")
                return 1
            time.sleep(0.05)
    try:
        with qmp:
            lock = session_lock.acquire(qmp, own)
            try:
                cleaned = cleanup.clean_leftovers(qmp, Path(work_dir), None, None, own_run=own, this_vm=qmp_path)
            finally:
                session_lock.release(qmp, lock)
    except PyvbakError as exc:
        if "another pyvbak session" in str(exc):  # a backup started meanwhile: it cleans up
            return 0
        _say(f"{what}; cleaning up after it failed: {exc}; the next backup of the VM cleans up")
        return 1
    if cleaned:
        _say(f"{what}; removed: {'; '.join(cleaned)} (the next backup settles the dirty bitmaps)")
    return 0
