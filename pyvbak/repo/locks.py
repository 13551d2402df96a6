"""Repository locks, built only from create-only objects (works on any Backend).

A lock is an object ``locks/<random>.json`` holding host, pid, time and whether it is
exclusive.  Backups take *shared* locks: two backups (of the same or different VMs) may
run at once because everything they write is content-addressed and create-only, and each
snapshot has its own names.  Operations that delete or rewrite data (prune, ``forget
--prune``, ``verify --repair``; a dry-run prune too, unless ``--no-lock``) take an
*exclusive* lock and refuse to start while any other lock exists; a shared lock refuses
to start while an exclusive one exists.  After writing its lock a process lists the
locks again, so two processes racing for conflicting locks both see each other and the
later one backs off.  Locks of dead processes on this host (pid no longer running, or
running another process now: a lock records the boot and its process's start time) are
stale and removed; locks from other hosts (or another pid namespace of this one) cannot be
judged from here and are left for the user (``pyvbak unlock --all``).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

from ..backends import BackendError, ObjectMissing
from ..errors import LockedError, OutOfSpace
from ..processes import can_judge, identity, owner_alive

LOCK_PREFIX = "locks/"


class RepositoryLock:
    def __init__(self, backend, *, exclusive: bool, purpose: str, clean_stale: bool = True, reader: bool = False,
                 recover=None):
        self.backend = backend
        self.reader = reader  # restore / verify / a dry run: --no-lock can do without the lock
        # Readers (restore, verify) leave stale locks alone: a stale lock is the evidence
        # the next backup uses to look for packs a killed backup left unindexed.
        self.clean_stale = clean_stale
        self.exclusive = exclusive
        self.purpose = purpose
        self.name = f"{LOCK_PREFIX}{secrets.token_hex(16)}.json"
        self.stale_removed: list[str] = []
        self.recover = recover  # what the exclusive lock does when it removed stale locks
        self.recovered: list[str] = []
        self._recovery_ran = False
        self.held = False  # between a successful __enter__ and __exit__

    def _read_all(self) -> dict[str, dict]:
        locks = {}
        for name in self.backend.list(LOCK_PREFIX):
            try:
                info = json.loads(self.backend.read(name))
            except ObjectMissing:
                continue  # removed meanwhile
            except (ValueError, RecursionError):  # not JSON, or nested thousands deep
                info = None
            if not isinstance(info, dict):
                # Lock objects are written whole (create-only), so this one is damaged.
                # Whose it was is unknown: it keeps prune away (never judged stale) but
                # does not stop backups; 'pyvbak unlock --all' removes it.
                info = {"purpose": f"an unreadable lock object ({name})", "host": "?", "pid": "?",
                        "exclusive": False, "damaged": True}
            locks[name] = info
        return locks

    @staticmethod
    def _is_stale(info: dict) -> bool:
        if info.get("damaged"):
            return False
        try:
            pid = int(info.get("pid", 0))
        except (TypeError, ValueError):
            pid = 0
        if not 0 <= pid < 1 << 31:  # no such pid on Linux (pid_max is at most 2^22): not judged
            return False
        return info.get("host") == socket.gethostname() and not owner_alive(pid, info)

    def _remove_stale(self, locks: dict[str, dict]) -> dict[str, dict]:
        live = {}
        for name, info in locks.items():
            if self._is_stale(info):
                try:
                    self.backend.delete(name)
                    self.stale_removed.append(name)
                except ObjectMissing:
                    pass
            else:
                live[name] = info
        return live

    def _conflict(self, locks: dict[str, dict]) -> dict | None:
        for name, info in locks.items():
            if name == self.name:
                continue
            if self.exclusive or info.get("exclusive"):
                return info
        return None

    def __enter__(self) -> "RepositoryLock":
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **identity(),  # boot and start time: a later pid reuse does not keep the lock alive
            "time": time.time(),
            "exclusive": self.exclusive,
            "purpose": self.purpose,
        }
        locks = self._read_all()
        live = self._remove_stale(locks) if self.clean_stale else {n: i for n, i in locks.items() if not self._is_stale(i)}
        other = self._conflict(live)
        if other is None:
            try:
                self.backend.write_new(self.name, json.dumps(info).encode())
            except OutOfSpace:
                # the generic advice ("... or prune old snapshots") is circular here: a
                # prune needs a lock, and the lock needs space
                where = f"repository {self.backend.location}"
                if self.reader:
                    raise OutOfSpace(f"no space left in {where} even for a lock: free space there, or add --no-lock "
                                     "to only read the repository (restore, verify, a --dry-run)") from None
                raise OutOfSpace(f"no space left in {where} even for a lock: free space on its filesystem first "
                                 "(prune, too, needs a lock to run)") from None
            except BackendError as exc:
                if not self.reader:
                    raise
                # e.g. a backup disk mounted read-only for a disaster recovery.  Not taken as
                # leave to go on without the lock: a read-only mount (NFS, a bind mount) says
                # nothing of the writers elsewhere, whose prune may move blocks meanwhile -
                # --no-lock is the user's word that none runs.
                raise BackendError(f"{exc}; to only read the repository (restore, verify, a --dry-run), add --no-lock") from None
            except BaseException:
                # a stop request: the object may exist (linked before write_new returned)
                self._release()
                raise
            try:
                other = self._conflict({n: i for n, i in self._read_all().items() if not self._is_stale(i)})
            except BaseException:
                # a with whose __enter__ raises never calls __exit__: a signal here left the
                # lock, which another host cannot judge stale
                self._release()
                raise
            if other is not None:
                self._release()
        if other is not None:
            judged_here = other.get("host") == socket.gethostname() and not other.get("damaged") and can_judge(other)
            fix = ("remove the stale lock with 'pyvbak unlock' if that process is gone" if judged_here else
                   "once you know that process is gone (another machine or container: pyvbak cannot see it "
                   "from here), remove the lock with 'pyvbak unlock --all'")
            raise LockedError(
                f"repository {self.backend.location} is locked by {other.get('purpose', '?')} "
                f"(pid {other.get('pid')} on {other.get('host')}): wait for it to finish, or {fix}"
            )
        self.held = True
        try:
            self._recover_after_stale()
        except BaseException:
            self.held = False
            self._release()
            raise
        return self

    def _recover_after_stale(self) -> None:
        """The stale locks just removed were the evidence 'unlock' and the next backup
        clean up a killed writer by (temp objects, packs it left unindexed); under the
        exclusive lock no writer runs, so that is done now (verify --repair left them
        stranded until a prune).  Once per lock."""
        if self.exclusive and self.stale_removed and not self._recovery_ran:
            self._recovery_ran = True
            if self.recover is not None:
                self.recovered = self.recover()
            else:
                from .repository import RecoveryLine  # (repository.py imports this module)

                self.recovered = [RecoveryLine("temp_removed", n, f"removed incomplete object {n}")
                                  for n in self.backend.cleanup_incomplete(older_than_seconds=0)]

    def remove_stale(self) -> list[str]:
        """For a lock taken with ``clean_stale=False``: remove the stale locks now, once its
        holder has decided to go on (a backup refused before that keeps a killed run's
        stale lock, the evidence the next backup cleans up on).  Returns the names
        removed, also in ``stale_removed``; an exclusive lock then cleans up after their
        holders, as one taken with ``clean_stale=True`` does (``recovered``)."""
        self._remove_stale({n: i for n, i in self._read_all().items() if n != self.name})
        self._recover_after_stale()
        return self.stale_removed

    def check_held(self) -> None:
        """Raise LockedError unless this lock's object is still there.  A writer checks
        before it commits: a lock removed under it ('pyvbak unlock --all', or a prune that
        misjudged it stale) means a prune may have deleted what the commit would reference."""
        if not self.backend.exists(self.name):
            raise LockedError(
                f"this process's lock on repository {self.backend.location} was removed while it ran "
                f"('pyvbak unlock --all' or a prune elsewhere?): nothing was committed; run it again")

    def _release(self) -> None:
        try:
            self.backend.delete(self.name)
        except ObjectMissing:
            pass

    def __exit__(self, *exc) -> None:
        self.held = False
        self._release()


def other_verifies(backend, own=None) -> bool:
    """Whether a verify other than ``own`` (a RepositoryLock, or None) holds a lock now (it
    may clear flags of copies it read intact), or a lock whose purpose cannot be read
    does.  A flagger that finds a flagged copy bad again flags it again meanwhile: that
    verify's clear does not know the new marker."""
    try:
        locks = RepositoryLock(backend, exclusive=False, purpose="verify")._read_all()
    except Exception:  # cannot tell: as if one did
        return True
    mine = getattr(own, "name", None)
    return any(name != mine and (info.get("damaged") or str(info.get("purpose", "")).startswith("verify"))
               and not RepositoryLock._is_stale(info) for name, info in locks.items())


def remove_locks(backend, *, all_hosts: bool = False) -> list[str]:
    """``pyvbak unlock``: remove locks of dead processes on this host, or every lock
    (``all_hosts``) when the user knows no other pyvbak uses the repository."""
    probe = RepositoryLock(backend, exclusive=False, purpose="unlock")
    locks = probe._read_all()
    if not all_hosts:
        probe._remove_stale(locks)
        return probe.stale_removed
    removed = []
    for name in locks:
        try:
            backend.delete(name)
            removed.append(name)
        except ObjectMissing:
            pass
    return removed
