"""Verify: re-read referenced blocks and check them, and the tables of contents of their
packs; name every snapshot a bad block hurts."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from ..backends import AccessDenied, BackendError, ObjectExists
from ..errors import IntegrityError, OutOfSpace, PyvbakError
from . import digest_sets
from . import format as fmt
from .reader import ReadFailure, ScratchSink, read_blocks, sort_for_reading


def verify_repository(repo, *, sample_percent: float | None = None, threads: int | None = None, seed: int | None = None,
                      snapshots=None) -> dict:
    """Check every block the snapshots reference (``snapshots``: only these SnapshotInfos'
    blocks, e.g. last night's; damaged metadata of others is then not reported, damaged
    pack indexes always are: they hide blocks from every snapshot)."""
    if sample_percent is not None and not 0 < sample_percent <= 100:
        from ..errors import UsageError

        raise UsageError(f"--sample {sample_percent} is out of range: give a percentage in (0, 100]")
    t0 = time.monotonic()
    threads = threads or os.cpu_count() or 1
    # every metadata object read afresh only when everything is checked (damaged ones are
    # then reported); chosen snapshots come resolved already
    snaps = repo.snapshots(cached=False) if snapshots is None else list(snapshots)
    bad_snapshots: dict[str, str] = {
        sid: f"snapshot metadata {name} is corrupt: restore it from a copy, or forget the snapshot "
        f"('pyvbak forget {sid}'); prune refuses to run until then"
        for name in (repo.damaged_snapshots if snapshots is None else [])
        for sid in [name[len("snapshots/") : -len(".json")]]
    }
    forgotten: set[str] = set()
    # snapshots whose index could not be read (an I/O error: the storage, not damage found)
    unread_snapshots: set[str] = set()

    def unreadable(snap, exc) -> None:
        if isinstance(exc, AccessDenied):
            raise exc  # this user's rights, not damage: verify stops (exit 3), as for a pack
        # forget takes a shared lock and runs beside verify: a snapshot whose metadata went
        # after the listing was forgotten meanwhile (its index goes next), not damaged
        if not repo.backend.exists(fmt.snapshot_meta_name(snap.id)):
            forgotten.add(snap.id)
        else:
            bad_snapshots[snap.id] = str(exc)
            if not isinstance(exc, IntegrityError):
                unread_snapshots.add(snap.id)

    all_digests = repo.referenced_digests(snaps, on_unreadable=unreadable)
    if sample_percent is not None and len(all_digests):
        rng = np.random.default_rng(seed)
        k = max(1, int(round(len(all_digests) * sample_percent / 100)))
        all_digests = np.sort(rng.choice(all_digests, size=k, replace=False))

    index = repo.load_digest_index()
    # The index objects themselves, whatever the local cache holds (it may predate damage)
    damaged_indexes = sorted(set(repo.damaged_pack_indexes) | set(repo.damaged_pack_index_names()))
    if damaged_indexes:
        # A cache built before the damage would hide it from the backup that repairs it.
        from .cache import repo_cache_dir
        from .digest_index import forget_cached

        forget_cached(repo_cache_dir(repo.config.repo_id))
    pos = index.locate(all_digests)
    problems: dict[bytes, str] = {bytes(d).ljust(32, b"\0"): "block is missing (no pack index names it)" for d in all_digests[pos < 0]}
    # why each lost block is lost, for what to do next: "not_indexed" (no record: a repair
    # or a prune dropped it, or an index was lost), "adoptable" (no record, but a pack no
    # index names holds it), "bad_copy" (every copy reads back wrong or its pack is gone),
    # "unreadable" (every copy failed to read, twice)
    lost_kind: dict[bytes, str] = dict.fromkeys(problems, "not_indexed")
    # Missing from every pack index is not always lost: a pack index object lost from
    # storage leaves its packs unindexed, and their own tables of contents still say what
    # they hold (prune and --repair index them again).  Only listed when blocks are missing.
    adoptable = np.empty(0, fmt.PACK_INDEX_RECORD)
    unindexed_lines: list[str] = []
    if problems:
        adoptable, unindexed_lines = repo.unindexed_pack_records(index)
        # copies a lost/ marker dropped that still read back bad are not adopted again
        # (repair.damaged_lost_copies): their blocks are missing, not "held"
        from .repair import damaged_lost_copies

        refused, _ = damaged_lost_copies(repo, adoptable)
        adoptable = adoptable[~refused]
        if len(adoptable):
            also_prune = "" if repo.damaged_pack_indexes else " (or 'pyvbak prune')"  # (prune stops on one)
            held = digest_sets.isin(all_digests[pos < 0], digest_sets.unique(adoptable["digest"].view("S32")))
            for d in all_digests[pos < 0][held]:
                problems[bytes(d).ljust(32, b"\0")] = ("block is in no pack index, but a pack no index names holds it: "
                                                       "'pyvbak verify --repair'" + also_prune + " indexes that pack again")
                lost_kind[bytes(d).ljust(32, b"\0")] = "adoptable"
    # Every stored copy of each block is read, not just one: a snapshot is restorable as
    # long as each of its blocks has one good copy (restore falls back to another), and a
    # damaged copy beside a good one must still be named - prune keeps one copy per block
    # and must not keep a bad one, and --repair drops its record.
    # the flags as they stand before any copy is read: a clear written below counts for
    # these alone (a flag another verify writes while this one reads is not undone by a
    # read that came before it)
    flagged = repo.flagged_copies()
    seen_markers = list(repo.flag_markers_seen)
    flags_unreadable = len(seen_markers) < len(repo.lost_markers())
    which, positions = index.locate_all(all_digests)
    recs = index.records_at(positions)
    order = sort_for_reading(recs)
    recs, which = recs[order], which[order]
    if len(recs):  # the same record listed by two pack index files is one copy: read once
        same = np.zeros(len(recs), bool)
        same[1:] = ((recs["pack"][1:] == recs["pack"][:-1]) & (recs["offset"][1:] == recs["offset"][:-1])
                    & (recs["digest"][1:] == recs["digest"][:-1]))
        recs, which = recs[~same], which[~same]
    checked = {"blocks": 0, "bytes": 0}
    good = np.zeros(len(recs), bool)  # per copy: read back intact
    reasons: dict[int, str] = {}  # per copy that did not

    count_lock = threading.Lock()

    def on_blocks(k: int, buffer, offsets, ulens, ok) -> None:
        with count_lock:
            good[k : k + len(ok)] |= ok
            checked["blocks"] += int(ok.sum())
            checked["bytes"] += int(ulens[ok].sum())

    def on_error(k: int, reason: str) -> None:
        with count_lock:
            reasons.setdefault(k, reason)

    read_blocks(repo, recs, ScratchSink(on_blocks, on_error, block_size=repo.config.block_size), threads=threads)
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
                                                          block_size=repo.config.block_size), threads=threads)

    damaged_trailers = check_pack_trailers(repo, recs)

    # A block is lost only when no copy of it read back intact; a bad copy beside a good
    # one is a damaged copy: no snapshot loses anything, --repair drops its record.
    has_good = np.zeros(len(all_digests), bool)
    has_good[which[good]] = True
    bad_records: list[tuple[bytes, bytes, int]] = []  # (digest, pack, offset) of copies that read back wrong
    unreadable_records: list[tuple[bytes, bytes, int]] = []  # ... that could not be read, twice
    redundant_bad: set[tuple[bytes, bytes, int]] = set()  # bad copies of blocks that have a good one too
    damaged_copies: list[dict] = []
    unreadable_copies: list[dict] = []  # reported apart: --repair keeps them, they are no damage found
    for k, reason in sorted(reasons.items()):
        d = bytes(recs["digest"][k]).ljust(32, b"\0")
        copy = (d, bytes(recs["pack"][k]).ljust(32, b"\0"), int(recs["offset"][k]))
        failed_read = isinstance(reason, ReadFailure)
        (unreadable_records if failed_read else bad_records).append(copy)
        if not failed_read and has_good[which[k]]:
            redundant_bad.add(copy)
        if has_good[which[k]]:
            (unreadable_copies if failed_read else damaged_copies).append(
                {"digest": d.hex(), "pack": copy[1].hex(), "offset": copy[2], "reason": str(reason)})
        else:
            problems.setdefault(d, reason)
            if d not in lost_kind:
                lost_kind[d] = "unreadable" if failed_read else "bad_copy"

    # flagged copies (lost/ markers) that read back intact now: put back, or re-cut under
    # the same name by the backup that stored their blocks again - to be cleared
    healed_flags: list[tuple[bytes, bytes, int]] = []
    if len(flagged) and good.any() and not flags_unreadable:  # (clears need the flags they undo listed)
        intact = recs[good]
        keep = digest_sets.isin(digest_sets.copy_keys(intact), flagged)
        if reasons:  # a copy listed twice, one record reading back bad (a damaged index): not healed
            failed = digest_sets.unique(digest_sets.copy_keys(recs[np.array(sorted(reasons), np.int64)]))
            keep &= ~digest_sets.isin(digest_sets.copy_keys(intact), failed)
        for rec in intact[keep]:
            healed_flags.append((bytes(rec["digest"]).ljust(32, b"\0"), bytes(rec["pack"]).ljust(32, b"\0"),
                                 int(rec["offset"])))

    lacking_blocks: set[str] = set()  # snapshots whose index reads, and names a lost block
    if problems:  # a second pass names the snapshots each bad block hurts
        bad = digest_sets.unique(np.array(list(problems), dtype="S32"))
        for snap in snaps:
            if snap.id in bad_snapshots or snap.id in forgotten:
                continue
            try:
                digests = repo.snapshot_digests(snap)
            except PyvbakError as exc:
                unreadable(snap, exc)
                continue
            hit = digest_sets.isin(digests, bad)
            if hit.any():
                first = bytes(digests[hit][0]).ljust(32, b"\0")
                bad_snapshots[snap.id] = f"{int(hit.sum())} bad block(s), e.g. {first.hex()[:16]}…: {problems[first]}"
                lacking_blocks.add(snap.id)
    # Indexes without metadata: what a killed backup leaves (prune removes them) - or a
    # snapshot whose metadata object is gone.  Not a failure, but said: it is the only
    # trace of the second kind.
    names = set(repo.backend.list("snapshots/")) if snapshots is None else set()
    orphans = sorted(n for n in names if n.endswith(".index") and n[: -len(".index")] + ".json" not in names)
    return {
        "ok": (not problems and not bad_snapshots and not damaged_indexes and not damaged_copies and not unreadable_records
               and not damaged_trailers),
        # packs whose own table of contents (trailer) is damaged: their blocks read fine
        # through the pack index, but the pack could not be indexed again from itself
        "damaged_pack_trailers": [{"pack": p, "reason": r} for p, r in sorted(damaged_trailers.items())],
        "orphan_snapshot_indexes": orphans,
        "damaged_pack_indexes": [
            {"name": n, "reason": "not a readable pack index: the next backup re-indexes its packs from their "
             "own tables of contents and removes it"}
            for n in damaged_indexes
        ],
        "snapshots": len(snaps) - len(forgotten),
        "blocks_checked": checked["blocks"],
        "bytes_checked": checked["bytes"],
        "sampled_percent": sample_percent,
        "problems": [{"digest": d.ljust(32, b"\0").hex(), "reason": r} for d, r in sorted(problems.items())][:1000],
        "problem_count": len(problems),
        # bad copies of blocks that have a good copy too: every snapshot still restores
        # (from the good one); 'verify --repair' drops their records
        "damaged_copies": damaged_copies[:1000],
        "damaged_copy_count": len(damaged_copies),
        "affected_snapshots": [{"id": sid, "reason": r} for sid, r in sorted(bad_snapshots.items())],
        # (for the CLI's next step: counts of lost blocks by cause, and the affected
        # snapshots whose own index or metadata is damaged, or could not be read)
        "lost_blocks_by_cause": {k: sum(1 for d in problems if lost_kind.get(d) == k)
                                 for k in ("bad_copy", "unreadable", "not_indexed", "adoptable")},
        "snapshots_damaged": sorted(set(bad_snapshots) - unread_snapshots - lacking_blocks),
        "snapshots_unread": sorted(unread_snapshots),
        "duration": time.monotonic() - t0,
        # packs no pack index names (their blocks are invisible until indexed again)
        "unindexed_packs": {"packs": len(set(adoptable["pack"].tolist())), "blocks": int(len(adoptable))}
        if len(adoptable) else None,
        # objects under packs/ that could hold the missing blocks but cannot be indexed as
        # they are (a pack under the wrong packs/HH/, a table of contents that does not
        # match the name): named, so a misplaced pack is moved back, not given up for lost
        "packs_left_alone": [ln for ln in unindexed_lines if ln.startswith("left ")],
        # copies that could not be read (I/O errors), twice: --repair keeps their records
        # unless told otherwise (--drop-unreadable).  The count is of every such copy; the
        # list names those of blocks that have a good copy too (the others are problems)
        "unreadable_copy_count": len(unreadable_records),
        "unreadable_redundant_copies": unreadable_copies[:1000],
        "unreadable_redundant_copy_count": len(unreadable_copies),
        # for verify --repair (repair.drop_bad_records); not part of the JSON report
        "_bad_records": bad_records,
        "_redundant_bad": redundant_bad,
        "_healed_flags": healed_flags,
        "_flag_markers_seen": [] if flags_unreadable else list(seen_markers),
        # a marker could not be read: what it flags is unknown, so every bad copy is flagged anew
        "_flagged_before": np.empty(0, "S72") if flags_unreadable else flagged,
        "_unreadable_records": unreadable_records,
        "_adoptable": len(adoptable) > 0,
    }


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


def flag_bad_copies(repo, bad: list, redundant: set, flagged_before, healed: list, seen: list,
                    no_lock: bool, *, beside: bool = True) -> dict | None:
    """Flag the copies a plain verify found corrupt or missing in a ``lost/`` marker, so the
    next backup of each disk that still holds those blocks stores them again (before, every
    backup after the damage deduplicated against the bad copies until someone ran
    ``verify --repair``: its snapshots could not be restored either; Proxmox Backup
    Server's verify likewise marks bad chunks for the next backup), and clear flagged
    copies that read back intact now (``healed``).
    Create-only, under verify's lock.  ``{"marker": name or None, "copies": newly flagged,
    "again": flagged before too, "cleared": n, "error": reason or None}``, None when there
    is nothing to flag or clear."""
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
        pairs = [(c, k) for c, k in zip(bad, digest_sets.isin(keys, flagged_before).tolist())
                 if not (k and (c in redundant or not beside))]
        bad = [c for c, _ in pairs]
        again = sum(1 for _, k in pairs if k)
    nothing = {"marker": None, "copies": 0, "again": 0, "cleared": 0, "error": None}
    if not bad and not healed:
        return nothing
    if no_lock:  # read-only media, as a rule: verify writes nothing there
        return {**nothing, "error": "--no-lock: nothing is written"} if bad else nothing
    try:
        return {**nothing, "marker": repo.write_flag_marker(bad, healed, seen), "copies": len(bad) - again,
                "again": again, "cleared": len(healed)}
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
