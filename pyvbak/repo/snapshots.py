"""Snapshots as the repository lists them: their descriptions (SnapshotInfo), the one
order they take (snapshot_order: by sequence number, never by a clock), consistency
groups, the ids and times of new ones, and the VM and disk names a new one may have.

Reading and checking the metadata objects is the repository's (Repository.snapshots,
resolve; repository._valid_snapshot_meta); docs/FORMAT.md, "Snapshot metadata", has the
fields and the order.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import UsageError


@dataclass
class SnapshotInfo:
    id: str
    meta: dict
    #: where the listing placed it (snapshot_order): its sequence, or for one made before
    #: sequence numbers existed the highest of its disk's numbered snapshots made before it
    effective_sequence: int | None = None

    @property
    def vm(self) -> str:
        return self.meta["vm"]

    @property
    def disk(self) -> str:
        return self.meta["disk"]

    @property
    def time(self) -> str:
        return self.meta["time"]

    @property
    def sequence(self) -> int:
        """0 for a snapshot made before sequence numbers existed."""
        return snapshot_sequence(self.meta)

    @property
    def tracking_state(self) -> dict | None:
        """The change-tracking state its source recorded (what the next backup's source is
        given back: a dirty bitmap's name and generation ...), or None."""
        return (self.meta.get("change_tracking") or {}).get("state")

    def summary(self) -> dict:
        m = self.meta
        out = {
            "id": self.id,
            "vm": m["vm"],
            "disk": m["disk"],
            "time": m["time"],
            "sequence": self.sequence,
            "size": m["size"],
            "block_size": m["block_size"],
            "parent": m.get("parent"),
            "source": m.get("source"),
            "cbt": m.get("change_tracking", {}).get("used", False),
            "stats": m.get("stats", {}),
        }
        if isinstance(m.get("consistency_group"), dict):  # disks of a VM frozen at one instant
            out["consistency_group"] = m["consistency_group"]
        return out


@dataclass
class ConsistencyGroup:
    """Snapshots one run made of several disks of a VM frozen at one instant (their
    metadata's ``consistency_group``).  ``snaps``: the ones present, by disk."""

    id: str
    vm: str
    time: str
    disks: list
    snaps: dict

    @property
    def complete(self) -> bool:
        """A snapshot of every disk it froze (a failed run, or a forget, leaves it without)."""
        return all(d in self.snaps for d in self.disks)

    def ordered(self) -> list[SnapshotInfo]:
        """The present snapshots, in the order the run named the disks."""
        return [self.snaps[d] for d in self.disks if d in self.snaps]


def snapshot_sequence(meta: dict) -> int:
    """A snapshot description's ``sequence`` (validated by repository._valid_snapshot_meta), 0 if none."""
    return meta.get("sequence", 0)


def snapshot_order(snap: SnapshotInfo) -> tuple:
    """Where a snapshot stands among the others, oldest first: by sequence number (one
    more than the repository's highest when its backup began), then time, then id.

    Not by time first: wall clocks go back (an NTP step, a backup host restored from a VM
    snapshot, a second host with a slow clock) and run ahead (one backup dated 2100), and
    ordered by time, ``VM@latest``, the next backup's parent and ``--keep-last`` would all
    take an older snapshot for the newest - silently, since every snapshot is whole.
    Snapshots made before sequence numbers existed count as 0: among themselves by time,
    before every numbered one.  Two backups begun at once may share a number (any two
    writers of one repository, or two hosts backing up one disk): their times decide."""
    seq = snap.effective_sequence if snap.effective_sequence is not None else snapshot_sequence(snap.meta)
    return (seq, snap.meta.get("time", ""), snap.id)


def place_unnumbered(snaps) -> None:
    """Set ``effective_sequence``: a snapshot's own sequence number; for one without (an
    older pyvbak made it, perhaps after newer ones: two versions sharing a repository
    during an upgrade), the highest number among its disk's snapshots made before it by
    time - so it comes after them, and a backup an older pyvbak made last is still the
    newest (taken as 0 it came first: VM@latest and --keep-last took an older snapshot
    for the newest)."""
    by_disk: dict[tuple, list] = {}
    for s in snaps:
        by_disk.setdefault((s.meta.get("vm"), s.meta.get("disk")), []).append(s)
    for group in by_disk.values():
        highest = 0
        for s in sorted(group, key=lambda x: (x.meta.get("time", ""), x.id)):
            seq = snapshot_sequence(s.meta)
            highest = max(highest, seq)
            s.effective_sequence = seq or highest


def consistency_groups(snaps) -> list[ConsistencyGroup]:
    """The groups the given snapshots belong to, oldest first (snapshot_order of their
    newest member, then their instant)."""
    groups: dict[tuple[str, str], ConsistencyGroup] = {}
    for s in snaps:
        g = s.meta.get("consistency_group")
        if isinstance(g, dict) and isinstance(g.get("id"), str) and isinstance(g.get("disks"), list):
            key = (s.vm, g["id"])
            if key not in groups:
                groups[key] = ConsistencyGroup(g["id"], s.vm, str(g.get("time", "")), list(g["disks"]), {})
            groups[key].snaps[s.disk] = s
    return sorted(groups.values(), key=lambda g: (max(snapshot_order(x)[0] for x in g.snaps.values()), g.time,
                                                  max(x.id for x in g.snaps.values())))


def now_iso() -> str:
    """Now, as the repository's documents record a time (snapshot metadata, lost/ markers,
    the pack-storage mark, the config)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def snapshot_time() -> str:
    return now_iso()


#: a whole snapshot id as new_snapshot_id makes it (fullmatch; a shorter spec is a prefix)
SNAPSHOT_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")


def new_snapshot_id() -> str:
    """Sortable by time, unique by 32 random bits, safe in any shell word (SNAPSHOT_ID_RE)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


#: longest VM or disk name, in UTF-8 bytes
NAME_MAX_BYTES = 255


class SeveralDisks(UsageError):
    """``VM@latest`` named a VM with several disks where one snapshot is meant."""

    def __init__(self, vm: str, disks: list[str]):
        self.vm, self.disks = vm, disks
        super().__init__(f"VM {vm} has several disks ({', '.join(disks)}): name one as {vm}/DISK@latest")


def check_vm_disk_names(vm: str, disk: str) -> None:
    """VM and disk names of a new snapshot: what ``VM[/DISK]@latest`` can name again.

    Non-empty, at most NAME_MAX_BYTES bytes of UTF-8, no '/' (it separates VM and disk
    in snapshot references), no control characters.  Raises UsageError."""
    for kind, flag, name in (("VM", "--vm", vm), ("disk", "--disk", disk)):
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{kind} name is empty: give {flag} NAME")
        bad = sorted({c for c in name if c == "/" or ord(c) < 32 or ord(c) == 127})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            raise UsageError(f"{kind} name {name!r} contains {shown}: names may not contain '/' (it "
                             f"separates VM and disk in VM/DISK@latest) or control characters; give "
                             f"{flag} without it")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            # bytes that are not UTF-8 (typed in a non-UTF-8 locale, or a file name's):
            # stored as escapes, they never match the same name typed in a UTF-8 session,
            # and restore.sh cannot match them at all
            raise UsageError(f"{kind} name {name!r} is not valid UTF-8 (a non-UTF-8 locale, or a file "
                             f"name's bytes): give {flag} with a UTF-8 name") from None
        if len(encoded) > NAME_MAX_BYTES:
            raise UsageError(f"{kind} name is longer than {NAME_MAX_BYTES} bytes: give a shorter {flag}")
