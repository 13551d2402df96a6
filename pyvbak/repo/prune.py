"""Forget snapshots and prune the data no snapshot references any more.

``forget`` deletes a snapshot's metadata (it disappears at that instant) and then its
block index.  It needs only a shared lock: it deletes nothing another snapshot or a
running backup uses (a backup that took the forgotten snapshot as its parent has already
loaded the parent's index, and the blocks stay until a prune).

``prune`` takes the exclusive lock (no backup, restore or verify runs meanwhile) and:

1. removes temp objects of interrupted writes and block indexes without metadata (left
   by backups killed between their last two writes), and adopts packs no index names
   (indexed from their trailers: a killed backup's, or ones whose index was lost);
2. reads every snapshot's block index: the set of referenced blocks (a snapshot whose
   index cannot be read stops the prune - deleting data it might reference is never
   safe);
3. reads every pack index: for each referenced block one copy is kept (duplicates come
   from adopted packs of killed backups); a pack none of whose blocks is kept is
   deleted, a pack with at least ``repack_unused`` of its bytes unused is *repacked* -
   its kept frames, each checked against its digest, are copied as they are (no
   recompression) into new packs;
4. writes the new pack index (create-only), then deletes the old pack index files, then
   the packs no index names any more.

Crash safety (docs/FORMAT.md "Prune"): until step 4 only new objects are written; in step
4 the old indexes go before any pack, so no index ever names a deleted pack, and a
killed prune leaves at worst unindexed packs (adopted by the next backup, removed by
the next prune) and duplicate index entries (harmless).
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import ExitStack

import numpy as np
import zstandard

from .. import interrupts
from ..backends import BackendError, ObjectMissing, RangeBeyondEnd
from ..errors import IntegrityError, OutOfSpace, PyvbakError
from . import digest_sets
from . import format as fmt
from .packer import PackWriter
from .reader import decode_block, group_members
from .repository import PACK_TARGET_BYTES, consistency_groups

#: repack a pack once this share of its frame bytes is unused (restic's default
#: ``--max-unused`` is 5 % of the whole repository; per pack, 20 % keeps repacking - a
#: full read and rewrite of the pack - for packs that are mostly garbage)
REPACK_UNUSED = 0.2
#: records per new pack index file (80 bytes each: 80 MiB per file before compression)
INDEX_RECORDS_PER_FILE = 1 << 20


def forget_snapshots(repo, snaps) -> list[str]:
    """Delete each snapshot: metadata first (it is gone at that instant), then its index.
    Caller holds a (shared) repository lock.  Returns the ids."""
    from ..backends import ObjectMissing

    done = []
    for snap in snaps:
        for name in (fmt.snapshot_meta_name(snap.id), fmt.snapshot_index_name(snap.id)):
            try:
                repo.backend.delete(name)
            except ObjectMissing:
                pass  # forgotten concurrently, or a crash between the two deletes
        done.append(snap.id)
    return done


def keep_last_selection(snaps, keep_last: int) -> list:
    """Snapshots to forget so that each (vm, disk) keeps its ``keep_last`` newest - and
    each VM its ``keep_last`` newest complete consistency groups (its disks frozen at one
    instant): a run that failed on one disk leaves the others a snapshot more, and
    counting per disk alone could forget every group whole, leaving no consistent set
    of the VM's disks to restore."""
    per_disk: dict[tuple[str, str], list] = {}
    for s in snaps:  # oldest first (Repository.snapshots)
        per_disk.setdefault((s.vm, s.disk), []).append(s)
    out = []
    for group in per_disk.values():
        out.extend(group[: max(0, len(group) - keep_last)])
    protected = {s.id for s in _newest_complete_groups(snaps, keep_last)}
    return [s for s in out if s.id not in protected]


def _newest_complete_groups(snaps, n: int) -> list:
    """The snapshots of each VM's ``n`` newest consistency groups that have a snapshot of
    every disk they froze."""
    by_vm: dict[str, list] = {}
    for g in consistency_groups(snaps):  # oldest first
        if g.complete:
            by_vm.setdefault(g.vm, []).append(g)
    return [s for groups in by_vm.values() for g in groups[-n:] for s in g.ordered()]


def prune_repository(repo, *, dry_run: bool = False, repack_unused: float = REPACK_UNUSED,
                     without: frozenset[str] = frozenset()) -> dict:
    """Remove what no snapshot references.  Caller holds the EXCLUSIVE lock.
    ``without``: snapshot ids counted as forgotten already (the preview of
    ``forget --prune --dry-run``)."""
    t0 = time.monotonic()
    backend = repo.backend
    report: dict = {
        "dry_run": dry_run,
        "temp_objects_removed": [],
        "orphan_snapshot_indexes": [],
        "snapshots": 0,
        "referenced_blocks": 0,
        "missing_blocks": 0,
        "packs_before": 0,
        "packs_missing": 0,
        "packs_deleted": 0,
        "packs_repacked": 0,
        "packs_written": 0,
        "adopted": [],
        "blocks_removed": 0,
        "bytes_freed": 0,
        "problems": [],
    }

    # 1. leftovers of interrupted writes (an exclusive lock that removed stale locks has
    # cleaned up after their processes already: its findings are reported here too)
    recovered = [line for lk in getattr(repo, "_locks", []) if lk.held and lk.exclusive for line in lk.recovered]
    if not dry_run:
        report["temp_objects_removed"] = [line[len("removed incomplete object "):] for line in recovered
                                          if line.startswith("removed incomplete object ")]
        report["temp_objects_removed"] += backend.cleanup_incomplete(older_than_seconds=0)
    names = list(backend.list("snapshots/"))
    metas = {n[: -len(".json")] for n in names if n.endswith(".json")}
    orphans = sorted(n for n in names if n.endswith(".index") and n[: -len(".index")] not in metas)
    report["orphan_snapshot_indexes"] = orphans

    # 2. what the snapshots reference
    try:
        # Every metadata object read again, not taken from the local cache: a description
        # damaged since it was cached must stop prune as much as one never seen before.
        snaps = [s for s in repo.snapshots(strict=True, cached=False) if s.id not in without]
        report["snapshots"] = len(snaps)
        referenced = repo.referenced_digests(snaps)
    except PyvbakError as exc:
        # the error keeps its own class (its exit code): storage refusing a read is exit 3,
        # not the "missing or corrupt data" of exit 6 that monitoring reads as damage
        stopped = type(exc) if type(exc).__init__ is PyvbakError.__init__ else IntegrityError
        raise stopped(f"prune stopped, nothing deleted: {exc}") from None
    report["referenced_blocks"] = int(len(referenced))

    # Packs no index names are adopted (indexed from their own trailers) before anything
    # is decided, not deleted as a killed backup's leftovers: their blocks may be what a
    # snapshot references (a pack index lost from storage); those no snapshot references
    # go below like any other unreferenced pack.  A dry run adopts them in memory only.
    adopted, lines = repo.unindexed_pack_records()
    # ... except the copies a lost/ marker dropped because they read back bad: adopting
    # them again would undo 'verify --repair' (backups would deduplicate against them)
    adopted, lines, more, kept_out = leave_out_damaged_lost_copies(repo, adopted, lines)
    report["problems"] += more  # kept_out: packs left unindexed for that reason
    report["adopted"] = [line for line in recovered if line.startswith(("adopted", "left"))] + lines
    if len(adopted) and not dry_run:
        repo.write_pack_index(adopted)
        repo._digest_index_cache = None
        adopted = adopted[:0]

    # 3. what the packs hold, and which copy of each referenced block stays
    index_names, recs = _load_pack_indexes(repo)
    if len(adopted):
        recs = np.concatenate([recs, adopted])
    listed_records = len(recs)
    # Integer keys from here on: sorting and comparing the 32-byte names themselves is
    # what made a prune of 4 M records take 26 s (digest_sets).
    pack_ids, inv = digest_sets.unique_inverse(recs["pack"].view("S32"))
    if len(recs):  # the same record listed by two index files counts once
        order = np.lexsort((recs["offset"], inv))
        recs, inv = recs[order], inv[order]
        o = recs["offset"]
        uniq = np.ones(len(recs), bool)
        uniq[1:] = (inv[1:] != inv[:-1]) | (o[1:] != o[:-1])
        recs, inv = recs[uniq], inv[uniq]
        del order, o, uniq
    clen = recs["clen"].astype(np.int64)
    # Packs an index names but the backend does not hold (lost storage, deleted by hand):
    # their records go from the index, so the next backup of a disk that has those blocks
    # stores them again instead of deduplicating against frames that are gone.
    listed_packs = repo.pack_object_names()
    present_hex = {n.rsplit("/", 1)[-1] for n in listed_packs}
    present_names = set(listed_packs)
    pack_hex = [bytes(p).ljust(32, b"\0").hex() for p in pack_ids]
    # by full name: readers open packs/HH/ID, so a pack moved to another HH/ is missing too
    missing_p = np.array([fmt.pack_name(h) not in present_names for h in pack_hex], bool)
    ref_pos = digest_sets.locate(recs["digest"].view("S32"), referenced)  # digest rank, -1: unreferenced
    ref_pos[missing_p[inv]] = -1  # a copy in a missing pack is no copy
    is_ref = ref_pos >= 0
    stored = np.zeros(len(referenced), bool)
    stored[ref_pos[is_ref]] = True
    report["missing_blocks"] = int(len(referenced) - np.count_nonzero(stored))
    report["packs_before"] = int(len(pack_ids))
    ref_bytes = np.bincount(inv, weights=clen * is_ref, minlength=len(pack_ids))
    cand = np.flatnonzero(is_ref)
    # per digest the copy in the pack with the most referenced bytes (likeliest to stay)
    cand = cand[np.lexsort((-ref_bytes[inv[cand]], ref_pos[cand]))]
    first = np.ones(len(cand), bool)
    first[1:] = ref_pos[cand][1:] != ref_pos[cand][:-1]
    keep = np.zeros(len(recs), bool)
    # a block stored more than once keeps a copy that reads back intact: the preferred
    # copy may be the damaged one, and keeping it while the good one goes loses the block
    keep[_intact_choice(repo, recs, cand, first, report)] = True
    kept_bytes = np.bincount(inv, weights=clen * keep, minlength=len(pack_ids))
    total_bytes = np.bincount(inv, weights=clen, minlength=len(pack_ids))
    unused_share = np.where(total_bytes > 0, 1 - kept_bytes / np.maximum(total_bytes, 1), 1.0)
    delete_p = (kept_bytes == 0) & ~missing_p
    # a pack with nothing unused is never repacked, whatever the threshold: the copy would
    # be the same bytes under the same content-derived name
    repack_p = ~delete_p & ~missing_p & (unused_share >= repack_unused) & (kept_bytes < total_bytes)
    # Records of packs that stay are all kept in the index, used or not: their frames are
    # still there (a later backup may dedup against them), and the next prune counts
    # their bytes when it decides whether to repack.
    report["blocks_removed"] = int(np.count_nonzero(delete_p[inv] | (repack_p[inv] & ~keep)))
    if missing_p.any():
        report["packs_missing"] = int(np.count_nonzero(missing_p))
        lost = int(np.count_nonzero(missing_p[inv]))
        report["problems"].append(
            f"{report['packs_missing']} pack(s) the index names are missing (e.g. {pack_hex[int(np.flatnonzero(missing_p)[0])][:16]}…): "
            f"{'their' if dry_run else 'removed their'} {lost} block record(s) from the index, so backups store those "
            f"blocks again; run 'pyvbak verify' to see which snapshots lost blocks")

    indexed_hex = set(pack_hex) | kept_out  # (packs kept out of the index are named above)
    if not dry_run:  # a repair's move interrupted before its delete: its old pack goes now
        finished, deleted = finish_moves(repo, indexed_hex)
        if finished:
            report["moves_finished"] = finished
        listed_packs = [n for n in listed_packs if n.rsplit("/", 1)[-1] not in deleted]
    # what is left unindexed now could not be adopted (no valid trailer): not ours to delete
    unreadable = [n for n in listed_packs if n.rsplit("/", 1)[-1] not in indexed_hex]
    if unreadable:
        report["problems"].append(f"{len(unreadable)} object(s) under packs/ are no pack pyvbak can read "
                                  f"(e.g. {unreadable[0]}): left in place")
    report["packs_deleted"] = int(np.count_nonzero(delete_p))
    report["packs_repacked"] = int(np.count_nonzero(repack_p))
    if dry_run:
        report["bytes_freed"] = int(total_bytes[delete_p | repack_p].sum() - kept_bytes[repack_p].sum())
        # what the repack would write: its kept bytes in packs of PACK_TARGET_BYTES (the
        # preview said "repacked into 0" where the real run writes one)
        moved = int(kept_bytes[repack_p].sum())
        report["packs_written"] = -(-moved // PACK_TARGET_BYTES) if moved else 0
        report["duration"] = time.monotonic() - t0
        return report

    for name in orphans:
        _delete(backend, name)

    # repack: kept frames of mostly-unused packs, checked, into new packs
    new_parts = []
    gone = set(np.flatnonzero(delete_p | missing_p).tolist())
    # From the last new pack until the new index names them, a stop request is held: one
    # raised in between left every new pack named by no index (review 4).  Before it, a
    # stop deletes them (_delete_new_packs); after it, the old packs stay for the next
    # prune, every snapshot restorable either way.
    index_hold = ExitStack()
    try:  # (the hold is left on every way out: review 5)
        if repack_p.any():
            writer = PackWriter(backend, PACK_TARGET_BYTES)
            dctx = zstandard.ZstdDecompressor()
            # records grouped by pack once (a scan of all records per repacked pack would be
            # records x packs: 10^11 steps for 160 M records and 1000 packs)
            by_pack, pack_bounds = group_members(inv, len(pack_ids))
            try:
                for pi in np.flatnonzero(repack_p).tolist():
                    in_pack = by_pack[pack_bounds[pi] : pack_bounds[pi + 1]]
                    mine = in_pack[keep[in_pack]]
                    name = fmt.pack_name(pack_hex[pi])
                    end = int((recs["offset"][mine] + recs["clen"][mine]).max())
                    try:
                        data = memoryview(backend.read_range(name, 0, end))
                    except ObjectMissing:  # gone since the listing: nothing to copy, nothing to keep
                        repack_p[pi] = False
                        missing_p[pi] = True
                        gone.add(pi)
                        report["problems"].append(f"pack {pack_hex[pi][:16]}… disappeared during the prune: its "
                                                  f"records were removed from the index (run 'pyvbak verify')")
                        continue
                    except BackendError as exc:  # e.g. truncated: kept as it is, for verify to name
                        repack_p[pi] = False
                        report["blocks_removed"] -= int(np.count_nonzero(~keep[in_pack]))
                        report["problems"].append(f"pack {pack_hex[pi][:16]}… kept as is: it cannot be read ({exc}); "
                                                  f"run 'pyvbak verify --repair'")
                        continue
                    frames = []
                    for k in mine.tolist():
                        off, n = int(recs["offset"][k]), int(recs["clen"][k])
                        frame = data[off : off + n]
                        d, ulen = bytes(recs["digest"][k]), int(recs["ulen"][k])
                        if decode_block(dctx, frame, ulen, d)[1] is not None:
                            frames = None
                            report["problems"].append(f"pack {pack_hex[pi][:16]}… kept as is: block {d.hex()[:16]}… does not match its digest (run 'pyvbak verify --repair')")
                            break
                        frames.append((d, bytes(frame), ulen))
                    if frames is None:
                        repack_p[pi] = False  # keep the whole pack and its records
                        report["blocks_removed"] -= int(np.count_nonzero(~keep[in_pack]))
                        continue
                    for d, frame, ulen in frames:
                        writer.add(d, frame, ulen)
                    gone.add(pi)
                index_hold.enter_context(interrupts.held())
                new_parts.append(writer.finish())
            except OutOfSpace:
                # No room for the repacked copies (a nearly full repository: where freeing
                # space matters most): the repack is given up, its packs already written (new
                # names, no index names them) go, and the packs nothing uses are still deleted
                # below - that needs no room.  Mostly-unused packs stay whole, all indexed.
                writer.abort()
                _delete_new_packs(backend, writer, present_hex)
                repack_p[:] = False
                gone = set(np.flatnonzero(delete_p | missing_p).tolist())
                report["blocks_removed"] = int(np.count_nonzero(delete_p[inv]))
                report["problems"].append("no room left to repack partly used packs: only packs nothing uses were deleted; "
                                          "run 'pyvbak prune' again once there is free space")
            except BaseException:
                writer.abort()
                _delete_new_packs(backend, writer, present_hex, stopping=True)
                raise
            report["packs_written"] = writer.packs_written if new_parts else 0
            report["packs_repacked"] = int(np.count_nonzero(repack_p))

        # The marker goes first: from it on, a backup whose parent is older checks that
        # parent's blocks against the index (a crash after it costs a check, never a miss).
        if missing_p.any():
            lost_packs = [pack_hex[i] for i in np.flatnonzero(missing_p).tolist()]
            report["lost_marker"] = repo.write_lost_marker(lost_packs, int(np.count_nonzero(missing_p[inv])))

        # 4. new index, then old indexes away, then packs away
        drop = np.zeros(len(pack_ids), bool)
        drop[list(gone)] = True
        survivors = recs[~drop[inv]]
        new_records = np.concatenate([survivors, *new_parts]) if new_parts else survivors
        # nothing dropped, moved or deduplicated: the index files stay as they are
        rewrite_index = len(new_records) != listed_records or bool(new_parts)
        if rewrite_index:
            _rewrite_pack_indexes(repo, new_records, index_names)
    finally:
        index_hold.close()
    # Packs are named by their contents, so a pack this prune wrote can carry the name of
    # one it is about to delete (the kept frames of a repacked pack can equal a pack an
    # interrupted earlier prune wrote and a backup then re-adopted): writing it was a no-op
    # and deleting "the old one" would delete the blocks just moved there.
    written_packs = set()
    for part in new_parts:
        if len(part):
            written_packs.update(bytes(p).ljust(32, b"\0").hex()
                                 for p in digest_sets.unique(part["pack"].view("S32")))
    freed = 0
    for pi in sorted(gone):
        if pack_hex[pi] not in written_packs and not missing_p[pi]:
            freed += _delete(backend, fmt.pack_name(pack_hex[pi]))
    # what the repacked frames take again in their new packs (a pack whose name existed
    # before was not written anew)
    for h in written_packs - present_hex:
        try:
            freed -= backend.stat(fmt.pack_name(h))
        except ObjectMissing:
            pass
    report["bytes_freed"] = freed
    repo._digest_index_cache = None
    report["duration"] = time.monotonic() - t0
    return report


def _intact_choice(repo, recs: np.ndarray, cand: np.ndarray, first: np.ndarray, report: dict) -> np.ndarray:
    """The records to keep: ``cand`` (record numbers) is grouped by digest, each group in
    order of preference, ``first`` marks each group's first.  A group of one keeps it as
    it is; a group of several keeps its first copy that reads back intact (decompressed,
    SHA-256 checked) - or all of them when none does (nothing better to keep; verify
    names the block).  Only blocks stored more than once are read."""
    from .reader import ScratchSink, read_blocks, sort_for_reading

    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, len(cand)))
    chosen = cand[starts].copy()
    pending = np.flatnonzero(sizes > 1)
    extra: list[np.ndarray] = []
    skipped = none_intact = 0
    rank = 0
    while len(pending):
        k = cand[starts[pending] + rank]
        order = sort_for_reading(recs[k])
        batch = recs[k[order]]
        bad = np.zeros(len(batch), bool)

        def on_error(j: int, reason: str, bad=bad) -> None:
            bad[j] = True

        read_blocks(repo, batch, ScratchSink(lambda *a: None, on_error, block_size=repo.config.block_size),
                    threads=os.cpu_count() or 1)
        ok = np.empty(len(k), bool)
        ok[order] = ~bad
        chosen[pending[ok]] = k[ok]
        skipped += int(np.count_nonzero(~ok))
        pending = pending[~ok]
        rank += 1
        done = sizes[pending] <= rank
        for g in pending[done].tolist():
            extra.append(cand[starts[g] : starts[g] + sizes[g]])
            none_intact += 1
            skipped -= int(sizes[g])  # all kept after all
        pending = pending[~done]
    if skipped:
        report["problems"].append(f"{skipped} copy(ies) of stored blocks read back damaged or missing and were not "
                                  f"kept where another copy is intact (run 'pyvbak verify --repair')")
    if none_intact:
        report["problems"].append(f"{none_intact} block(s) stored more than once have no intact copy: all copies kept "
                                  f"(run 'pyvbak verify' to see which snapshots lost them)")
    return np.concatenate([chosen, *extra]) if extra else chosen


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
    lines = [ln for ln in lines if not any(ln.startswith(f"adopted unindexed pack {h[:16]}") for h in kept_out)]
    return adopted, lines, problems, kept_out


def _load_pack_indexes(repo) -> tuple[list[str], np.ndarray]:
    """(names, every record) of the pack index objects, read from the repository itself."""
    names = sorted(repo.pack_index_names())
    loaded = [fmt.decode_pack_index(repo.backend.read(n), f"pack index {n}") for n in names]
    return names, (np.concatenate(loaded) if loaded else np.empty(0, fmt.PACK_INDEX_RECORD))


def _rewrite_pack_indexes(repo, records: np.ndarray, old_names: list[str]) -> None:
    """Replace the pack index objects ``old_names`` by ones holding ``records``: the new
    objects first (create-only), then the old ones go (FORMAT.md, prune step 4)."""
    written = set()
    for i in range(0, len(records), INDEX_RECORDS_PER_FILE):
        n = repo.write_pack_index(records[i : i + INDEX_RECORDS_PER_FILE])
        if n:
            written.add(n)
    for name in old_names:
        if name not in written:
            _delete(repo.backend, name)


def _delete(backend, name: str) -> int:
    """Delete ``name``; its size in bytes (0 if it was already gone)."""
    from ..backends import ObjectMissing

    try:
        size = backend.stat(name)
        backend.delete(name)
        return size
    except ObjectMissing:
        return 0


def _delete_new_packs(backend, writer, keep_hex: set[str], *, stopping: bool = False) -> None:
    """Delete the packs ``writer`` finished before it was given up, except those named in
    ``keep_hex`` (a new pack cut under the name of one that was there already is that
    pack): no index names them.  A prune or repair stopped by a signal while repacking
    left complete 16 MiB packs that only the next prune removed (the session-21 soak: 7
    stops in 25).  ``stopping``: on the way out of a failure or a stop, whose report must
    not be replaced by a deletion's error (a pack left is adopted or deleted by the next
    prune)."""
    for part in writer._index_parts:
        for h in sorted({bytes(x).ljust(32, b"\0").hex() for x in digest_sets.unique(part["pack"].view("S32"))} - keep_hex):
            try:
                _delete(backend, fmt.pack_name(h))
            except Exception:
                if not stopping:
                    raise


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
    index_names, recs = _load_pack_indexes(repo)
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
    _rewrite_pack_indexes(repo, recs[~drop], index_names)
    repo._digest_index_cache = None
    report["records_removed"] = int(drop.sum())
    return report


def drop_lost_pack_records(repo) -> dict:
    """``verify --repair`` of a repository whose packs are all gone
    (``Repository.pack_storage_problem``), on the user's word that they are lost: every
    record of a pack the storage does not hold goes, after a ``lost/`` marker naming those
    packs - the records of blocks no snapshot uses too (prune drops those otherwise, and
    prune refuses while no pack is there: the backups would stay refused for good).
    Damaged pack indexes are removed too (their packs are of the same storage), listed in
    ``damaged_indexes_removed``; otherwise the same dict as ``drop_bad_records``.  Caller
    holds the EXCLUSIVE lock."""
    report = {"records_removed": 0, "lost_marker": None, "damaged_indexes_removed": []}
    # a damaged pack index names packs of the same storage: lost with the rest (prune's
    # strict reading stopped here: review 2)
    index_names, loaded = [], []
    for name in sorted(repo.pack_index_names()):
        try:
            loaded.append(fmt.decode_pack_index(repo.backend.read(name), f"pack index {name}"))
            index_names.append(name)
        except (IntegrityError, ObjectMissing):
            report["damaged_indexes_removed"].append(name)
    recs = np.concatenate(loaded) if loaded else np.empty(0, fmt.PACK_INDEX_RECORD)
    present = set(repo.backend.list(fmt.PACKS_FOLDER))
    pack_ids, inv = np.unique(recs["pack"].view("S32"), return_inverse=True)
    pack_hex = [bytes(p).ljust(32, b"\0").hex() for p in pack_ids]
    missing_p = np.array([fmt.pack_name(h) not in present for h in pack_hex], bool)
    drop = missing_p[inv.reshape(-1)]
    if not drop.any() and not report["damaged_indexes_removed"]:
        return report
    # the marker first (FORMAT.md, "Lost packs"): from it on, backups check their parents
    report["lost_marker"] = repo.write_lost_marker([h for h, m in zip(pack_hex, missing_p) if m], int(drop.sum()))
    if drop.any():
        _rewrite_pack_indexes(repo, recs[~drop], index_names)
    for name in report["damaged_indexes_removed"]:
        _delete(repo.backend, name)
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
    repair that could not rebuild it, and neither --repair nor prune did anything about it
    (review 3 of the flagged copies).  A frame that does not read back intact is left
    behind only when no snapshot references its block (``referenced``: sorted S32
    digests, asked for when needed): otherwise the pack stays (its copy is the repair's to
    drop first).  A pack the copy cuts again under its own name (every frame there after
    all) is that rebuild, and is not deleted.  (done lines, lines for packs left).
    Caller holds the EXCLUSIVE lock."""
    done: list[str] = []
    left: list[str] = []
    if not packs:
        return done, left
    index_names, recs = _load_pack_indexes(repo)
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
            _delete_new_packs(repo.backend, writer, named, stopping=True)
        finally:
            index_hold.close()
        raise
    with index_hold:  # (left on every way out: review 5)
        if not moved_from:
            return done, left
        written = {bytes(p).ljust(32, b"\0").hex() for p in np.unique(new_records["pack"].view("S32"))}
        gone = [p for p in moved_from if p not in written]  # (one cut again under its name was rebuilt)
        if gone:  # before the index changes: an interrupted move is finished later
            repo.write_lost_marker([], 0, moved_out=gone, moved_to=sorted(written))
        _rewrite_pack_indexes(repo, np.concatenate([recs[~moving], new_records]), index_names)
    repo._digest_index_cache = None
    for pack_hex in gone:
        _delete(repo.backend, fmt.pack_name(pack_hex))
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
            _, recs = _load_pack_indexes(repo)
        except (IntegrityError, ObjectMissing, BackendError):  # a damaged pack index: not now (review 5)
            return [], set()
        indexed = {bytes(p).ljust(32, b"\0").hex() for p in np.unique(recs["pack"].view("S32"))}
    # a move is done when the packs it wrote are indexed (the index rewrite happened) and
    # the packs it emptied are not (nothing indexed them again since)
    named = set().union(*(o for o, to in moves if to <= indexed))
    out, deleted = [], set()
    for pack_hex in sorted(named - indexed):
        if repo.trailer_names_pack(fmt.pack_name(pack_hex), unreadable=True):
            # a whole pack under that name (put back from a copy, or cut again by a
            # backup), or one that cannot be read to tell: not what the move emptied -
            # adoption indexes it (review 5)
            continue
        if _delete(repo.backend, fmt.pack_name(pack_hex)):
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
    _, recs = _load_pack_indexes(repo)
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
