"""A small process that cleans a VM up at once when its hot backup dies without cleaning up.

A ``kill -9`` of pyvbak (or the OOM killer, a crash) skips every ``finally``: the VM keeps
pyvbak's copy-before-write filter, and every first guest write to a block copies the old
block into the fleecing image in the work dir, with no space guard any more (fleece_guard
lives in the dead process).  QEMU 7.2 fails the *guest's* write when that file system
fills up (``on-cbw-error=break-guest-write``), and a nightly job's next run, which would
clean up (cleanup.py), may be a day away.

So each hot backup session starts a watchdog: a child in a session of its own (a terminal's
Ctrl-C and a process-group kill do not reach it; it ignores SIGTERM, SIGHUP and SIGINT, so
a service manager's stop, sent to every process of the service, leaves it to see whether
pyvbak then finishes its teardown) that reads a socket from pyvbak.  The session sends
``done`` when its own teardown is over; the watchdog then exits.  End of file without
``done`` means pyvbak is gone without its teardown: the watchdog connects to the VM's QMP
socket (free again: QEMU serves one client per monitor), takes the VM's session lock
(marked as a cleanup's: a backup starting meanwhile waits for it instead of failing) and
removes what dead runs left - exports, NBD server, jobs and their filters, fleecing nodes
and files, session locks - exactly as the next run would (``cleanup.clean_leftovers``).
The dirty bitmaps stay as they are, with the dead run's journal in the work dir: the next
backup settles them on that evidence, knowing from the repository which generation the
last good backup recorded.  What it did goes to the stderr pyvbak had (a cron job's mail,
a terminal), one line.  When the monitor does not answer within ``CONNECT_SECONDS`` (QEMU
hung or gone, or a backup started meanwhile holds it - that one cleans up) it says so and
exits; then the next backup cleans up.

The child is ``python -P -S`` (nothing from the current directory; the package's
directory is passed) with a few lines of code, started in ``/``
(~9 ms; 0.4 ms of the parent's time to spawn): the package is imported only when there is
something to clean.  The socket is closed in children ``fork()``ed from pyvbak, whose
copies would otherwise keep the watchdog from seeing pyvbak's end.  A watchdog that is
itself killed changes nothing: the next run cleans up as before.  $PYVBAK_WATCHDOG=0 starts
none (the tests of the next run's cleanup); a frozen executable (no Python to start) has none.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

ENV = "PYVBAK_WATCHDOG"
DONE = b"done\n"
#: how long the watchdog keeps trying to reach the VM's monitor after pyvbak died
CONNECT_SECONDS = 10.0

# Runs with -P -S: sys.path is set from argv before pyvbak is imported.
_BOOT = """\
import os, signal, sys
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
data = b""
while not data.endswith(b"done\\n"):
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
import json, socket, time
args = json.loads(sys.argv[1])
# queue at the monitor before anything else: QEMU serves its clients one after the other,
# and a backup started right after the death then waits for this cleanup, not the reverse
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(args["connect_seconds"])
t0 = time.monotonic()
try:
    sock.connect(args["qmp_path"])
except OSError:
    sock.close()
    sock = None
sys.path[:0] = args.pop("path")
from pyvbak.hypervisors.qemu.watchdog import clean_up_after
sys.exit(clean_up_after(sock=sock, started=t0, **args))
"""

#: the watchdogs of this process's open sessions (their sockets close in forked children)
_open: "weakref.WeakSet[Watchdog]" = weakref.WeakSet()
_open_lock = threading.Lock()


def _close_in_child() -> None:
    for w in list(_open):
        w._drop()


os.register_at_fork(after_in_child=_close_in_child)


def _python_executable() -> bool:
    """Whether ``sys.executable`` is a Python interpreter to start the watchdog with (an
    embedding host - uWSGI - sets it to its own program, a frozen application to itself)."""
    exe = sys.executable
    return bool(exe) and not getattr(sys, "frozen", False) and \
        os.path.basename(exe).lower().startswith(("python", "pypy")) and os.access(exe, os.X_OK)


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


class Watchdog:
    """``start()`` spawns the watchdog of one session; ``done()`` (idempotent) tells it the
    session cleaned up after itself."""

    def __init__(self, qmp_path: str | os.PathLike, work_dir: str | os.PathLike, run: str, qmp_timeout: float):
        # absolute: the watchdog runs in "/" (a relative path named another socket there, and
        # the VM was taken for gone)
        self.args = {"qmp_path": os.path.abspath(qmp_path), "work_dir": os.path.abspath(work_dir), "run": run,
                     "pid": os.getpid(), "qmp_timeout": qmp_timeout, "connect_seconds": CONNECT_SECONDS}
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None

    def start(self) -> "Watchdog":
        import json

        import pyvbak

        if not _python_executable():
            return self  # no Python to start (embedded, uWSGI-like hosts): the next run cleans up
        # the directory pyvbak is imported from (an editable install's is not on sys.path
        # without site) and the dependencies' directories
        path = [str(Path(pyvbak.__file__).resolve().parent.parent)] + [p for p in sys.path if p]
        theirs = None
        try:
            # a socket, not a pipe: "done" is sent with MSG_NOSIGNAL, so a watchdog that died
            # first never raises SIGPIPE in an application that restored its default action
            self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with _open_lock:
                _open.add(self)  # before the child exists: a fork from another thread meanwhile closes it
            # -P: nothing from the current directory (a json.py there would run);
            # -S: no site (fast; the path is passed); started in "/"
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-S", "-c", _BOOT, json.dumps(dict(self.args, path=path))],
                stdin=theirs, stdout=subprocess.DEVNULL, cwd="/", start_new_session=True)
        except Exception:  # noqa: BLE001 - no watchdog (out of processes or fds): the next run cleans up
            self._proc = None
            self._drop()
            with _open_lock:
                _open.discard(self)
        finally:
            if theirs is not None:
                theirs.close()
        return self

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def done(self) -> None:
        proc, self._proc = self._proc, None
        sock, self._sock = self._sock, None
        with _open_lock:
            _open.discard(self)
        if sock is not None:
            try:
                sock.sendall(DONE, socket.MSG_NOSIGNAL) if hasattr(socket, "MSG_NOSIGNAL") else sock.sendall(DONE)
            except OSError:
                pass  # it is gone already: nothing to tell
            finally:
                sock.close()
        if proc is not None and proc.poll() is None:
            # reaped as soon as it exits (it reads "done" and ends): no zombie until the next
            # session, no ResourceWarning
            threading.Thread(target=proc.wait, name="pyvbak-watchdog-reaper", daemon=True).start()


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"pyvbak watchdog: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def clean_up_after(qmp_path: str, work_dir: str, run: str, pid: int, qmp_timeout: float, connect_seconds: float,
                   sock=None, started: float | None = None) -> int:
    """The watchdog's work once backup run ``run`` (process ``pid``) is gone without its
    teardown: 0 when the VM holds nothing of it any more (or a backup started meanwhile
    cleans up), 1 when it could not clean (the next run does).  ``sock``: a connection to
    the monitor made first, at ``started`` (``time.monotonic()``); the monitor must answer
    within ``connect_seconds`` of that."""
    from pyvbak.errors import PyvbakError
    from pyvbak.processes import running

    from . import cleanup, session_lock
    from .naming import PREFIX, new_run_id, run_of
    from .qmp import QmpClient

    deadline = (time.monotonic() if started is None else started) + connect_seconds
    while running(pid) and time.monotonic() < deadline:  # the socket closes as it exits
        time.sleep(0.01)
    what = f"backup run {run} (pid {pid}) ended without its cleanup"
    own = new_run_id()
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            qmp = QmpClient(qmp_path, timeout=min(qmp_timeout, left)).connect(sock)
            qmp.timeout = qmp_timeout
            break
        except (PyvbakError, TimeoutError) as exc:
            sock = None  # used up: the retries connect anew
            # refused: nothing listens on the socket (QEMU is gone).  A missing path is no
            # proof (a socket deleted under a live QEMU, a VM restarting): never treated so,
            # or a fleecing file QEMU still writes would be removed
            gone = "refuses connections" in str(exc)
            missing = not os.path.exists(qmp_path)
            if missing and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if not gone and time.monotonic() < deadline and not isinstance(exc, TimeoutError):
                time.sleep(0.05)  # the dead process's connection may still be closing
                continue
            if gone:
                # nothing holds the run's files any more (a fleecing file can be as big as the
                # guest's writes); its journal stays, the evidence for the bitmaps' settling
                files = [p for p in Path(work_dir).glob(f"{PREFIX}{run}-*") if run_of(p.name) == run]
                try:
                    removed = cleanup.clean_files(files)
                except PyvbakError:
                    removed = []
                _say(f"{what}; its VM's QMP socket {qmp_path} no longer answers (QEMU is gone): nothing to clean "
                     f"in it" + (f"; removed: {'; '.join(removed)}" if removed else ""))
            elif missing:
                _say(f"{what}; its VM's QMP socket {qmp_path} no longer exists (QEMU gone, or the VM restarting); "
                     f"the next backup of the VM cleans up")
            else:
                _say(f"{what}; the VM's monitor {qmp_path} did not answer within {connect_seconds:g} s (QEMU hung, "
                     f"or another client - a backup started meanwhile, which cleans up - holds it); the next "
                     f"backup of the VM cleans up")
            return 1
    try:
        with qmp:
            lock = session_lock.acquire(qmp, own, cleanup=True)
            try:
                cleaned = cleanup.clean_leftovers(qmp, Path(work_dir), None, None, own_run=own, this_vm=qmp_path)
            finally:
                session_lock.release(qmp, lock)
    except session_lock.HeldByOther:  # a backup (it cleans up) or another watchdog is at it
        return 0
    except PyvbakError as exc:
        _say(f"{what}; cleaning up after it failed: {exc}; the next backup of the VM cleans up")
        return 1
    if cleaned:
        _say(f"{what}; removed: {'; '.join(cleaned)}")
    return 0
