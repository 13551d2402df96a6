"""One pyvbak session per VM, enforced inside QEMU itself.

Two pyvbak processes backing up the same VM would fight over its one NBD server and
rotate the same dirty bitmaps, and they need not share a work directory (different
users, jobs or repositories), so the lock lives in the VM: a QOM object
``/objects/pyvbak-<run>-lock`` (a ``secret`` - the one object type every QEMU build,
qemu-storage-daemon included, can create - whose data is the time the session started).
``object-add`` of an id is atomic; ordering the sessions makes the lock fair:

1. create our object;
2. list the ``pyvbak-*-lock`` objects of other sessions whose process (the pid in the run
   id) is alive; none: ours is the lock;
3. one that started first - (time, run id) - is ahead: delete ours, fail with a clear
   message;
4. only later ones: each of them either saw ours and is backing off, or listed before ours
   existed and holds the VM (the start times are read before ``object-add``, so a later
   start does not prove a later object).  Wait up to ``RACE_GRACE_S`` for them to go;
   any still there holds the VM: delete ours and fail.

Whoever gets in listed no other live object, or saw every other one go: never two at
once.  (Before step 4 existed, the earlier-started session went ahead at once, and two
sessions could both get in when the earlier one was slow between reading its start time
and creating its object.)  A ``kill -9`` leaves the object behind; it carries the dead
run's id, so the next run's leftover cleanup removes it (``cleanup.clean_leftovers``).
QEMU restarting removes it too.
"""

from __future__ import annotations

import os
import threading
import time

from pyvbak.errors import SourceError

from ..resources import pid_alive
from .naming import PREFIX, pid_of_run, run_of
from .qmp import QmpClient, QmpError

LOCK_SUFFIX = "-lock"
#: how long a session waits for later-started sessions that saw its lock to back off (a
#: few QMP round trips each); one still there after this holds the VM
RACE_GRACE_S = 2.0

# Runs of this process that hold a lock: a lock carrying this process's pid but not
# listed here was leaked (e.g. a signal between object-add and the session recording it)
# and is as stale as a dead process's.
_held: set[str] = set()
_held_lock = threading.Lock()


def is_live(run: str) -> bool:
    """Whether the session ``run`` may still be running."""
    pid = pid_of_run(run)
    if pid == os.getpid():
        with _held_lock:
            return run in _held
    return pid_alive(pid)


def lock_id(run: str) -> str:
    return f"{PREFIX}{run}{LOCK_SUFFIX}"


def session_locks(qmp: QmpClient) -> list[str]:
    """Ids of every pyvbak session lock object in the VM."""
    try:
        props = qmp.execute("qom-list", path="/objects")
    except QmpError:
        return []
    return [p["name"] for p in props if p.get("name", "").startswith(PREFIX) and p["name"].endswith(LOCK_SUFFIX)
            and run_of(p["name"]) is not None]


def _started(qmp: QmpClient, obj: str) -> float | None:
    try:
        return float(qmp.execute("qom-get", path=f"/objects/{obj}", property="data"))
    except (QmpError, ValueError, TypeError):
        return None  # gone meanwhile, or not ours to read


def acquire(qmp: QmpClient, run: str) -> str:
    """Take the VM's session lock for ``run``; returns the object id (release with
    ``release``).  SourceError naming the other session if one that is alive holds it."""
    me = lock_id(run)
    # Compared as written: the other sessions read it back rounded to 6 decimals, and a
    # session comparing its unrounded time with their rounded ones could find, with a
    # rival started within half a microsecond, that each is later than the other.
    started = round(time.time(), 6)
    with _held_lock:
        _held.add(run)
    try:
        qmp.execute("object-add", **{"qom-type": "secret", "id": me, "data": f"{started:.6f}"})
    except BaseException:
        with _held_lock:
            _held.discard(run)
        raise
    try:
        later = []
        for other, orun, t in _live_others(qmp, me):
            if (t, orun) < (started, run):
                raise _held_by(orun, t)
            later.append(other)
        # Later sessions either saw ours and are going, or hold the VM: wait for them.
        deadline = time.monotonic() + RACE_GRACE_S
        while later:
            present = {other: (orun, t) for other, orun, t in _live_others(qmp, me)}
            later = [o for o in later if o in present]
            if later and time.monotonic() >= deadline:
                orun, t = present[later[0]]
                raise _held_by(orun, t)
            if later:
                time.sleep(0.01)
    except BaseException:
        release(qmp, me)
        raise
    return me


def _live_others(qmp: QmpClient, me: str) -> list[tuple[str, str, float]]:
    """(object, run, start time) of the other live sessions' lock objects."""
    out = []
    for other in session_locks(qmp):
        orun = run_of(other)
        if other == me or orun is None or not is_live(orun):
            continue  # a killed (or leaked) run's lock: leftover cleanup removes it
        t = _started(qmp, other)
        if t is not None:
            out.append((other, orun, t))
    return out


def _held_by(orun: str, t: float) -> SourceError:
    return SourceError(
        f"another pyvbak session (pid {pid_of_run(orun)}, run {orun}) is backing up this VM since "
        f"{time.strftime('%H:%M:%S', time.localtime(t))}; wait for it to finish"
    )


def release(qmp: QmpClient, obj: str) -> None:
    """Delete a lock object; absent already is fine."""
    try:
        qmp.execute("object-del", id=obj)
    except QmpError as e:
        if "not found" not in e.desc.lower() and "no object" not in e.desc.lower():
            raise
    run = run_of(obj)
    if run is not None:
        with _held_lock:
            _held.discard(run)
