"""Repair: what ``pyvbak verify --repair`` changes, and what every adoption must respect
of an earlier repair (docs/FORMAT.md, "Lost packs" and "Pack storage mark").

The CLI takes the EXCLUSIVE lock (without removing stale locks) and calls:

1. ``start_repair`` before its verify: the pack storage is checked before any clean-up;
   ``packs/`` is marked again on the user's word where the mark is missing or damaged;
   stale locks go, unless the packs are all gone (their clean-up would remove damaged
   pack indexes as re-indexed);
2. ``repair_repository`` after it, in this order: adoption of what no index names
   (damaged pack indexes removed first), damaged tables of contents rebuilt, the bad
   copies' records dropped after a ``lost/`` marker naming them (or, with the packs all
   gone, every record of the packs storage does not hold), packs whose table of contents
   cannot be rebuilt moved out, a marker for blocks no index names, and, if it adopted
   packs and is not complete, the same verify once more.  It returns what was done (the
   JSON report's ``"repair"``, which the CLI puts there) and that second verify's report.

The primitives keep docs/FORMAT.md's order: a ``lost/`` marker before the pack index
changes, new pack index objects before the old ones go, a pack deleted only once no
index names it.  ``damaged_lost_copies`` / ``leave_out_damaged_lost_copies`` are what
adoption elsewhere (prune, verify, a backup's recovery) must leave out: copies a repair
dropped that still read back bad.  ``finish_moves`` is prune's too.

What a repair never does: mark over another repository's pack storage mark, or repair
while a pack the index names is found under another ``packs/HH/`` (misplaced, not lost);
mark ``packs/`` or drop the records of packs taken for lost after checking only a part
(SNAPSHOT or --sample: refused); drop a copy that could not be read at all (a read error
may pass) unless told to (``drop_unreadable``); drop another copy of a block than the one
named bad (it may be the good one); write a table of contents that does not hash to its
pack's name.

Errors: ``PackStorageProblem.error`` (exit 6) and ``UsageError`` (exit 2) from
``start_repair``, before anything is written; the backend's errors and ``IntegrityError``
of a pack index that cannot be read propagate (each step reads before it writes, and a
step stopped half-way leaves what the next repair or prune finishes); a pack that cannot
be read, rebuilt or moved is left as it is and named in the report's lines.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import zstandard

from .. import interrupts
from ..backends import BackendError, ObjectMissing, RangeBeyondEnd
from ..errors import IntegrityError, UsageError
from . import digest_sets
from . import format as fmt
from . import verify
from .pack_storage import (PackStorageProblem, misplaced_packs_problem, named_packs_absent, pack_storage_mark_state,
                           pack_storage_problem, trailer_names_pack, write_pack_storage_mark)
from .packer import PackWriter
from .reader import decode_block
from .repository import PACK_TARGET_BYTES, RecoveryLine
from .rewrite import delete_new_packs, delete_object, load_pack_indexes, rewrite_pack_indexes


def start_repair(repo, lock, *, partial: bool, say: Callable[[str], None]) -> PackStorageProblem | None:
    """The first step of ``verify --repair``, before its verify, under its EXCLUSIVE
    ``lock`` taken without removing stale locks: the pack storage checked before any
    clean-up, refused when it is another repository's or holds packs only misplaced
    (``PackStorageProblem.error``), and refused for a ``partial`` repair (SNAPSHOT or
    --sample: ``UsageError``) where the repair must drop or mark for the whole repository;
    otherwise ``packs/`` marked on the user's word where its mark is missing or damaged
    (``say`` gets the warning and the mark's lines), and stale locks removed, unless the
    packs are all gone.  The pack storage problem the repair goes on with (None: none),
    for ``repair_repository``."""
    # Before any clean-up (stale locks' included): with the packs all gone it would
    # remove damaged pack indexes as "re-indexed" with nothing there to re-index.
    # --repair is the user's word that they are lost: said at once,
    # and drop_lost_pack_records drops them, damaged pack indexes included.
    repair_problem = pack_storage_problem(repo)
    if not (repair_problem and repair_problem.kind == "foreign"):
        repair_problem = misplaced_packs_problem(repo) or repair_problem
    if repair_problem and (repair_problem.kind == "foreign" or repair_problem.misplaced):
        # (not this repository's to repair; or packs only misplaced, which the repair
        # would give up for lost)
        raise repair_problem.error("nothing was checked or repaired")
    storage_missing = repair_problem is not None and repair_problem.kind == "no packs"
    mark_state = pack_storage_mark_state(repo)[0] if repair_problem else "ok"
    whole = (PackStorageProblem(repo, mark_state) if mark_state in ("missing", "damaged")
             else repair_problem if repair_problem and repair_problem.kind == "unmarked" else None)
    if whole is not None and partial:
        # (marking packs/ for the whole repository after checking a part;
        # an unmarked repository's absent packs are dropped by a repair of everything)
        raise UsageError(f"{whole.summary()}: mount the storage, or, if {repo.packs_location()} really is this "
                         f"repository's pack storage, repair everything: 'pyvbak verify --repair' without "
                         f"SNAPSHOT or --sample")
    if storage_missing and partial:
        # (it drops every record of them, and reported on the chosen ones alone:
        # exit 0, "complete", with other snapshots left unrestorable)
        raise UsageError(f"{repair_problem.summary()}: mount them, or, if they are really lost, repair everything: "
                         f"'pyvbak verify --repair' without SNAPSHOT or --sample")
    if storage_missing:
        say(f"warning: {repair_problem.summary()}: --repair takes them for lost and drops every record of them")
    elif repair_problem:  # the mark missing or damaged, some of the packs there
        say(f"warning: {repair_problem.summary()}: --repair takes {repo.packs_location()} for this repository's "
            f"pack storage")
    # the user's word: packs/ as it is is the storage (its lost packs' records are
    # dropped by repair_repository)
    for line in write_pack_storage_mark(repo, mark_state) if mark_state in ("missing", "damaged") else ():
        say(line)
    if not storage_missing:
        lock.remove_stale()
    return repair_problem


@dataclass(frozen=True)
class RepairOptions:
    """What ``verify --repair`` was asked besides the repair: what its verify checked
    (``snapshots``: the chosen SnapshotInfos, None: every snapshot; ``sample_percent`` and
    ``seed``: its --sample), which the check after adopting packs checks again; and
    ``drop_unreadable``: drop the copies that could not be read too."""

    snapshots: Iterable | None
    sample_percent: float | None
    seed: int | None
    drop_unreadable: bool


@dataclass(frozen=True)
class RepairOutcome:
    """``report``: what the repair did, the JSON report's ``"repair"``; ``recheck_report``:
    the report of the verify run again after adopting packs, None when none ran."""

    report: dict
    recheck_report: dict | None


def repair_repository(repo, lock, repair_problem: PackStorageProblem | None, verified: verify.VerifyResult,
                      options: RepairOptions) -> RepairOutcome:
    """The repair of ``verify --repair``, after its verify (``verified``: its report - its
    ``unindexed_packs`` says whether packs no index names hold missing blocks - and the
    copies that read back corrupt or missing, or could not be read), under ``lock`` (``start_repair``'s,
    ``repair_problem`` its result).  In this order: what was left unindexed adopted,
    damaged tables of contents rebuilt (and an interrupted move finished), the bad copies'
    records dropped (every record of packs taken for lost), packs that cannot be rebuilt
    moved out, a marker for blocks no index names, and, after a repair that adopted packs
    and is not complete, the same verify again."""
    report, findings = verified.report, verified.findings
    storage_missing = repair_problem is not None and repair_problem.kind == "no packs"
    bad = findings.bad_copies
    if options.drop_unreadable:
        bad = bad + findings.unreadable_copies
    # taking the lock adopted what killed writers left (their stale locks gone)
    adopted = [ln for ln in lock.recovered if ln.kind in ("adopted", "index_removed", "index_kept")]
    # (report["unindexed_packs"]: packs no index names hold blocks missing from every pack index)
    if (report["unindexed_packs"] or report["damaged_pack_indexes"]) and not storage_missing:
        # what a backup does after a crash: damaged pack indexes removed first (a
        # re-indexed pack's index is often the very object name: create-only, it
        # would not replace the garbage), then unindexed packs indexed again.
        # Before the bad records are dropped: adopting after would index again a
        # pack whose every record was just dropped (undoing the repair at once).
        # Copies an earlier repair dropped that still read back bad are left out
        # by the adoption itself (one read: a second one here, its failures
        # dropped, undid the adoption of intact copies over a read error).
        adopted += [ln for ln in repo.recover_leftovers() if ln.kind in ("adopted", "index_removed", "index_kept")]
    # trailers first: rebuilt from the pack index's records of the pack, all of them
    # (a bad copy's record dropped first would leave a trailer that cannot be rebuilt)
    damaged_trailers = [d["pack"] for d in report["damaged_pack_trailers"]]
    movable: list[str] = []
    rebuilt, not_rebuilt = rebuild_pack_trailers(repo, damaged_trailers, movable)
    rebuilt = finish_moves(repo)[0] + rebuilt  # (an earlier repair's move, interrupted before its delete)
    # every pack gone (the user's word that they are lost): every record of them,
    # also of blocks no snapshot uses, which prune would drop but refuses to while
    # no pack is there (the backups stayed refused)
    if storage_missing:
        done = drop_lost_pack_records(repo)
        adopted += [RecoveryLine("index_removed", n, f"removed damaged pack index {n} (none of the packs is in "
                                 f"{repo.packs_location()}: taken for lost with the others)")
                    for n in done.pop("damaged_indexes_removed")]
        # packs there that no index names (a killed backup's): indexed now.
        # Always looked for: verify looks for them only when a block is missing from
        # the index, and with the packs all gone the index still names every block)
        adopted += [ln for ln in repo.recover_leftovers() if ln.kind == "adopted"]
    else:
        done = drop_bad_records(repo, bad)
        if repair_problem is not None and repair_problem.kind == "unmarked" and named_packs_absent(repo):
            # a repository made before the mark is refused while packs its index
            # names are absent: the records of blocks no snapshot uses go too (they
            # kept it refused for good), after a marker of their own
            more = drop_lost_pack_records(repo)
            done["records_removed"] += more["records_removed"]
            done["lost_marker"] = done["lost_marker"] or more["lost_marker"]
            adopted += [RecoveryLine("index_removed", n,
                                     f"removed damaged pack index {n} (its packs are not in {repo.packs_location()})")
                        for n in more["damaged_indexes_removed"]]
    # (absent packs of a repository no backup has marked are taken for lost too)
    done["packs_taken_for_lost"] = storage_missing or bool(
        repair_problem is not None and repair_problem.kind == "unmarked")
    if movable:
        # (after the bad copies' records are dropped: what the index still places
        # in such a pack is moved to a new one, when all of it reads back intact)
        moved, not_moved = move_out_of_packs(repo, movable)
        rebuilt += moved
        not_rebuilt = not_moved + [ln for ln in not_rebuilt
                                   if not any(ln.startswith(f"pack {p[:16]}…") for p in movable)]
    if report["lost_blocks_by_cause"]["not_indexed"] and not done["lost_marker"]:
        # blocks no index names that no marker covers (a pack and its pack index both
        # lost, after the snapshots naming them were made): a marker, so that the
        # next backup checks its parent instead of carrying their records on unread -
        # "back up the affected disks" is then true.  The parent is each affected
        # disk's newest snapshot (also when other snapshots were chosen),
        # which is checked anyway when it predates some marker.
        markers = set(repo.lost_markers())
        everything = repo.snapshots()
        hit = {a["id"] for a in report["affected_snapshots"]}
        disks = {(s.vm, s.disk) for s in everything if s.id in hit}
        newest = {(s.vm, s.disk): s for s in everything if (s.vm, s.disk) in disks}  # (oldest first)
        if any(markers <= set(s.meta.get("lost_checked") or ()) for s in newest.values()):
            done["lost_marker"] = repo.write_lost_marker([], 0)
    if options.snapshots is None and options.sample_percent is None:
        # (the ones it removed are no loss for the next backup to look into; after a
        # repair of a part, unindexed packs may be left: remembered as they were)
        repo.remember_pack_indexes()
    done["adopted"] = adopted
    done["trailers_rebuilt"] = rebuilt
    done["trailers_not_rebuilt"] = not_rebuilt
    done["complete"] = _repair_complete(report, done, options.drop_unreadable)
    if not done["complete"] and any(ln.kind == "adopted" for ln in adopted):
        # the blocks verify found in no pack index may be in the packs adopted just
        # now: checked again here (they were counted as lost, exit 6, and the user
        # was sent to run verify a second time)
        again = verify.verify_repository(repo, sample_percent=options.sample_percent, snapshots=options.snapshots,
                                         seed=options.seed).report
        done["recheck"] = {k: again[k] for k in ("ok", "problem_count", "affected_snapshots", "blocks_checked")}
        done["complete"] = again["ok"]
        return RepairOutcome(done, again)
    return RepairOutcome(done, None)


def _repair_complete(report: dict, done: dict, drop_unreadable: bool) -> bool:
    """Whether ``verify --repair`` left nothing of what the verify found (``report``; what
    the repair did: ``done``): no snapshot lost a block (every bad copy had a good one
    beside it), the bad copies' records are gone, every damaged pack index was removed (its
    packs re-indexed), and no copy that could not be read was kept (they are, unless
    ``--drop-unreadable``)."""
    if report["problem_count"] or report["affected_snapshots"]:
        return False
    if report["unreadable_copy_count"] and not drop_unreadable:
        return False
    removed = {ln.subject for ln in done["adopted"] if ln.kind == "index_removed"}
    if done.get("trailers_not_rebuilt"):
        return False
    return all(d["name"] in removed for d in report["damaged_pack_indexes"])


def drop_bad_records(repo, bad: list[tuple[bytes, bytes, int]]) -> dict:
    """``verify --repair``: remove from the pack index the records of block copies that
    read back missing or corrupt (``bad``: (digest, pack id, offset) of each), after a ``lost/``
    marker naming them.  Backups then no longer deduplicate against those copies: the
    next backup of a disk that still holds the blocks stores them again (a disk whose
    newest snapshot names one gets a full scan, see "Lost packs" in docs/FORMAT.md), and
    every snapshot that references them restores again once it has.  Caller holds the
    EXCLUSIVE lock."""
    report = {"records_removed": 0, "lost_marker": None}
    if not bad:
        return report
    index_names, recs = load_pack_indexes(repo)
    # the bad digests first (vectorised), then the exact copies among those: (digest,
    # pack, offset) - never another copy of the same block, which may be the good one
    cand = np.flatnonzero(digest_sets.isin(recs["digest"].view("S32"),
                                           digest_sets.unique(np.array([b[0] for b in bad], "S32"))))
    # matched as 72-byte keys, vectorised (a loop over the candidates took ~2 s per
    # million; a lost pack region can hold tens of millions)
    wanted = np.frombuffer(b"".join(digest_sets.copy_key(*b) for b in bad), "S72")
    drop = np.zeros(len(recs), bool)
    drop[cand] = digest_sets.isin(digest_sets.copy_keys(recs[cand]), digest_sets.unique(wanted))
    if not drop.any():
        return report
    packs = sorted(bytes(p).ljust(32, b"\0").hex() for p in digest_sets.unique(recs["pack"][drop].view("S32")))
    report["lost_marker"] = repo.write_lost_marker(packs, int(drop.sum()))
    # the local digest-index cache names the old index objects: it is rebuilt once they go
    rewrite_pack_indexes(repo, recs[~drop], index_names)
    repo._digest_index_cache = None
    report["records_removed"] = int(drop.sum())
    return report


def drop_lost_pack_records(repo) -> dict:
    """``verify --repair`` of a repository whose packs are all gone
    (``pack_storage_problem``), on the user's word that they are lost: every
    record of a pack the storage does not hold goes, after a ``lost/`` marker naming those
    packs - the records of blocks no snapshot uses too (prune drops those otherwise, and
    prune refuses while no pack is there: the backups would stay refused for good).
    Damaged pack indexes are removed too (their packs are of the same storage), listed in
    ``damaged_indexes_removed``; otherwise the same dict as ``drop_bad_records``.  Caller
    holds the EXCLUSIVE lock."""
    report = {"records_removed": 0, "lost_marker": None, "damaged_indexes_removed": []}
    # a damaged pack index names packs of the same storage: lost with the rest (prune's
    # strict reading stopped here)
    index_names, loaded = [], []
    for name in sorted(repo.pack_index_names()):
        try:
            loaded.append(fmt.decode_pack_index(repo.backend.read(name), f"pack index {name}"))
            index_names.append(name)
        except (IntegrityError, ObjectMissing):
            report["damaged_indexes_removed"].append(name)
    recs = np.concatenate(loaded) if loaded else np.empty(0, fmt.PACK_INDEX_RECORD)
    present = set(repo.backend.list(fmt.PACKS_FOLDER))
    # (4 M records of 2000 packs: 1.3 s, np.unique 2.0 s - digest_sets)
    pack_ids, inv = digest_sets.unique_inverse(recs["pack"].view("S32"))
    pack_hex = [bytes(p).ljust(32, b"\0").hex() for p in pack_ids]
    missing_p = np.array([fmt.pack_name(h) not in present for h in pack_hex], bool)
    drop = missing_p[inv]
    if not drop.any() and not report["damaged_indexes_removed"]:
        return report
    # the marker first (FORMAT.md, "Lost packs"): from it on, backups check their parents
    report["lost_marker"] = repo.write_lost_marker([h for h, m in zip(pack_hex, missing_p) if m], int(drop.sum()))
    if drop.any():
        rewrite_pack_indexes(repo, recs[~drop], index_names)
    for name in report["damaged_indexes_removed"]:
        delete_object(repo.backend, name)
    repo._digest_index_cache = None
    report["records_removed"] = int(drop.sum())
    return report


def move_out_of_packs(repo, packs: list[str], referenced=None) -> tuple[list[str], list[str]]:
    """``verify --repair`` of packs whose table of contents could not be rebuilt because
    frames are missing (a pack cut short, or one a repair dropped records of: its trailer
    no longer hashes to its name): the frames the pack index still places there that read
    back intact are copied unchanged into a new pack (create-only, durable), a ``lost/``
    marker names the old packs (``moved_out``), the pack indexes are rewritten with the new
    records instead of the old (new objects first), and the old packs are deleted last -
    prune's order (docs/FORMAT.md).  Verify reported such a pack every night after the
    repair that could not rebuild it, and neither --repair nor prune did anything about it.
    A frame that does not read back intact is left
    behind only when no snapshot references its block (``referenced``: sorted S32
    digests, asked for when needed): otherwise the pack stays (its copy is the repair's to
    drop first).  A pack the copy cuts again under its own name (every frame there after
    all) is that rebuild, and is not deleted.  (done lines, lines for packs left).
    Caller holds the EXCLUSIVE lock."""
    done: list[str] = []
    left: list[str] = []
    if not packs:
        return done, left
    index_names, recs = load_pack_indexes(repo)
    ids = recs["pack"].view("S32")
    dctx = zstandard.ZstdDecompressor()
    writer = PackWriter(repo.backend, PACK_TARGET_BYTES)
    index_hold = ExitStack()
    moving = np.zeros(len(recs), bool)
    moved_from: list[str] = []
    try:
        for pack_hex in packs:
            mine_at = np.flatnonzero(ids == np.frombuffer(bytes.fromhex(pack_hex), "S32")[0])
            if not len(mine_at):
                continue  # no block of it is indexed: prune deletes it
            mine = recs[mine_at]
            order = np.argsort(mine["offset"], kind="stable")
            mine, mine_at = mine[order], mine_at[order]
            first = np.r_[True, mine["offset"][1:] != mine["offset"][:-1]]  # a record listed twice: one frame
            name = fmt.pack_name(pack_hex)
            frames, dropped = [], 0
            for rec in mine[first]:
                off, n = int(rec["offset"]), int(rec["clen"])
                digest = bytes(rec["digest"]).ljust(32, b"\0")
                try:
                    frame = repo.backend.read_range(name, off, n)
                except (ObjectMissing, RangeBeyondEnd):  # gone, or past the end of a pack cut short
                    frame = None
                except BackendError as exc:  # a read that failed says nothing: the pack stays
                    frames = None
                    left.append(f"pack {pack_hex[:16]}…: cannot be read to move its blocks ({exc})")
                    break
                if frame is None or decode_block(dctx, memoryview(frame), int(rec["ulen"]), digest)[1] is not None:
                    if referenced is None:
                        unknown = []  # a snapshot whose index cannot be read may use anything
                        referenced = repo.referenced_digests(repo.snapshots(), on_unreadable=lambda s, e: unknown.append(s))
                        if unknown:
                            referenced = False
                    if referenced is False or digest_sets.isin(np.array([digest], "S32"), referenced)[0]:
                        frames = None
                        left.append(f"pack {pack_hex[:16]}…: block {digest.hex()[:16]}… in it does not read back "
                                    f"intact: its blocks stay where they are")
                        break
                    dropped += 1  # no snapshot uses it: left behind (what prune does with it)
                    continue
                frames.append((digest, frame, int(rec["ulen"])))
            if frames is None:
                continue
            for digest, frame, ulen in frames:
                writer.add(digest, frame, ulen)
            moving[mine_at] = True
            moved_from.append(pack_hex)
            done.append(f"moved the {len(frames)} block(s) of pack {pack_hex[:16]}… (its table of contents cannot be "
                        f"rebuilt) into a new pack" + (f", leaving {dropped} damaged one(s) no snapshot uses" if dropped
                                                       else ""))
        index_hold.enter_context(interrupts.held())  # (until the new index names them: see prune_repository)
        new_records = writer.finish()
    except BaseException:
        try:
            writer.abort()
            # (a new pack cut under the name of one the index names is that pack: it stays)
            named = {bytes(p).ljust(32, b"\0").hex() for p in digest_sets.unique(recs["pack"].view("S32"))}
            delete_new_packs(repo.backend, writer, named, stopping=True)
        finally:
            index_hold.close()
        raise
    with index_hold:  # (left on every way out)
        if not moved_from:
            return done, left
        written = {bytes(p).ljust(32, b"\0").hex() for p in np.unique(new_records["pack"].view("S32"))}
        gone = [p for p in moved_from if p not in written]  # (one cut again under its name was rebuilt)
        if gone:  # before the index changes: an interrupted move is finished later
            repo.write_lost_marker([], 0, moved_out=gone, moved_to=sorted(written))
        rewrite_pack_indexes(repo, np.concatenate([recs[~moving], new_records]), index_names)
    repo._digest_index_cache = None
    for pack_hex in gone:
        delete_object(repo.backend, fmt.pack_name(pack_hex))
    return done, left


def finish_moves(repo, indexed: set[str] | None = None) -> tuple[list[str], set[str]]:
    """Delete the packs a ``moved_out`` marker names that no pack index names any more: a
    move (``move_out_of_packs``) interrupted after its index rewrite, before the delete.
    (lines, the pack ids deleted).  Caller holds the EXCLUSIVE lock."""
    moves: list[tuple[set[str], set[str]]] = []  # (moved out, moved to)
    for marker in repo.lost_markers():
        try:
            doc = json.loads(repo.backend.read(marker))
            out_ = {h for h in doc.get("moved_out") or () if isinstance(h, str) and _PACK_HEX.fullmatch(h)}
            to = {h for h in doc.get("moved_to") or () if isinstance(h, str) and _PACK_HEX.fullmatch(h)}
        except (ObjectMissing, BackendError, ValueError, TypeError, AttributeError, RecursionError):
            continue
        if out_ and to:
            moves.append((out_, to))
    if not moves:
        return [], set()
    if indexed is None:
        try:
            _, recs = load_pack_indexes(repo)
        except (IntegrityError, ObjectMissing, BackendError):  # a damaged pack index: not now
            return [], set()
        indexed = {bytes(p).ljust(32, b"\0").hex() for p in np.unique(recs["pack"].view("S32"))}
    # a move is done when the packs it wrote are indexed (the index rewrite happened) and
    # the packs it emptied are not (nothing indexed them again since)
    named = set().union(*(o for o, to in moves if to <= indexed))
    out, deleted = [], set()
    for pack_hex in sorted(named - indexed):
        if trailer_names_pack(repo.backend, fmt.pack_name(pack_hex), unreadable=True):
            # a whole pack under that name (put back from a copy, or cut again by a
            # backup), or one that cannot be read to tell: not what the move emptied -
            # adoption indexes it)
            continue
        if delete_object(repo.backend, fmt.pack_name(pack_hex)):
            out.append(f"deleted pack {pack_hex[:16]}…, whose blocks an interrupted repair had moved to a new pack")
            deleted.add(pack_hex)
    return out, deleted


_PACK_HEX = re.compile(r"[0-9a-f]{64}")


def rebuild_pack_trailers(repo, packs: list[str], movable: list[str] | None = None) -> tuple[list[str], list[str]]:
    """``verify --repair`` of packs whose table of contents (trailer) is damaged
    (verify.check_pack_trailers): the trailer is rebuilt from the pack index's records of
    the pack - and written only when it hashes to the pack's name, which proves it is the
    one the pack was made with - then the pack is replaced by its frames and that trailer
    (an atomic replace; a pack whose frames verify read intact).  (rebuilt lines, lines
    for packs it could not rebuild).  ``movable`` gets the packs refused for what they
    hold (frames missing: cut short, or records dropped) - not for a read that failed -
    for ``move_out_of_packs``.  Caller holds the EXCLUSIVE lock."""
    done: list[str] = []
    left: list[str] = []
    if not packs:
        return done, left
    _, recs = load_pack_indexes(repo)
    ids = recs["pack"].view("S32")
    for pack_hex in packs:
        mine = recs[ids == np.frombuffer(bytes.fromhex(pack_hex), "S32")[0]]
        if not len(mine):
            left.append(f"pack {pack_hex[:16]}…: no pack index names it, its table of contents cannot be rebuilt")
            continue
        mine = mine[np.argsort(mine["offset"], kind="stable")]
        toc = np.zeros(len(mine), fmt.PACK_TRAILER_RECORD)
        for field in ("digest", "offset", "clen", "ulen"):
            toc[field] = mine[field]
        # one record per frame (a pack index listed twice gives the same record twice)
        keep = np.ones(len(toc), bool)
        keep[1:] = toc["offset"][1:] != toc["offset"][:-1]
        toc = toc[keep]
        trailer = fmt.encode_pack_trailer(toc)
        if fmt.pack_id(trailer).hex() != pack_hex:
            left.append(f"pack {pack_hex[:16]}…: the pack index no longer lists all of its blocks (a repair dropped "
                        f"some?): its table of contents cannot be rebuilt; its blocks stay indexed")
            if movable is not None:
                movable.append(pack_hex)
            continue
        end = int((toc["offset"].astype(np.int64) + toc["clen"].astype(np.int64)).max())
        name = fmt.pack_name(pack_hex)
        try:
            if repo.backend.stat(name) < end:
                left.append(f"pack {pack_hex[:16]}…: shorter than the blocks its index places in it (cut "
                            f"short): its table of contents cannot be rebuilt")
                if movable is not None:
                    movable.append(pack_hex)
                continue
            frames = repo.backend.read_range(name, 0, end)
        except (ObjectMissing, BackendError) as exc:
            left.append(f"pack {pack_hex[:16]}…: cannot be read to rebuild its table of contents ({exc})")
            continue
        repo.backend.replace(name, frames + trailer)
        done.append(f"rebuilt the table of contents of pack {pack_hex[:16]}… from its pack index "
                    f"({len(toc)} blocks; it hashes to the pack's name)")
    return done, left


def damaged_lost_copies(repo, records: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Of ``records`` (about to be adopted: read from the trailers of packs no index
    names), the ones not to index again: copies in a pack a ``lost/`` marker names that do
    not read back intact.  Such a pack is unindexed because ``verify --repair`` (or a prune
    that found it missing) dropped its records; adopting every record again - as for a
    killed backup's pack - would put the bad copies back in the index, and backups would
    deduplicate against them instead of storing the blocks again.  A pack that went
    missing and was put back reads back intact and is adopted whole.  Only such packs are
    read (rare); (per record: drop it, problem lines)."""
    drop = np.zeros(len(records), bool)
    if not len(records):
        return drop, []
    named: set[bytes] = set()
    for marker in repo.lost_markers():
        try:
            doc = json.loads(repo.backend.read(marker))
            named.update(bytes.fromhex(h) for h in doc.get("packs", []) if isinstance(h, str) and len(h) == 64)
        except (ObjectMissing, ValueError, TypeError, AttributeError, RecursionError):
            continue  # a marker that is not what prune writes: it names nothing readable
    if not named:
        return drop, []
    sel = np.flatnonzero(digest_sets.isin(records["pack"].view("S32"),
                                          digest_sets.unique(np.array(sorted(named), "S32"))))
    if not len(sel):
        return drop, []
    from .reader import ReadFailure, ScratchSink, read_blocks, sort_for_reading

    sel = sel[sort_for_reading(records[sel])]
    batch = records[sel]
    bad = np.zeros(len(batch), bool)
    unread = np.zeros(len(batch), bool)  # could not be read at all (ReadFailure): may pass

    def on_error(j: int, reason: str) -> None:
        bad[j] = True
        unread[j] = isinstance(reason, ReadFailure)

    read_blocks(repo, batch, ScratchSink(lambda *a: None, on_error, block_size=repo.config.block_size),
                threads=os.cpu_count() or 1)
    if not bad.any():
        return drop, []
    drop[sel[bad]] = True
    lines = []
    for what, mask, then in (
            ("still read back damaged", bad & ~unread, "not indexed again, the pack(s) left in place"),
            ("could not be read (I/O errors)", unread, "not indexed this time, the next adoption tries again")):
        if mask.any():
            packs = sorted({bytes(p).ljust(32, b"\0").hex() for p in batch["pack"][mask]})
            lines.append(f"{int(mask.sum())} copy(ies) in {len(packs)} pack(s) no index names (e.g. {packs[0][:16]}…) "
                         f"were dropped from the index by a lost/ marker and {what}: {then}")
    return drop, lines


def leave_out_damaged_lost_copies(repo, adopted: np.ndarray, lines: list[str]):
    """``adopted`` (records of unindexed packs, from ``unindexed_pack_records``) and its
    report ``lines`` without the copies ``damaged_lost_copies`` refuses: (records to
    index, their lines - a pack refused whole loses its "adopted" line -, problem lines,
    the hex ids of the packs refused whole)."""
    refused, problems = damaged_lost_copies(repo, adopted)
    if not refused.any():
        return adopted, lines, problems, set()

    def packs_of(recs):
        return {bytes(p).ljust(32, b"\0").hex() for p in digest_sets.unique(recs["pack"].view("S32"))}

    kept_out = packs_of(adopted[refused])
    adopted = adopted[~refused]
    kept_out -= packs_of(adopted)  # packs still adopted in part keep their line
    lines = [ln for ln in lines if not (ln.kind == "adopted" and ln.subject in kept_out)]
    return adopted, lines, problems, kept_out
