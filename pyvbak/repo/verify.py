"""Verify: re-read referenced blocks and check them, and the tables of contents of their
packs; name every snapshot a bad block hurts."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..backends import AccessDenied, BackendError, ObjectExists
from ..errors import IntegrityError, OutOfSpace, PyvbakError
from . import digest_sets
from . import format as fmt
from .reader import ReadFailure, ScratchSink, read_blocks, sort_for_reading

#: one stored copy of a block: (digest, pack id, offset), the digest and pack id 32 bytes each
Copy = tuple[bytes, bytes, int]


@dataclass(frozen=True)
class VerifyFindings:
    """The block copies a verify found, and the ``lost/`` flags as it read them: what a
    plain verify's ``flag_bad_copies`` and ``verify --repair`` (``repair_repository``) act
    on.  Not part of the JSON report."""

    bad_copies: list[Copy]  # read back corrupt or missing (what --repair drops)
    unreadable_copies: list[Copy]  # could not be read at all, twice (--repair keeps them)
    redundant_bad_copies: set[Copy]  # bad copies of blocks that have a good copy too
    healed_flags: list[Copy]  # flagged copies (lost/ markers) that read back intact now
    # the flags as they stood before any copy was read (the markers read, the S72 copy keys
    # they flag); a marker could not be read: none, so every bad copy is flagged anew
    flag_markers_seen: list[str]
    flagged_before: np.ndarray

    def bad_packs(self) -> set[str]:
        """The packs (hex) of which a copy read back bad."""
        return {bytes(c[1]).ljust(32, b"\0").hex() for c in self.bad_copies}


@dataclass(frozen=True)
class VerifyResult:
    """``report``: the JSON report (``verify --json`` prints it, with what the CLI adds);
    ``findings``: what flagging and repair act on."""

    report: dict
    findings: VerifyFindings


def verify_repository(repo, *, sample_percent: float | None = None, threads: int | None = None, seed: int | None = None,
                      snapshots=None) -> VerifyResult:
    """Check every block the snapshots reference (``snapshots``: only these SnapshotInfos'
    blocks, e.g. last night's; damaged metadata of others is then not reported, damaged
    pack indexes always are: they hide blocks from every snapshot)."""
    if sample_percent is not None and not 0 < sample_percent <= 100:
        from ..errors import UsageError

        raise UsageError(f"--sample {sample_percent} is out of range: give a percentage in (0, 100]")
    run = _VerifyRun(repo, sample_percent, threads, seed, snapshots)
    run.list_blocks()
    run.locate_blocks()
    run.read_copies()
    run.judge_copies()
    run.name_affected_snapshots()
    return run.result()


class _VerifyRun:
    """One verify, in its phases (in this order: each reads the repository only as its
    docstring says, and none writes to it):

    ``list_blocks``: the snapshots and the blocks they reference (their indexes read), a
    sample of them drawn;
    ``locate_blocks``: the pack index loaded (damaged pack index objects named) and each
    block placed; blocks it does not name, and whether packs no index names hold them;
    ``read_copies``: the flags as they stand, every stored copy read (those that could not
    be read, once more), then the tables of contents of their packs;
    ``judge_copies``: each copy that did not read back intact is bad or unreadable, a block
    with no good copy lost; flagged copies that read back intact are healed;
    ``name_affected_snapshots``: the snapshots each lost block hurts (their indexes read
    again), and snapshot indexes without metadata;
    ``result``: the report and the findings.

    Every attribute is declared in ``__init__``, with the phase that sets it."""

    def __init__(self, repo, sample_percent: float | None, threads: int | None, seed: int | None, snapshots):
        self.t0 = time.monotonic()  # when the verify began: its duration counts from here
        # ``chosen``: the snapshots to check (SnapshotInfos), None for all
        self.repo, self.sample_percent, self.seed, self.chosen = repo, sample_percent, seed, snapshots
        self.threads = threads or os.cpu_count() or 1
        # -- set by list_blocks (bad_snapshots, forgotten and unread_snapshots added to by
        # _unreadable, in name_affected_snapshots too)
        self.snaps: list = []  # the snapshots checked (SnapshotInfo)
        self.bad_snapshots: dict[str, str] = {}  # snapshot id -> why it is affected
        self.forgotten: set[str] = set()  # snapshots forgotten while verify read them (not damaged)
        # snapshots whose index could not be read (an I/O error: the storage, not damage found)
        self.unread_snapshots: set[str] = set()
        self.all_digests: np.ndarray | None = None  # the blocks checked (S32 digests, sorted; a sample of them)
        # -- set by locate_blocks
        self.index = None  # the repository's digest index
        self.damaged_indexes: list[str] = []  # pack index objects that cannot be read
        self.problems: dict[bytes, str] = {}  # digest -> what is wrong with the block (a lost block)
        self.lost_kind: dict[bytes, str] = {}  # digest -> why the block is lost (see locate_blocks)
        self.adoptable: np.ndarray | None = None  # pack index records of packs no index names holding missing blocks
        self.unindexed_lines: list[str] = []  # what listing the packs no index names said
        # -- set by read_copies
        self.flagged: np.ndarray | None = None  # the copies flagged (S72 copy keys) before any copy was read
        self.seen_markers: list[str] = []  # the lost/ markers those flags were read from
        self.flags_unreadable = False  # a marker could not be read
        self.recs: np.ndarray | None = None  # per copy: its record, in reading order
        self.which: np.ndarray | None = None  # per copy: its block (position in all_digests)
        self.checked: dict[str, int] = {}  # the blocks and bytes read back intact
        self.good: np.ndarray | None = None  # per copy: read back intact
        self.reasons: dict[int, str] = {}  # per copy that did not: why
        self.damaged_trailers: dict[str, str] = {}  # pack id (hex) -> what is wrong with its table of contents
        # -- set by judge_copies
        self.bad_copies: list[Copy] = []  # copies that read back wrong
        self.unreadable_copies: list[Copy] = []  # ... that could not be read, twice
        self.redundant_bad_copies: set[Copy] = set()  # bad copies of blocks that have a good one too
        self.damaged_entries: list[dict] = []  # the report's damaged_copies (bad ones of blocks with a good one)
        # ... its unreadable_redundant_copies, reported apart: --repair keeps them, they are no damage found
        self.unreadable_redundant_entries: list[dict] = []
        self.healed_flags: list[Copy] = []  # flagged copies that read back intact now
        # -- set by name_affected_snapshots
        self.lacking_blocks: set[str] = set()  # snapshots whose index reads, and names a lost block
        self.orphans: list[str] = []  # snapshot indexes without metadata

    # -- list_blocks ---------------------------------------------------------------------

    def list_blocks(self) -> None:
        """The snapshots (every metadata object read afresh when all are checked: damaged
        ones are then reported; chosen ones come resolved already), the digests of the
        blocks they reference, and a ``--sample`` of those."""
        repo = self.repo
        self.snaps = repo.snapshots(cached=False) if self.chosen is None else list(self.chosen)
        self.bad_snapshots = {
            sid: f"snapshot metadata {name} is corrupt: restore it from a copy, or forget the snapshot "
            f"('pyvbak forget {sid}'); prune refuses to run until then"
            for name in (repo.damaged_snapshots if self.chosen is None else [])
            for sid in [name[len("snapshots/") : -len(".json")]]
        }
        self.forgotten = set()
        self.unread_snapshots = set()
        self.all_digests = repo.referenced_digests(self.snaps, on_unreadable=self._unreadable)
        if self.sample_percent is not None and len(self.all_digests):
            rng = np.random.default_rng(self.seed)
            k = max(1, int(round(len(self.all_digests) * self.sample_percent / 100)))
            self.all_digests = np.sort(rng.choice(self.all_digests, size=k, replace=False))

    def _unreadable(self, snap, exc) -> None:
        """A snapshot whose index could not be read (``exc``): forgotten meanwhile, damaged,
        or unread."""
        if isinstance(exc, AccessDenied):
            raise exc  # this user's rights, not damage: verify stops (exit 3), as for a pack
        # forget takes a shared lock and runs beside verify: a snapshot whose metadata went
        # after the listing was forgotten meanwhile (its index goes next), not damaged
        if not self.repo.backend.exists(fmt.snapshot_meta_name(snap.id)):
            self.forgotten.add(snap.id)
        else:
            self.bad_snapshots[snap.id] = str(exc)
            if not isinstance(exc, IntegrityError):
                self.unread_snapshots.add(snap.id)

    # -- locate_blocks -------------------------------------------------------------------

    def locate_blocks(self) -> None:
        """The pack index, and the pack index objects that cannot be read; the blocks it
        does not name (``problems``), and the packs no index names that hold them."""
        repo, all_digests = self.repo, self.all_digests
        self.index = index = repo.load_digest_index()
        # The index objects themselves, whatever the local cache holds (it may predate damage)
        self.damaged_indexes = sorted(set(repo.damaged_pack_indexes) | set(repo.damaged_pack_index_names()))
        if self.damaged_indexes:
            # A cache built before the damage would hide it from the backup that repairs it.
            from .cache import repo_cache_dir
            from .digest_index import forget_cached

            forget_cached(repo_cache_dir(repo.config.repo_id))
        pos = index.locate(all_digests)
        # digest -> what is wrong with the block (a lost block)
        problems: dict[bytes, str] = {bytes(d).ljust(32, b"\0"): "block is missing (no pack index names it)"
                                      for d in all_digests[pos < 0]}
        self.problems = problems
        # why each lost block is lost, for what to do next: "not_indexed" (no record: a repair
        # or a prune dropped it, or an index was lost), "adoptable" (no record, but a pack no
        # index names holds it), "bad_copy" (every copy reads back wrong or its pack is gone),
        # "unreadable" (every copy failed to read, twice)
        lost_kind: dict[bytes, str] = dict.fromkeys(problems, "not_indexed")
        self.lost_kind = lost_kind
        # Missing from every pack index is not always lost: a pack index object lost from
        # storage leaves its packs unindexed, and their own tables of contents still say what
        # they hold (prune and --repair index them again).  Only listed when blocks are missing.
        self.adoptable = np.empty(0, fmt.PACK_INDEX_RECORD)
        self.unindexed_lines = []
        if problems:
            self.adoptable, self.unindexed_lines = repo.unindexed_pack_records(index)
            # copies a lost/ marker dropped that still read back bad are not adopted again
            # (repair.damaged_lost_copies): their blocks are missing, not "held"
            from .repair import damaged_lost_copies

            refused, _ = damaged_lost_copies(repo, self.adoptable)
            self.adoptable = self.adoptable[~refused]
            if len(self.adoptable):
                also_prune = "" if repo.damaged_pack_indexes else " (or 'pyvbak prune')"  # (prune stops on one)
                held = digest_sets.isin(all_digests[pos < 0], digest_sets.unique(self.adoptable["digest"].view("S32")))
                for d in all_digests[pos < 0][held]:
                    problems[bytes(d).ljust(32, b"\0")] = ("block is in no pack index, but a pack no index names holds "
                                                           "it: 'pyvbak verify --repair'" + also_prune
                                                           + " indexes that pack again")
                    lost_kind[bytes(d).ljust(32, b"\0")] = "adoptable"

    # -- read_copies ---------------------------------------------------------------------

    def read_copies(self) -> None:
        """The flags (``lost/`` markers) as they stand, then every stored copy of each block
        read (``good``, ``reasons``), those that could not be read once more, then the
        tables of contents of their packs (``damaged_trailers``)."""
        repo = self.repo
        # Every stored copy of each block is read, not just one: a snapshot is restorable as
        # long as each of its blocks has one good copy (restore falls back to another), and a
        # damaged copy beside a good one must still be named - prune keeps one copy per block
        # and must not keep a bad one, and --repair drops its record.
        # the flags as they stand before any copy is read: a clear written below counts for
        # these alone (a flag another verify writes while this one reads is not undone by a
        # read that came before it)
        self.flagged = repo.flagged_copies()
        self.seen_markers = list(repo.flag_markers_seen)
        self.flags_unreadable = len(self.seen_markers) < len(repo.lost_markers())
        which, positions = self.index.locate_all(self.all_digests)
        recs = self.index.records_at(positions)
        order = sort_for_reading(recs)
        recs, which = recs[order], which[order]
        if len(recs):  # the same record listed by two pack index files is one copy: read once
            same = np.zeros(len(recs), bool)
            same[1:] = ((recs["pack"][1:] == recs["pack"][:-1]) & (recs["offset"][1:] == recs["offset"][:-1])
                        & (recs["digest"][1:] == recs["digest"][:-1]))
            recs, which = recs[~same], which[~same]
        self.recs, self.which = recs, which
        checked = self.checked = {"blocks": 0, "bytes": 0}
        good = self.good = np.zeros(len(recs), bool)  # per copy: read back intact
        reasons: dict[int, str] = {}  # per copy that did not
        self.reasons = reasons

        count_lock = threading.Lock()

        def on_blocks(k: int, buffer, offsets, ulens, ok) -> None:
            with count_lock:
                good[k : k + len(ok)] |= ok
                checked["blocks"] += int(ok.sum())
                checked["bytes"] += int(ulens[ok].sum())

        def on_error(k: int, reason: str) -> None:
            with count_lock:
                reasons.setdefault(k, reason)

        read_blocks(repo, recs, ScratchSink(on_blocks, on_error, block_size=repo.config.block_size),
                    threads=self.threads)
        # Copies that could not be read at all (I/O errors, timeouts: ReadFailure) are read
        # once more, now that the rest is done: a passing error (a network file system, a
        # store's blip) must not have --repair drop the records of intact copies.
        failed_reads = np.array(sorted(k for k, r in reasons.items() if isinstance(r, ReadFailure)), np.int64)
        if len(failed_reads):
            for k in failed_reads.tolist():
                del reasons[k]

            def on_blocks_again(j: int, buffer, offsets, ulens, ok) -> None:
                with count_lock:
                    ks = failed_reads[j : j + len(ok)]
                    good[ks] |= ok
                    checked["blocks"] += int(ok.sum())
                    checked["bytes"] += int(ulens[ok].sum())

            def on_error_again(j: int, reason: str) -> None:
                with count_lock:
                    reasons.setdefault(int(failed_reads[j]), reason)

            read_blocks(repo, recs[failed_reads], ScratchSink(on_blocks_again, on_error_again,
                                                              block_size=repo.config.block_size), threads=self.threads)

        self.damaged_trailers = check_pack_trailers(repo, recs)

    # -- judge_copies --------------------------------------------------------------------

    def judge_copies(self) -> None:
        """Each copy that did not read back intact, bad or unreadable; a block with no good
        copy lost (``problems``); flagged copies that read back intact now.  Reads nothing."""
        recs, which, reasons = self.recs, self.which, self.reasons
        problems, lost_kind = self.problems, self.lost_kind
        # A block is lost only when no copy of it read back intact; a bad copy beside a good
        # one is a damaged copy: no snapshot loses anything, --repair drops its record.
        has_good = np.zeros(len(self.all_digests), bool)
        has_good[which[self.good]] = True
        bad_copies: list[Copy] = []  # copies that read back wrong
        unreadable_copies: list[Copy] = []  # ... that could not be read, twice
        redundant_bad: set[Copy] = set()  # bad copies of blocks that have a good one too
        damaged_entries: list[dict] = []  # the report's damaged_copies (bad ones of blocks with a good one)
        # ... its unreadable_redundant_copies, reported apart: --repair keeps them, they are no damage found
        unreadable_entries: list[dict] = []
        for k, reason in sorted(reasons.items()):
            d = bytes(recs["digest"][k]).ljust(32, b"\0")
            copy = (d, bytes(recs["pack"][k]).ljust(32, b"\0"), int(recs["offset"][k]))
            failed_read = isinstance(reason, ReadFailure)
            (unreadable_copies if failed_read else bad_copies).append(copy)
            if not failed_read and has_good[which[k]]:
                redundant_bad.add(copy)
            if has_good[which[k]]:
                (unreadable_entries if failed_read else damaged_entries).append(
                    {"digest": d.hex(), "pack": copy[1].hex(), "offset": copy[2], "reason": str(reason)})
            else:
                problems.setdefault(d, reason)
                if d not in lost_kind:
                    lost_kind[d] = "unreadable" if failed_read else "bad_copy"
        self.bad_copies, self.unreadable_copies = bad_copies, unreadable_copies
        self.redundant_bad_copies = redundant_bad
        self.damaged_entries, self.unreadable_redundant_entries = damaged_entries, unreadable_entries

        # flagged copies (lost/ markers) that read back intact now: put back, or re-cut under
        # the same name by the backup that stored their blocks again - to be cleared
        healed_flags: list[Copy] = []
        self.healed_flags = healed_flags
        # (clears need the flags they undo listed)
        if len(self.flagged) and self.good.any() and not self.flags_unreadable:
            intact = recs[self.good]
            keep = digest_sets.isin(digest_sets.copy_keys(intact), self.flagged)
            if reasons:  # a copy listed twice, one record reading back bad (a damaged index): not healed
                failed = digest_sets.unique(digest_sets.copy_keys(recs[np.array(sorted(reasons), np.int64)]))
                keep &= ~digest_sets.isin(digest_sets.copy_keys(intact), failed)
            for rec in intact[keep]:
                healed_flags.append((bytes(rec["digest"]).ljust(32, b"\0"), bytes(rec["pack"]).ljust(32, b"\0"),
                                     int(rec["offset"])))

    # -- name_affected_snapshots ---------------------------------------------------------

    def name_affected_snapshots(self) -> None:
        """When blocks are lost, a second pass over the snapshots' indexes names the ones
        each lost block hurts; then, when every snapshot is checked, the snapshot indexes
        without metadata (``snapshots/`` listed)."""
        repo, problems = self.repo, self.problems
        self.lacking_blocks = set()
        if problems:
            bad = digest_sets.unique(np.array(list(problems), dtype="S32"))
            for snap in self.snaps:
                if snap.id in self.bad_snapshots or snap.id in self.forgotten:
                    continue
                try:
                    digests = repo.snapshot_digests(snap)
                except PyvbakError as exc:
                    self._unreadable(snap, exc)
                    continue
                hit = digest_sets.isin(digests, bad)
                if hit.any():
                    first = bytes(digests[hit][0]).ljust(32, b"\0")
                    self.bad_snapshots[snap.id] = (f"{int(hit.sum())} bad block(s), e.g. {first.hex()[:16]}…: "
                                                   f"{problems[first]}")
                    self.lacking_blocks.add(snap.id)
        # Indexes without metadata: what a killed backup leaves (prune removes them) - or a
        # snapshot whose metadata object is gone.  Not a failure, but said: it is the only
        # trace of the second kind.
        names = set(repo.backend.list("snapshots/")) if self.chosen is None else set()
        self.orphans = sorted(n for n in names if n.endswith(".index") and n[: -len(".index")] + ".json" not in names)

    # -- result --------------------------------------------------------------------------

    def result(self) -> VerifyResult:
        """The JSON report (its keys in this order) and the findings."""
        problems, bad_snapshots, adoptable = self.problems, self.bad_snapshots, self.adoptable
        report = {
            "ok": (not problems and not bad_snapshots and not self.damaged_indexes and not self.damaged_entries
                   and not self.unreadable_copies and not self.damaged_trailers),
            # packs whose own table of contents (trailer) is damaged: their blocks read fine
            # through the pack index, but the pack could not be indexed again from itself
            "damaged_pack_trailers": [{"pack": p, "reason": r} for p, r in sorted(self.damaged_trailers.items())],
            "orphan_snapshot_indexes": self.orphans,
            "damaged_pack_indexes": [
                {"name": n, "reason": "not a readable pack index: the next backup re-indexes its packs from their "
                 "own tables of contents and removes it"}
                for n in self.damaged_indexes
            ],
            "snapshots": len(self.snaps) - len(self.forgotten),
            "blocks_checked": self.checked["blocks"],
            "bytes_checked": self.checked["bytes"],
            "sampled_percent": self.sample_percent,
            "problems": [{"digest": d.ljust(32, b"\0").hex(), "reason": r} for d, r in sorted(problems.items())][:1000],
            "problem_count": len(problems),
            # bad copies of blocks that have a good copy too: every snapshot still restores
            # (from the good one); 'verify --repair' drops their records
            "damaged_copies": self.damaged_entries[:1000],
            "damaged_copy_count": len(self.damaged_entries),
            "affected_snapshots": [{"id": sid, "reason": r} for sid, r in sorted(bad_snapshots.items())],
            # (for the CLI's next step: counts of lost blocks by cause, and the affected
            # snapshots whose own index or metadata is damaged, or could not be read)
            "lost_blocks_by_cause": {k: sum(1 for d in problems if self.lost_kind.get(d) == k)
                                     for k in ("bad_copy", "unreadable", "not_indexed", "adoptable")},
            "snapshots_damaged": sorted(set(bad_snapshots) - self.unread_snapshots - self.lacking_blocks),
            "snapshots_unread": sorted(self.unread_snapshots),
            "duration": time.monotonic() - self.t0,
            # packs no pack index names (their blocks are invisible until indexed again)
            "unindexed_packs": {"packs": len(set(adoptable["pack"].tolist())), "blocks": int(len(adoptable))}
            if len(adoptable) else None,
            # objects under packs/ that could hold the missing blocks but cannot be indexed as
            # they are (a pack under the wrong packs/HH/, a table of contents that does not
            # match the name): named, so a misplaced pack is moved back, not given up for lost
            "packs_left_alone": [ln for ln in self.unindexed_lines if ln.kind == "left_alone"],
            # copies that could not be read (I/O errors), twice: --repair keeps their records
            # unless told otherwise (--drop-unreadable).  The count is of every such copy; the
            # list names those of blocks that have a good copy too (the others are problems)
            "unreadable_copy_count": len(self.unreadable_copies),
            "unreadable_redundant_copies": self.unreadable_redundant_entries[:1000],
            "unreadable_redundant_copy_count": len(self.unreadable_redundant_entries),
        }
        findings = VerifyFindings(
            bad_copies=self.bad_copies,
            unreadable_copies=self.unreadable_copies,
            redundant_bad_copies=self.redundant_bad_copies,
            healed_flags=self.healed_flags,
            flag_markers_seen=[] if self.flags_unreadable else list(self.seen_markers),
            flagged_before=np.empty(0, "S72") if self.flags_unreadable else self.flagged,
        )
        return VerifyResult(report, findings)


def check_pack_trailers(repo, recs: np.ndarray) -> dict[str, str]:
    """pack id (hex) -> what is wrong with its trailer, for the packs of ``recs`` (the
    copies verify read).  A pack's trailer is what indexes it again when its pack index
    object is lost (adoption): verify read frames through the index only, so a trailer
    with a flipped bit or junk after it passed as clean, and the pack's blocks turned
    into lost ones the day its index went too.  Two range reads per pack; a pack that is
    gone or cannot be read is left to the frame checks, which report it."""
    from ..backends import BackendError, ObjectMissing

    damaged: dict[str, str] = {}
    if not len(recs):
        return damaged
    packs = recs["pack"].view("S32")
    order = np.argsort(packs, kind="stable")
    sorted_packs = packs[order]
    starts = np.flatnonzero(np.r_[True, sorted_packs[1:] != sorted_packs[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for a, b in zip(starts.tolist(), ends.tolist()):
        mine = recs[order[a:b]]
        pack_hex = bytes(mine["pack"][0]).ljust(32, b"\0").hex()
        name = fmt.pack_name(pack_hex)
        try:
            size = repo.backend.stat(name)
            if size < 4:
                damaged[pack_hex] = f"{size} bytes: no room for a table of contents"
                continue
            tlen = fmt.trailer_length_from_tail(repo.backend.read_range(name, size - 4, 4))
            if tlen > size:
                damaged[pack_hex] = "its last 4 bytes give a table of contents longer than the pack (bytes after it?)"
                continue
            raw = repo.backend.read_range(name, size - tlen, tlen)
        except (ObjectMissing, BackendError):
            continue
        if fmt.pack_id(raw).hex() != pack_hex:
            damaged[pack_hex] = "its table of contents does not hash to the pack's name (damaged)"
            continue
        try:
            toc = fmt.decode_pack_trailer(raw, f"pack {name}")
        except IntegrityError as exc:
            damaged[pack_hex] = str(exc)
            continue
        # as 48-byte keys, vectorised (a Python tuple per record was ~1 µs per block)
        want = np.zeros(len(mine), fmt.PACK_TRAILER_RECORD)
        for field in ("digest", "offset", "clen", "ulen"):
            want[field] = mine[field]
        if not digest_sets.isin(want.view("S48"), digest_sets.unique(np.ascontiguousarray(toc).view("S48"))).all():
            damaged[pack_hex] = "its table of contents does not list blocks the pack index says it holds"
    return damaged


def flag_bad_copies(repo, findings: VerifyFindings, *, flag_bad: bool, no_lock: bool,
                    beside: bool = True) -> dict | None:
    """Flag the copies a plain verify found corrupt or missing in a ``lost/`` marker, so the
    next backup of each disk that still holds those blocks stores them again (before, every
    backup after the damage deduplicated against the bad copies until someone ran
    ``verify --repair``: its snapshots could not be restored either; Proxmox Backup
    Server's verify likewise marks bad chunks for the next backup), and clear flagged
    copies that read back intact now (``findings.healed_flags``); ``flag_bad`` False (``verify
    --repair``, which drops the bad copies' records instead): only the clears.
    Create-only, under verify's lock.  ``{"marker": name or None, "copies": newly flagged,
    "again": flagged before too, "cleared": n, "error": reason or None}``, None when there
    is nothing to flag or clear."""
    bad = findings.bad_copies if flag_bad else []
    healed, redundant = findings.healed_flags, findings.redundant_bad_copies
    if not bad and not healed:
        return None
    # A copy an earlier marker flags is flagged again when another verify runs beside this
    # one (``beside``): it may have read the copy intact before it went bad again, and be
    # about to clear that earlier flag; this marker is one its clear does not know.
    # A verify that starts later reads the copy after this one found it bad:
    # its clear is right.  Otherwise flagged once: a marker a night for a block lost for
    # good made every disk's next backup re-check its parent, every night.  A
    # bad copy beside a good one matters to restore's choice alone: flagged once.
    again = 0
    if bad:
        keys = np.array([digest_sets.copy_key(*c) for c in bad], "S72")
        pairs = [(c, k) for c, k in zip(bad, digest_sets.isin(keys, findings.flagged_before).tolist())
                 if not (k and (c in redundant or not beside))]
        bad = [c for c, _ in pairs]
        again = sum(1 for _, k in pairs if k)
    nothing = {"marker": None, "copies": 0, "again": 0, "cleared": 0, "error": None}
    if not bad and not healed:
        return nothing
    if no_lock:  # read-only media, as a rule: verify writes nothing there
        return {**nothing, "error": "--no-lock: nothing is written"} if bad else nothing
    try:
        return {**nothing, "marker": repo.write_flag_marker(bad, healed, findings.flag_markers_seen),
                "copies": len(bad) - again, "again": again, "cleared": len(healed)}
    except (BackendError, ObjectExists, OutOfSpace, OSError) as exc:  # verify's report still stands
        return {**nothing, "error": str(exc)}


def lost_blocks_not_on_disks(repo, report: dict) -> bool:
    """Whether no backup can bring back the lost blocks: every disk of a snapshot that
    lacks them has a newer snapshot that does not use them - so the disk did not hold
    them at its last backup (verify said "back up the affected disks" after every such
    backup)."""
    lacking = ({a["id"] for a in report["affected_snapshots"]} - set(report.get("snapshots_damaged") or ())
               - set(report.get("snapshots_unread") or ()))
    if not lacking or not report.get("problem_count"):
        return False
    snaps = repo.snapshots()
    if repo.damaged_snapshots:
        # a snapshot whose description cannot be read may be a disk's newest (its VM and
        # place are unknown): the disk may still hold the blocks, and a backup heal them
        return False
    newest = {(s.vm, s.disk): s.id for s in snaps}  # (oldest first: the last one stays)
    disks = {(s.vm, s.disk) for s in snaps if s.id in lacking}
    affected = {a["id"] for a in report["affected_snapshots"]}  # (a damaged newest one: unknown)
    return all(newest.get(d) not in affected for d in disks)
