"""Whether ``packs/`` is this repository's pack storage (docs/FORMAT.md, "Pack storage
mark" and "Lost packs"): the packs the index names, and the pack-storage mark.

``packs/`` may be separate storage mounted into the repository; unmounted, it is an empty
mount point (or one an older pyvbak stored packs into), and every block would read as
lost.  ``pack_storage_problem`` says why ``packs/`` is not taken for the storage (a
``PackStorageProblem``: its ``summary`` for a warning, its ``error`` for a command that
stops).  Backups check first (``check_pack_storage``) and mark the storage after
(``mark_pack_storage``); ``verify --repair`` marks it on the user's word
(``write_pack_storage_mark``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..backends import BackendError, ObjectMissing
from ..errors import IntegrityError
from . import digest_sets
from . import format as fmt
from .repository import Repository, local_path
from .snapshots import now_iso


_PACK_OBJECT = re.compile(re.escape(fmt.PACKS_FOLDER) + r"([0-9a-f]{2})/(\1[0-9a-f]{62})")


def check_pack_storage(repo) -> None:
    """Refuses (IntegrityError) a backup into a repository whose pack storage is not
    there (``pack_storage_problem``): the backup would deduplicate against blocks that
    are not there, or store blocks into an empty mount point that the storage, mounted
    back, hides, and commit a snapshot no restore can read, and say nothing.  A partial
    loss is verify's to find.  Runs before leftover recovery, which would take a
    damaged pack index whose packs it cannot see for garbage, and under a lock taken
    without removing stale locks (the backup removes them after it): a killed run's
    stale lock is the evidence that makes the next backup clean up after that run once
    the packs are back.  The way on when the packs are really lost is ``verify
    --repair`` (the user's word; prune, verify and restore stop with this error too): it
    drops the lost packs' records from the index (lost/ markers say so), and backups
    then store every block again.  Flags (lost/ markers) covering every copy are no
    way on: an older pyvbak's verify wrote such flags while the storage was not
    mounted."""
    problem = pack_storage_problem(repo)
    if problem:
        raise problem.error("nothing was backed up")


def pack_storage_problem(repo) -> "PackStorageProblem | None":
    """What says that ``packs/`` is not this repository's pack storage, or None.  First
    a mark of another repository (it tells more than "none of the packs"), then the
    packs the index names (``named_packs_missing``: "no packs"), then the rest of the
    mark: missing (its root copy there) or damaged (docs/FORMAT.md, "Pack storage
    mark", in the same order).  Without its mark, a ``packs/`` that holds some of the packs the index
    names may still be an empty mount point that an older pyvbak stored packs into;
    the commands that write (backup, prune, the flags of verify and restore) refuse it,
    the ones that only read (verify, restore) read what is there.  An unmarked
    repository (made before the mark) is judged by its packs alone, and its next
    backup marks it once every pack the index names is there."""
    state, owner = pack_storage_mark_state(repo)
    if state == "foreign":  # (said first: it tells more than "none of the packs")
        return PackStorageProblem(repo, state, owner)
    if named_packs_missing(repo):
        # (every pack moved under other packs/HH/ is no storage lost: named)
        return misplaced_packs_problem(repo) or PackStorageProblem(repo, "no packs")
    if state == "unmarked":
        # no mark yet to tell the storage from an empty mount point holding a pack an
        # older pyvbak stored there: every pack the index names must be there (one
        # listing, until the first backup marks packs/)
        absent, misplaced = named_packs_absent_detail(repo)
        return PackStorageProblem(repo, state, count=absent, misplaced=tuple(misplaced)) if absent else None
    if state == "ok":
        return None
    # (with nothing stored either: the next backup's blocks would be hidden all the
    # same once the storage is mounted back)
    return PackStorageProblem(repo, state, owner)


def misplaced_packs_problem(repo) -> "PackStorageProblem | None":
    """A "misplaced" problem when packs the index names are found under another
    ``packs/HH/`` (a copy or a move done by hand): readers look for them where they
    belong, so their blocks read as missing, and a repair or a flag would give them
    up.  One listing: asked when blocks were found missing, and by repairs."""
    absent, misplaced = named_packs_absent_detail(repo)
    return PackStorageProblem(repo, "misplaced", count=absent, misplaced=tuple(misplaced)) if misplaced else None


def pack_storage_mark_state(repo) -> tuple[str, str]:
    """The pack-storage mark (docs/FORMAT.md, "Pack storage mark") as found:
    ("ok", ""), ("unmarked", "") - neither the mark nor its root copy: a repository no
    backup has marked yet -, ("missing", "") - the root copy says there is a mark, and
    ``packs/`` holds none -, ("damaged", ""), or ("foreign", ID): the mark names
    another repository.  Two reads of small objects."""
    try:
        mark = repo.backend.read(fmt.PACK_STORAGE_MARK)
    except ObjectMissing:
        local = local_path(repo.location)
        if local is not None and os.path.lexists(os.path.join(local, fmt.PACK_STORAGE_MARK)):
            return "damaged", ""  # (a directory or a device there: not "storage not mounted")
        return ("missing", "") if repo.backend.exists(fmt.PACK_STORAGE_MARK_COPY) else ("unmarked", "")
    try:
        owner = fmt.decode_pack_storage_mark(mark, fmt.PACK_STORAGE_MARK)
    except IntegrityError:
        return "damaged", ""
    return ("ok", "") if owner == repo.config.repo_id else ("foreign", owner)


def mark_pack_storage(repo) -> list[str]:
    """Write the pack-storage mark, then its root copy, unless both are there: backups
    call it once the storage has passed ``pack_storage_problem``, ``verify --repair``
    on the user's word.  The mark first: the root copy says that one exists.  A
    repository no backup has marked yet (made before the mark) is marked only when
    every pack its index names is there: an empty mount point holding a pack an older
    pyvbak stored into it passes the packs check, and marked, it would pass every
    check after.  Lines for the user."""
    state, _ = pack_storage_mark_state(repo)
    if state == "foreign":  # (another repository's mark is never replaced: its storage, not ours)
        return []
    if state == "ok":
        if not repo.backend.exists(fmt.PACK_STORAGE_MARK_COPY):  # (a crash between the two)
            repo.backend.replace(fmt.PACK_STORAGE_MARK_COPY, repo.backend.read(fmt.PACK_STORAGE_MARK))
        return []
    if state == "unmarked":
        absent = named_packs_absent(repo)
        if absent:
            return [f"warning: {absent} of the packs the index names are not in {repo.packs_location()} (storage "
                    f"not mounted, or packs lost?): it was not marked as this repository's pack storage; "
                    f"run 'pyvbak verify'"]
    return write_pack_storage_mark(repo, state)


def write_pack_storage_mark(repo, state: str) -> list[str]:
    """Write the mark and its root copy (the same bytes), whatever is there: the user's
    word (``verify --repair``), or a backup's after its checks."""
    data = fmt.encode_pack_storage_mark(repo.config.repo_id, now_iso())
    repo.backend.replace(fmt.PACK_STORAGE_MARK, data)
    repo.backend.replace(fmt.PACK_STORAGE_MARK_COPY, data)
    if state in ("unmarked", "ok"):
        return []
    return [f"marked {repo.packs_location()} as this repository's pack storage again (its mark "
            f"{pack_storage_mark_location(repo)} was {state})"]


def named_packs_missing(repo) -> bool:
    """Whether the pack indexes name stored blocks (or some are damaged) while the
    storage holds none of the packs they name: storage not mounted, or a copy made
    without its packs, far more often than data lost.  Costs a listing of ``index/``
    and a ``stat`` of the packs of the digest index's first and last records (the index
    a backup loads anyway); only when both are missing is ``packs/`` listed and
    compared with the packs the index names, a million records at a time.  Objects not
    named like packs (a ``lost+found/``, a "not mounted" sentinel file) do not count,
    nor packs the index does not name (another repository's).  Where a pack
    index is damaged, which packs it names is unknown: then any pack counts (a damaged
    index beside a pack really lost made every command say "not mounted").
    A pack an older pyvbak stored into the empty mount point during an earlier unmount
    is one the index names: it makes the storage look present; the pack-storage mark
    (``pack_storage_problem``) is what tells that storage from the mount point."""
    index = repo.load_digest_index()
    if not len(index) and not repo.damaged_pack_indexes:
        return False
    if len(index):
        recs = index.records_at([0, len(index) - 1])
        names = {fmt.pack_name(bytes(p).ljust(32, b"\0").hex()) for p in recs["pack"]}
        if any(repo.backend.exists(name) for name in sorted(names)):
            return False
    listed = [m.group(2) for m in map(_PACK_OBJECT.fullmatch, repo.backend.list(fmt.PACKS_FOLDER)) if m]
    if not listed:
        return True
    if repo.damaged_pack_indexes:
        return False
    present = digest_sets.unique(np.array([bytes.fromhex(h) for h in listed], "S32"))
    step = 1 << 20
    for start in range(0, len(index), step):
        recs = index.records_at(np.arange(start, min(len(index), start + step), dtype=np.int64))
        if digest_sets.isin(recs["pack"].view("S32"), present).any():
            return False
    return True


def named_packs_absent(repo) -> int:
    """How many of the packs the index names ``packs/`` does not hold (one listing)."""
    return named_packs_absent_detail(repo)[0]


def named_packs_absent_detail(repo) -> tuple[int, list[str]]:
    """(how many of the packs the index names ``packs/`` does not hold where readers
    look, the objects among them found under another ``packs/HH/``: misplaced, not
    lost).  One listing."""
    index = repo.load_digest_index()
    if not len(index):
        return 0, []
    named = digest_sets.unique(index.records["pack"].view("S32"))
    objects = repo.pack_object_names()
    listed = [m.group(2) for m in map(_PACK_OBJECT.fullmatch, objects) if m]
    present = digest_sets.unique(np.array([bytes.fromhex(h) for h in listed], "S32")) if listed else np.empty(0, "S32")
    absent = named[~digest_sets.isin(named, present)]
    if not len(absent):
        return 0, []
    wanted = {bytes(p).ljust(32, b"\0").hex() for p in absent}
    # (by its table of contents, not its name alone: a file of junk under a lost pack's
    # name was "to be moved there", into the pack's place)
    misplaced = [n for n in objects if n.rsplit("/", 1)[-1] in wanted and trailer_names_pack(repo.backend, n)]
    return len(absent), misplaced


def trailer_names_pack(backend, name: str, *, unreadable: bool = False) -> bool:
    """Whether the object ``name`` ends in a table of contents (trailer) that hashes to
    its file name: a whole pack.  ``unreadable``: the answer when it cannot be read to
    tell (a read error, damage past the trailer's length); a missing object is none."""
    try:
        size = backend.stat(name)
        if size < 4:
            return False
        tlen = fmt.trailer_length_from_tail(backend.read_range(name, size - 4, 4))
        if tlen > size:
            return False
        return fmt.pack_id(backend.read_range(name, size - tlen, tlen)).hex() == name.rsplit("/", 1)[-1]
    except ObjectMissing:
        return False
    except (BackendError, IntegrityError, ValueError):
        return unreadable


def pack_storage_mark_location(repo) -> str:
    """Where the pack-storage mark is, for messages: REPO/packs/pack-storage.json."""
    return (local_path(repo.location) or repo.location).rstrip("/") + "/" + fmt.PACK_STORAGE_MARK


@dataclass(frozen=True)
class PackStorageProblem:
    """Why ``packs/`` is not taken for the repository's pack storage
    (``pack_storage_problem``).  ``kind``: "no packs" (none of the packs the
    index names), "missing" / "damaged" (the pack-storage mark), "foreign" (the mark names
    repository ``owner``), "unmarked" (no mark yet, and ``count`` of the packs the index
    names absent), "misplaced" (``misplaced``: packs found under another ``packs/HH/``)."""

    repo: Repository
    kind: str
    owner: str = ""
    count: int = 0  # ("unmarked": how many of the packs the index names are not there)
    misplaced: tuple = ()  # (... of them found under another packs/HH/)

    def summary(self) -> str:
        """One clause for a warning line."""
        packs_dir = self.repo.packs_location()
        mark = pack_storage_mark_location(self.repo)
        if self.kind == "no packs":
            return f"none of the packs the index names is in {packs_dir} (storage not mounted?)"
        if self.kind == "missing":
            return f"the repository's pack-storage mark {mark} is missing (storage not mounted?)"
        if self.kind == "damaged":
            return f"the repository's pack-storage mark {mark} is damaged"
        if self.misplaced:
            return (f"{len(self.misplaced)} of the packs the index names are elsewhere under {packs_dir}, e.g. "
                    f"{self.misplaced[0]}, which belongs at {fmt.pack_name(self.misplaced[0].rsplit('/', 1)[-1])}")
        if self.kind == "unmarked":
            return f"{self.count} of the packs the index names are not in {packs_dir} (storage not mounted?)"
        return f"{packs_dir} holds another repository's packs (its mark names repository {self.owner})"

    def error(self, outcome: str) -> IntegrityError:
        """The command's error; ``outcome``: what it did not do ("nothing was backed up")."""
        repo, packs_dir = self.repo, self.repo.packs_location()
        mark = pack_storage_mark_location(repo)
        if self.kind == "no packs":
            # (verify --repair, not prune: prune refuses too, and a nightly job runs prune)
            return IntegrityError(
                f"repository {repo.location} has pack indexes but none of their pack files in {packs_dir}: its stored "
                f"data is not there (storage not mounted, or a copy made without its packs?); {outcome}: mount or "
                f"copy the packs back; only if they are really lost, run 'pyvbak verify --repair' to drop them from "
                f"the index, and backups then store every block again")
        if self.kind == "foreign":
            return IntegrityError(
                f"{packs_dir} holds another repository's packs: its pack-storage mark {mark} names repository "
                f"{self.owner}, and this one is {repo.config.repo_id}; {outcome}: mount this repository's pack storage "
                f"there")
        if self.misplaced:
            name, n = self.misplaced[0], len(self.misplaced)
            rest = self.count - n
            others = (f"; the other {rest} {'is' if rest == 1 else 'are'} nowhere under it" if rest else "")
            return IntegrityError(
                f"{self.count} of the packs the index of repository {repo.location} names are not where readers look "
                f"in {packs_dir}: {n} {'is' if n == 1 else 'are'} elsewhere under it, e.g. {name}, which belongs at "
                f"{fmt.pack_name(name.rsplit('/', 1)[-1])}{others}; {outcome}: move {'it' if n == 1 else 'them'} "
                f"there{'' if n == 1 else ' (each pack belongs at packs/HH/NAME, HH the first two characters of its NAME)'}, "
                f"then run the command again")
        if self.kind == "unmarked":
            return IntegrityError(
                f"{self.count} of the packs the index of repository {repo.location} names are not in {packs_dir}, and "
                f"no pack-storage mark tells its storage from an empty mount point yet (a repository made before the "
                f"mark); {outcome}: if the storage is not mounted, mount it; if those packs are really lost, run "
                f"'pyvbak verify --repair' to drop them from the index (the next backup then marks {packs_dir})")
        if self.kind == "missing":
            return IntegrityError(
                f"repository {repo.location} has marked its pack storage, but the mark {mark} is missing: the storage "
                f"its packs are on is not there (not mounted?); {outcome}: mount it, or copy the packs back with the "
                f"mark; only if {packs_dir} really is this repository's pack storage and the mark alone was lost, run "
                f"'pyvbak verify --repair': it checks the packs there and marks the storage again")
        return IntegrityError(
            f"repository {repo.location}'s pack-storage mark {mark} is damaged; {outcome}: put it back from a copy of "
            f"the repository, or, if {packs_dir} is this repository's pack storage, run 'pyvbak verify --repair': it "
            f"checks the packs there and marks the storage again")
