"""Forget snapshots and prune the data no snapshot references any more.

``forget`` deletes a snapshot's metadata (it disappears at that instant) and then its
block index.  It needs only a shared lock: it deletes nothing another snapshot or a
running backup uses (a backup that took the forgotten snapshot as its parent has already
loaded the parent's index, and the blocks stay until a prune).

``prune`` takes the exclusive lock (no backup, restore or verify runs meanwhile) and:

1. removes temp objects of interrupted writes, and finds block indexes without metadata
   (left by backups killed between their last two writes; deleted once step 3 has
   decided);
2. reads every snapshot's block index: the set of referenced blocks (a snapshot whose
   index cannot be read stops the prune - deleting data it might reference is never
   safe); adopts packs no index names (indexed from their trailers: a killed backup's,
   or ones whose index was lost); reads every pack index; finds the packs an index names
   that storage no longer holds (their records are dropped, under a lost/ marker written
   before the new index); for each referenced block one copy is kept (duplicates come
   from adopted packs of killed backups: the first copy that reads back intact);
3. a pack none of whose blocks is kept is deleted, a pack with at least
   ``repack_unused`` of its bytes unused is *repacked* - its kept frames, each checked
   against its digest, are copied as they are (no recompression) into new packs; the old
   pack of a repair's interrupted move is deleted, and objects under packs/ that are no
   pack are named, never deleted (a dry run stops once this is decided, having written
   and deleted nothing);
4. writes the lost/ marker (if packs are missing), the new pack index (create-only), then
   deletes the old pack index files, then the packs no index names any more.

Crash safety (docs/FORMAT.md "Forget and prune (invariants)"): until step 4 nothing an
index or a snapshot names is deleted - the objects written are new ones (an adoption's
pack index, the repacked packs, the lost/ marker) and only leftovers no reader uses go
(temp objects, block indexes without metadata, the old pack of a repair's interrupted
move, the new packs of a repack given up); in step 4 the old indexes go before any pack,
so no index ever names a deleted pack, and a killed prune leaves at worst unindexed
packs (adopted by the next backup, removed by the next prune) and duplicate index
entries (harmless).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import numpy as np
import zstandard

from .. import interrupts
from ..backends import BackendError, ObjectMissing
from ..errors import IntegrityError, OutOfSpace, PyvbakError
from . import digest_sets
from . import format as fmt
from .packer import PackWriter
from .reader import decode_block, group_members
from .repair import finish_moves, leave_out_damaged_lost_copies
from .repository import PACK_TARGET_BYTES
from .rewrite import delete_new_packs, delete_object, load_pack_indexes, rewrite_pack_indexes
from .snapshots import consistency_groups

#: repack a pack once this share of its frame bytes is unused (restic's default
#: ``--max-unused`` is 5 % of the whole repository; per pack, 20 % keeps repacking - a
#: full read and rewrite of the pack - for packs that are mostly garbage)
REPACK_UNUSED = 0.2


def forget_snapshots(repo, snaps) -> list[str]:
    """Delete each snapshot: metadata first (it is gone at that instant), then its index.
    Caller holds a (shared) repository lock.  Returns the ids."""
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
    ``forget --prune --dry-run``).  The steps of the module docstring, in their order."""
    run = _PruneRun(repo, dry_run, repack_unused, without)
    # 1. leftovers of interrupted writes
    run.remove_temp_objects()
    run.find_orphan_snapshot_indexes()
    # 2. what the snapshots reference, what the packs hold, which copy of each block stays
    run.read_references()
    run.adopt_unindexed_packs()
    run.read_pack_indexes()
    run.find_missing_packs()
    run.choose_copies()
    # 3. which packs go and which are repacked
    run.decide_packs()
    run.finish_interrupted_moves()
    run.name_unreadable_pack_objects()
    if dry_run:
        return run.preview()
    run.delete_orphan_snapshot_indexes()
    # From the last new pack until the new index names them, a stop request is held: one
    # raised in between left every new pack named by no index.  Before it, a
    # stop deletes them (delete_new_packs); after it, the old packs stay for the next
    # prune, every snapshot restorable either way.
    index_hold = ExitStack()
    try:  # (the hold is left on every way out)
        run.repack(index_hold)
        run.write_lost_marker()
        # 4. new index, then old indexes away, then packs away
        run.write_pack_index()
    finally:
        index_hold.close()
    run.delete_packs()
    return run.finish()


class _PruneRun:
    """One prune, step by step (``prune_repository`` calls them in order; each fills its
    keys of ``report``).  The per-record arrays the steps share, one row per pack index
    record: ``recs`` (the records, each listed once), ``inv`` (its pack's number: a row of
    ``pack_ids`` / ``pack_hex``) and ``keep`` (the copies that stay); per pack
    (``pack_ids``): ``missing_p``, ``delete_p``, ``repack_p``, and the set ``gone`` of the
    packs the index stops naming.

    Every attribute is declared in ``__init__``, with the step that sets it."""

    def __init__(self, repo, dry_run: bool, repack_unused: float, without: frozenset[str]):
        self.t0 = time.monotonic()
        self.repo, self.backend = repo, repo.backend
        self.dry_run, self.repack_unused, self.without = dry_run, repack_unused, without
        self.report: dict = {
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
        # -- set by remove_temp_objects
        self.recovered: list[str] = []  # what the exclusive lock's removal of stale locks cleaned up
        # -- set by find_orphan_snapshot_indexes
        self.orphans: list[str] = []  # snapshot block indexes without metadata
        # -- set by read_references
        self.referenced: np.ndarray | None = None  # the digests the snapshots reference (S32, sorted)
        # -- set by adopt_unindexed_packs
        self.kept_out: set[str] = set()  # packs (hex) left unindexed: a lost/ marker dropped their copies
        self.adopted: np.ndarray | None = None  # the adopted records not written (a dry run's; else empty)
        # -- set by read_pack_indexes
        self.index_names: list[str] = []  # the pack index objects
        self.listed_records = 0  # the records they list, a dry run's adopted ones with them
        self.pack_ids: np.ndarray | None = None  # the packs the records name (S32, sorted)
        self.recs: np.ndarray | None = None  # per record (each once): the pack index record
        self.inv: np.ndarray | None = None  # per record: its pack's number (a row of pack_ids)
        self.clen: np.ndarray | None = None  # per record: its frame's length (int64)
        # -- set by find_missing_packs (listed_packs less the moves finish_interrupted_moves finished)
        self.listed_packs: list[str] = []  # the objects under packs/
        self.present_hex: set[str] = set()  # their names (pack ids, hex)
        self.pack_hex: list[str] = []  # per pack (pack_ids): its id in hex
        self.missing_p: np.ndarray | None = None  # per pack: named by an index, not held by the backend
        # -- set by choose_copies
        self.keep: np.ndarray | None = None  # per record: the copy that stays
        # -- set by decide_packs
        self.kept_bytes: np.ndarray | None = None  # per pack: the frame bytes of its kept copies
        self.total_bytes: np.ndarray | None = None  # per pack: all its frame bytes
        self.delete_p: np.ndarray | None = None  # per pack: none of its copies is kept
        self.repack_p: np.ndarray | None = None  # per pack: to repack (the repack may give it up)
        # -- set by finish_interrupted_moves
        self.indexed_hex: set[str] = set()  # the packs (hex) an index names or that were kept out of one
        # -- set by repack
        self.new_parts: list[np.ndarray] = []  # the new packs' records
        self.gone: set[int] = set()  # the packs (numbers) the index stops naming

    # -- 1. leftovers of interrupted writes ---------------------------------------------------

    def remove_temp_objects(self) -> None:
        """Deletes the temp objects of interrupted writes (not in a dry run).  An exclusive
        lock that removed stale locks has cleaned up after their processes already: its
        findings (``recovered``, adoptions included) are reported here too.
        Fills ``temp_objects_removed``."""
        self.recovered = [line for lk in getattr(self.repo, "_locks", []) if lk.held and lk.exclusive
                          for line in lk.recovered]
        if not self.dry_run:
            self.report["temp_objects_removed"] = [line.subject for line in self.recovered
                                                   if line.kind == "temp_removed"]
            self.report["temp_objects_removed"] += self.backend.cleanup_incomplete(older_than_seconds=0)

    def find_orphan_snapshot_indexes(self) -> None:
        """Lists the snapshot block indexes without metadata (backups killed between their
        last two writes); they are deleted once step 3 has decided (not in a dry run).
        Fills ``orphan_snapshot_indexes``."""
        names = list(self.backend.list("snapshots/"))
        metas = {n[: -len(".json")] for n in names if n.endswith(".json")}
        self.orphans = sorted(n for n in names if n.endswith(".index") and n[: -len(".index")] not in metas)
        self.report["orphan_snapshot_indexes"] = self.orphans

    # -- 2. what the snapshots reference, what the packs hold, which copy stays ------------

    def read_references(self) -> None:
        """``referenced``: the digests every snapshot (but those ``without``) references.  A
        snapshot that cannot be read stops the prune before anything else is written or
        deleted.  Fills ``snapshots`` and ``referenced_blocks``."""
        try:
            # Every metadata object read again, not taken from the local cache: a description
            # damaged since it was cached must stop prune as much as one never seen before.
            snaps = [s for s in self.repo.snapshots(strict=True, cached=False) if s.id not in self.without]
            self.report["snapshots"] = len(snaps)
            self.referenced = self.repo.referenced_digests(snaps)
        except PyvbakError as exc:
            # the error keeps its own class (its exit code): storage refusing a read is exit 3,
            # not the "missing or corrupt data" of exit 6 that monitoring reads as damage
            stopped = type(exc) if type(exc).__init__ is PyvbakError.__init__ else IntegrityError
            raise stopped(f"prune stopped, nothing deleted: {exc}") from None
        self.report["referenced_blocks"] = int(len(self.referenced))

    def adopt_unindexed_packs(self) -> None:
        """Packs no index names are adopted (indexed from their own trailers) before anything
        is decided, not deleted as a killed backup's leftovers: their blocks may be what a
        snapshot references (a pack index lost from storage); those no snapshot references
        go in step 3 like any other unreferenced pack.  Writes their pack index; a dry run
        adopts them in memory only (``adopted``: the records not written).
        ``kept_out``: the packs left unindexed because a lost/ marker dropped their copies.
        Fills ``adopted`` and ``problems``."""
        adopted, lines = self.repo.unindexed_pack_records()
        # ... except the copies a lost/ marker dropped because they read back bad: adopting
        # them again would undo 'verify --repair' (backups would deduplicate against them)
        adopted, lines, more, self.kept_out = leave_out_damaged_lost_copies(self.repo, adopted, lines)
        self.report["problems"] += more  # kept_out: packs left unindexed for that reason
        self.report["adopted"] = [line for line in self.recovered if line.kind in ("adopted", "left_alone")] + lines
        if len(adopted) and not self.dry_run:
            self.repo.write_pack_index(adopted)
            self.repo._digest_index_cache = None
            adopted = adopted[:0]
        self.adopted = adopted

    def read_pack_indexes(self) -> None:
        """Reads every pack index (``index_names``, and their records with a dry run's
        adopted ones: ``listed_records``) into ``recs``, each record once (the same record
        listed by two index files counts once), and ``pack_ids`` / ``inv``."""
        self.index_names, recs = load_pack_indexes(self.repo)
        if len(self.adopted):
            recs = np.concatenate([recs, self.adopted])
        self.listed_records = len(recs)
        # Integer keys from here on: sorting and comparing the 32-byte names themselves is
        # what made a prune of 4 M records take 26 s (digest_sets).
        self.pack_ids, inv = digest_sets.unique_inverse(recs["pack"].view("S32"))
        if len(recs):  # the same record listed by two index files counts once
            order = np.lexsort((recs["offset"], inv))
            recs, inv = recs[order], inv[order]
            o = recs["offset"]
            uniq = np.ones(len(recs), bool)
            uniq[1:] = (inv[1:] != inv[:-1]) | (o[1:] != o[:-1])
            recs, inv = recs[uniq], inv[uniq]
            del order, o, uniq
        self.recs, self.inv = recs, inv
        self.clen = recs["clen"].astype(np.int64)

    def find_missing_packs(self) -> None:
        """``missing_p``: the packs an index names but the backend does not hold (lost
        storage, deleted by hand): their records go from the index, so the next backup of a
        disk that has those blocks stores them again instead of deduplicating against
        frames that are gone.  Lists the packs (``listed_packs``, ``present_hex``)."""
        self.listed_packs = self.repo.pack_object_names()
        self.present_hex = {n.rsplit("/", 1)[-1] for n in self.listed_packs}
        present_names = set(self.listed_packs)
        self.pack_hex = [bytes(p).ljust(32, b"\0").hex() for p in self.pack_ids]
        # by full name: readers open packs/HH/ID, so a pack moved to another HH/ is missing too
        self.missing_p = np.array([fmt.pack_name(h) not in present_names for h in self.pack_hex], bool)

    def choose_copies(self) -> None:
        """``keep``: for each referenced block one copy, in the pack with the most referenced
        bytes - or, for a block stored more than once, the first copy in that order that
        reads back intact (those blocks are read).  Fills ``missing_blocks``,
        ``packs_before`` and (``_intact_choice``) ``problems``."""
        recs, inv, clen, referenced = self.recs, self.inv, self.clen, self.referenced
        ref_pos = digest_sets.locate(recs["digest"].view("S32"), referenced)  # digest rank, -1: unreferenced
        ref_pos[self.missing_p[inv]] = -1  # a copy in a missing pack is no copy
        is_ref = ref_pos >= 0
        stored = np.zeros(len(referenced), bool)
        stored[ref_pos[is_ref]] = True
        self.report["missing_blocks"] = int(len(referenced) - np.count_nonzero(stored))
        self.report["packs_before"] = int(len(self.pack_ids))
        ref_bytes = np.bincount(inv, weights=clen * is_ref, minlength=len(self.pack_ids))
        cand = np.flatnonzero(is_ref)
        # per digest the copy in the pack with the most referenced bytes (likeliest to stay)
        cand = cand[np.lexsort((-ref_bytes[inv[cand]], ref_pos[cand]))]
        first = np.ones(len(cand), bool)
        first[1:] = ref_pos[cand][1:] != ref_pos[cand][:-1]
        self.keep = np.zeros(len(recs), bool)
        # a block stored more than once keeps a copy that reads back intact: the preferred
        # copy may be the damaged one, and keeping it while the good one goes loses the block
        self.keep[_intact_choice(self.repo, recs, cand, first, self.report)] = True

    # -- 3. which packs go and which are repacked ----------------------------------------

    def decide_packs(self) -> None:
        """``delete_p``: the packs none of whose copies is kept; ``repack_p``: those with at
        least ``repack_unused`` of their frame bytes unused.  Fills
        ``blocks_removed``, ``packs_missing``, ``packs_deleted``, ``packs_repacked`` and
        ``problems`` (the missing packs)."""
        inv, clen, missing_p = self.inv, self.clen, self.missing_p
        n_packs = len(self.pack_ids)
        self.kept_bytes = np.bincount(inv, weights=clen * self.keep, minlength=n_packs)
        self.total_bytes = np.bincount(inv, weights=clen, minlength=n_packs)
        unused_share = np.where(self.total_bytes > 0, 1 - self.kept_bytes / np.maximum(self.total_bytes, 1), 1.0)
        self.delete_p = delete_p = (self.kept_bytes == 0) & ~missing_p
        # a pack with nothing unused is never repacked, whatever the threshold: the copy would
        # be the same bytes under the same content-derived name
        self.repack_p = (~delete_p & ~missing_p & (unused_share >= self.repack_unused)
                         & (self.kept_bytes < self.total_bytes))
        # Records of packs that stay are all kept in the index, used or not: their frames are
        # still there (a later backup may dedup against them), and the next prune counts
        # their bytes when it decides whether to repack.
        self.report["blocks_removed"] = int(np.count_nonzero(delete_p[inv] | (self.repack_p[inv] & ~self.keep)))
        if missing_p.any():
            self.report["packs_missing"] = int(np.count_nonzero(missing_p))
            lost = int(np.count_nonzero(missing_p[inv]))
            self.report["problems"].append(
                f"{self.report['packs_missing']} pack(s) the index names are missing (e.g. {self.pack_hex[int(np.flatnonzero(missing_p)[0])][:16]}…): "
                f"{'their' if self.dry_run else 'removed their'} {lost} block record(s) from the index, so backups store those "
                f"blocks again; run 'pyvbak verify' to see which snapshots lost blocks")
        self.report["packs_deleted"] = int(np.count_nonzero(delete_p))
        self.report["packs_repacked"] = int(np.count_nonzero(self.repack_p))

    def finish_interrupted_moves(self) -> None:
        """Deletes the old pack of a repair's move interrupted before its delete (one no
        index names; not in a dry run).  Fills ``moves_finished`` (only when there were
        some)."""
        self.indexed_hex = set(self.pack_hex) | self.kept_out  # (packs kept out of the index are named above)
        if not self.dry_run:
            finished, deleted = finish_moves(self.repo, self.indexed_hex)
            if finished:
                self.report["moves_finished"] = finished
            self.listed_packs = [n for n in self.listed_packs if n.rsplit("/", 1)[-1] not in deleted]

    def name_unreadable_pack_objects(self) -> None:
        """Names the objects under packs/ left unindexed now: they could not be adopted (no
        valid trailer), and are not ours to delete.  Fills ``problems``."""
        unreadable = [n for n in self.listed_packs if n.rsplit("/", 1)[-1] not in self.indexed_hex]
        if unreadable:
            self.report["problems"].append(f"{len(unreadable)} object(s) under packs/ are no pack pyvbak can read "
                                           f"(e.g. {unreadable[0]}): left in place")

    def preview(self) -> dict:
        """A dry run's report: what the decisions would free, and the packs the repack
        would write (its kept bytes in packs of PACK_TARGET_BYTES: the preview said
        "repacked into 0" where the real run writes one).  Fills ``bytes_freed``,
        ``packs_written`` and ``duration``."""
        kept_bytes, repack_p, gone_p = self.kept_bytes, self.repack_p, self.delete_p | self.repack_p
        moved = int(kept_bytes[repack_p].sum())
        written = -(-moved // PACK_TARGET_BYTES) if moved else 0
        # trailers too, as the real run counts whole pack objects: frames alone, the preview
        # was 0.1 MB short of what the prune then freed (142.5 against 142.6 MiB, session
        # 27's audit: the deleted packs' trailers less the new ones')
        def trailers(packs: int, records: int) -> int:
            return packs * fmt.pack_trailer_length(0) + records * fmt.PACK_TRAILER_RECORD.itemsize

        gone_trailers = trailers(int(np.count_nonzero(gone_p)), int(np.count_nonzero(gone_p[self.inv])))
        new_trailers = trailers(written, int(np.count_nonzero(self.keep & repack_p[self.inv])))
        self.report["bytes_freed"] = int(self.total_bytes[gone_p].sum() - moved + gone_trailers - new_trailers)
        self.report["packs_written"] = written
        self.report["duration"] = time.monotonic() - self.t0
        return self.report

    def delete_orphan_snapshot_indexes(self) -> None:
        """Deletes the block indexes without metadata step 1 found."""
        for name in self.orphans:
            delete_object(self.backend, name)

    def repack(self, index_hold: ExitStack) -> None:
        """Copies the kept frames of the packs to repack, each checked against its digest,
        as they are into new packs (``new_parts``: their records); ``gone``: the packs the
        index stops naming - deleted, missing and repacked.  A pack that cannot be read or
        holds a damaged frame is kept whole instead, one gone since the listing counts as
        missing.  Out of space, the repack is given up and the new packs it wrote
        deleted.  Enters the hold on stop requests (``index_hold``) before the last new
        pack is finished.  Fills ``packs_written``, ``packs_repacked``, ``blocks_removed``
        and ``problems``."""
        self.new_parts = []
        self.gone = set(np.flatnonzero(self.delete_p | self.missing_p).tolist())
        if not self.repack_p.any():
            return
        writer = PackWriter(self.backend, PACK_TARGET_BYTES)
        dctx = zstandard.ZstdDecompressor()
        # records grouped by pack once (a scan of all records per repacked pack would be
        # records x packs: 10^11 steps for 160 M records and 1000 packs)
        by_pack, pack_bounds = group_members(self.inv, len(self.pack_ids))
        try:
            for pi in np.flatnonzero(self.repack_p).tolist():
                frames = self._checked_frames(pi, by_pack[pack_bounds[pi] : pack_bounds[pi + 1]], dctx)
                if frames is None:
                    continue
                for d, frame, ulen in frames:
                    writer.add(d, frame, ulen)
                self.gone.add(pi)
            index_hold.enter_context(interrupts.held())
            self.new_parts.append(writer.finish())
        except OutOfSpace:
            # No room for the repacked copies (a nearly full repository: where freeing
            # space matters most): the repack is given up, its packs already written (new
            # names, no index names them) go, and the packs nothing uses are still deleted
            # below - that needs no room.  Mostly-unused packs stay whole, all indexed.
            writer.abort()
            delete_new_packs(self.backend, writer, self.present_hex)
            self.repack_p[:] = False
            self.gone = set(np.flatnonzero(self.delete_p | self.missing_p).tolist())
            self.report["blocks_removed"] = int(np.count_nonzero(self.delete_p[self.inv]))
            self.report["problems"].append("no room left to repack partly used packs: only packs nothing uses were deleted; "
                                           "run 'pyvbak prune' again once there is free space")
        except BaseException:
            writer.abort()
            delete_new_packs(self.backend, writer, self.present_hex, stopping=True)
            raise
        self.report["packs_written"] = writer.packs_written if self.new_parts else 0
        self.report["packs_repacked"] = int(np.count_nonzero(self.repack_p))

    def _checked_frames(self, pi: int, in_pack: np.ndarray, dctx) -> list | None:
        """The kept frames of pack ``pi`` (``in_pack``: its record numbers), read and each
        checked against its digest: (digest, frame, ulen) - or None when the pack is not
        repacked after all: gone since the listing (then missing: its records leave the
        index) or unreadable or holding a damaged frame (then kept whole, all its records
        with it).  Fills ``problems`` and corrects ``blocks_removed``."""
        recs, report, pack_hex = self.recs, self.report, self.pack_hex
        mine = in_pack[self.keep[in_pack]]
        name = fmt.pack_name(pack_hex[pi])
        end = int((recs["offset"][mine] + recs["clen"][mine]).max())
        try:
            data = memoryview(self.backend.read_range(name, 0, end))
        except ObjectMissing:  # gone since the listing: nothing to copy, nothing to keep
            self.repack_p[pi] = False
            self.missing_p[pi] = True
            self.gone.add(pi)
            report["problems"].append(f"pack {pack_hex[pi][:16]}… disappeared during the prune: its "
                                      f"records were removed from the index (run 'pyvbak verify')")
            return None
        except BackendError as exc:  # e.g. truncated: kept as it is, for verify to name
            self.repack_p[pi] = False
            report["blocks_removed"] -= int(np.count_nonzero(~self.keep[in_pack]))
            report["problems"].append(f"pack {pack_hex[pi][:16]}… kept as is: it cannot be read ({exc}); "
                                      f"run 'pyvbak verify --repair'")
            return None
        frames = []
        for k in mine.tolist():
            off, n = int(recs["offset"][k]), int(recs["clen"][k])
            frame = data[off : off + n]
            d, ulen = bytes(recs["digest"][k]), int(recs["ulen"][k])
            if decode_block(dctx, frame, ulen, d)[1] is not None:
                report["problems"].append(f"pack {pack_hex[pi][:16]}… kept as is: block {d.hex()[:16]}… does not match its digest (run 'pyvbak verify --repair')")
                self.repack_p[pi] = False  # keep the whole pack and its records
                report["blocks_removed"] -= int(np.count_nonzero(~self.keep[in_pack]))
                return None
            frames.append((d, bytes(frame), ulen))
        return frames

    def write_lost_marker(self) -> None:
        """Writes the lost/ marker of the missing packs (if any).  The marker goes first:
        from it on, a backup whose parent is older checks that parent's blocks against the
        index (a crash after it costs a check, never a miss).  Fills ``lost_marker``."""
        if self.missing_p.any():
            lost_packs = [self.pack_hex[i] for i in np.flatnonzero(self.missing_p).tolist()]
            self.report["lost_marker"] = self.repo.write_lost_marker(lost_packs,
                                                                     int(np.count_nonzero(self.missing_p[self.inv])))

    # -- 4. new index, then old indexes away, then packs away --------------------------------

    def write_pack_index(self) -> None:
        """Writes the new pack index files - every record of every pack not ``gone``, plus
        the new packs' - then deletes the old ones (``rewrite_pack_indexes``); when nothing
        was dropped, moved or deduplicated, the index files stay as they are."""
        drop = np.zeros(len(self.pack_ids), bool)
        drop[list(self.gone)] = True
        survivors = self.recs[~drop[self.inv]]
        new_records = np.concatenate([survivors, *self.new_parts]) if self.new_parts else survivors
        if len(new_records) != self.listed_records or bool(self.new_parts):
            rewrite_pack_indexes(self.repo, new_records, self.index_names)

    def delete_packs(self) -> None:
        """Deletes the ``gone`` packs still there, but for any this prune wrote.  Fills
        ``bytes_freed``: their sizes less what the new packs take."""
        # Packs are named by their contents, so a pack this prune wrote can carry the name of
        # one it is about to delete (the kept frames of a repacked pack can equal a pack an
        # interrupted earlier prune wrote and a backup then re-adopted): writing it was a no-op
        # and deleting "the old one" would delete the blocks just moved there.
        written_packs = set()
        for part in self.new_parts:
            if len(part):
                written_packs.update(bytes(p).ljust(32, b"\0").hex()
                                     for p in digest_sets.unique(part["pack"].view("S32")))
        freed = 0
        for pi in sorted(self.gone):
            if self.pack_hex[pi] not in written_packs and not self.missing_p[pi]:
                freed += delete_object(self.backend, fmt.pack_name(self.pack_hex[pi]))
        # what the repacked frames take again in their new packs (a pack whose name existed
        # before was not written anew)
        for h in written_packs - self.present_hex:
            try:
                freed -= self.backend.stat(fmt.pack_name(h))
            except ObjectMissing:
                pass
        self.report["bytes_freed"] = freed

    def finish(self) -> dict:
        """Drops the repository's digest index (the index changed).  Fills ``duration``."""
        self.repo._digest_index_cache = None
        self.report["duration"] = time.monotonic() - self.t0
        return self.report


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
