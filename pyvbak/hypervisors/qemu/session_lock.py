"""One pyvbak session per VM, enforced inside QEMU itself.

Two pyvbak processes backing up the same VM would fight over its one NBD server and
rotate the same dirty bitmaps, and they need not share a work directory (different
users, jobs or repositories), so the lock lives in the VM: a QOM object
``/objects/pyvbak-<run>-lock`` (a ``secret`` - the one object type every QEMU build,
qemu-storage-daemon included, can create).  Its data is a JSON object: the time the
session started, its pid and the owner's identity (``processes.identity()``: machine
id, pid namespace, boot id, process start time)::

    {"started": 1764100000.123457, "pid": 4242, "machine": "…", "pidns": "pid:[4026531836]",
     "boot": "…", "start": 1234567}

(pyvbak before it wrote the start time alone, ``"%.6f"``; such locks are still read.)
A watchdog cleaning up after a killed run (``watchdog.py``) adds ``"cleanup": true``: a
session that finds only such locks ahead of it removes its own, waits for them to go (up
to ``CLEANUP_WAIT_S``) and starts again, instead of failing; a watchdog gives way to any
other session.
Whether a lock's session may still run is ``is_live``: a run of this process by
``_held``; any other by ``processes.owner_alive(pid, identity)`` - alive whenever this
process cannot judge it (another machine, or another pid namespace: a pyvbak in another
container on the same QMP socket), dead when its pid went to a newer process (the
recorded start time differs, same boot), else by its pid as for a lock without the
identity.
``object-add`` of an id is atomic; ordering the sessions makes the lock fair:

1. create our object;
2. list the ``pyvbak-*-lock`` objects of other sessions that may still run (``is_live``);
   none: ours is the lock;
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
run's id and identity, so the next run's leftover cleanup removes it
(``cleanup.clean_leftovers``), which also judges the run's other resources with the
identity its lock (or its work-dir journal) recorded.  QEMU restarting removes it too.
"""

from __future__ import annotations

import json
import os
import threading
import time

from pyvbak.errors import SourceError
from pyvbak.processes import can_judge, identity, owner_alive

from .naming import PREFIX, pid_of_run, run_of
from .qmp import QmpClient, QmpError

LOCK_SUFFIX = "-lock"
#: how long a session waits for later-started sessions that saw its lock to back off (a
#: few QMP round trips each); one still there after this holds the VM
RACE_GRACE_S = 2.0
#: how long a session waits for a watchdog's cleanup (watchdog.py) ahead of it to end
CLEANUP_WAIT_S = 60.0

# Runs of this process that hold a lock: a lock carrying this process's pid but not
# listed here was leaked (e.g. a signal between object-add and the session recording it)
# and is as stale as a dead process's.
_held: set[str] = set()
_held_lock = threading.Lock()


#: the fields of ``processes.identity()``; a record with none of them is judged by pid
IDENTITY_FIELDS = ("machine", "pidns", "boot", "start")


def owner_identity(record: dict | None) -> dict | None:
    """The owner identity in ``record`` (a lock's data, a journal's ``owner``), or None
    when it has none (pyvbak before it recorded one)."""
    if not isinstance(record, dict):
        return None
    owner = {k: record[k] for k in IDENTITY_FIELDS if record.get(k) is not None}
    return owner or None


def is_live(run: str, owner: dict | None = None) -> bool:
    """Whether the session ``run`` may still be running.  ``owner``: the identity its lock
    recorded (``lock_info``), None when unknown (judged by the pid in the run id).  A run
    whose owner this process cannot judge (another machine or pid namespace) is live."""
    pid = pid_of_run(run)
    if pid == os.getpid() and can_judge(owner or {}):
        with _held_lock:
            return run in _held
    return owner_alive(pid, owner)


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


def lock_data(started: float, cleanup: bool = False) -> str:
    """The data of this process's lock object for a session started at ``started``;
    ``cleanup``: a watchdog's, which only removes a killed run's leftovers (``"cleanup":
    true``: a backup starting meanwhile waits for it instead of failing)."""
    return json.dumps({"started": started, "pid": os.getpid(), **identity(), **({"cleanup": True} if cleanup else {})})


def parse_lock_data(data) -> dict | None:
    """A lock object's data as ``{"started": float, ...identity fields}``, or None when it
    is not a lock's.  The old form, the bare start time ``"%.6f"``, gives ``{"started": t}``
    alone (judged by pid)."""
    if not isinstance(data, str):
        return None
    try:
        if not data.lstrip().startswith("{"):
            return {"started": float(data)}
        info = json.loads(data)
        if not isinstance(info, dict):
            return None
        return {**info, "started": float(info["started"])}
    except (KeyError, ValueError, TypeError):
        return None


def lock_info(qmp: QmpClient, obj: str) -> dict | None:
    """The parsed data of lock object ``obj`` (``parse_lock_data``), None when it is gone
    meanwhile or not ours to read."""
    try:
        data = qmp.execute("qom-get", path=f"/objects/{obj}", property="data")
    except QmpError:
        return None
    return parse_lock_data(data)


def _started(qmp: QmpClient, obj: str) -> float | None:
    info = lock_info(qmp, obj)
    return None if info is None else info["started"]


def acquire(qmp: QmpClient, run: str, *, cleanup: bool = False) -> str:
    """Take the VM's session lock for ``run``; returns the object id (release with
    ``release``).  SourceError naming the other session if one that is alive holds it.
    ``cleanup``: the lock of a watchdog (``watchdog.py``), which gives way to any session;
    a session that finds only such locks ahead of it waits up to ``CLEANUP_WAIT_S`` for
    them to go and tries again."""
    deadline = time.monotonic() + CLEANUP_WAIT_S
    while True:
        cleaners = _acquire_once(qmp, run, cleanup)
        if isinstance(cleaners, str):
            return cleaners
        # only watchdogs cleaning up after a killed run are ahead: ours is gone again
        while True:
            present = {other: (orun, t) for other, orun, t, _ in _live_others(qmp, None)}
            ahead = [o for o in cleaners if o in present]
            if not ahead:
                break
            if time.monotonic() >= deadline:
                orun, t = present[ahead[0]]
                raise _held_by(orun, t, cleanup=True)
            time.sleep(0.02)


def _acquire_once(qmp: QmpClient, run: str, cleanup: bool) -> "str | list[str]":
    """One attempt of ``acquire``: our object id, or (ours removed again) the watchdogs'
    lock objects ahead of it when nothing else is."""
    me = lock_id(run)
    # Compared as written: the other sessions read back the number stored (rounded to 6
    # decimals, as the old bare-float locks were), and a session comparing its unrounded
    # time with their rounded ones could find, with a rival started within half a
    # microsecond, that each is later than the other.
    started = round(time.time(), 6)
    with _held_lock:
        _held.add(run)
    try:
        qmp.execute("object-add", **{"qom-type": "secret", "id": me, "data": lock_data(started, cleanup)})
    except BaseException as exc:
        if not isinstance(exc, QmpError):
            # Interrupted (Ctrl-C, SIGTERM) or the connection failed while waiting for the
            # reply: QEMU may have made the object all the same, and the caller never
            # learns its id - remove it now (absent is fine), or it outlives the run
            try:
                release(qmp, me)
            except BaseException:  # noqa: BLE001 - the next run's leftover scan removes it
                pass
        with _held_lock:
            _held.discard(run)
        raise
    try:
        later, cleaners = [], []
        for other, orun, t, info in _live_others(qmp, me):
            if (t, orun) < (started, run):
                if info.get("cleanup") and not cleanup:
                    cleaners.append(other)
                    continue
                raise _held_by(orun, t, cleanup=bool(info.get("cleanup")))
            later.append(other)
        if cleaners:
            release(qmp, me)
            return cleaners
        # Later sessions either saw ours and are going, or hold the VM: wait for them.
        deadline = time.monotonic() + RACE_GRACE_S
        while later:
            present = {other: (orun, t) for other, orun, t, _ in _live_others(qmp, me)}
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


def _live_others(qmp: QmpClient, me: str | None) -> list[tuple[str, str, float, dict]]:
    """(object, run, start time, lock data) of the other live sessions' lock objects."""
    out = []
    for other in session_locks(qmp):
        orun = run_of(other)
        if other == me or orun is None:
            continue
        info = lock_info(qmp, other)
        if info is None:
            continue  # gone meanwhile, or not ours to read
        if not is_live(orun, owner_identity(info)):
            continue  # a killed (or leaked) run's lock: leftover cleanup removes it
        out.append((other, orun, info["started"], info))
    return out


class HeldByOther(SourceError):
    """The VM's session lock is held by another live session (or a watchdog's cleanup)."""


def _held_by(orun: str, t: float, cleanup: bool = False) -> SourceError:
    if cleanup:
        return HeldByOther(
            f"a pyvbak watchdog (pid {pid_of_run(orun)}) has been cleaning up after a killed backup of this VM "
            f"since {time.strftime('%H:%M:%S', time.localtime(t))}; retry when it is done")
    return HeldByOther(
        f"another pyvbak session (pid {pid_of_run(orun)}, run {orun}) is backing up this VM since "
        f"{time.strftime('%H:%M:%S', time.localtime(t))}; wait for it to finish"
    )


def abandon(run: str) -> None:
    """The session ``run`` of this process is over but its lock object stays in the VM
    (the evidence for its leftovers, which the cleanup could not remove): from now on it
    is a leaked lock, which the next session - in this process too - cleans with them."""
    with _held_lock:
        _held.discard(run)


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
