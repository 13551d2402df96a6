"""The delta engine: scan -> changed blocks -> SHA-256 -> dedup -> zstd -> packs -> index.

One pass over the disk decides which blocks changed since the parent snapshot (same VM
and disk): either the hypervisor's changed-block tracking names candidate extents, or
the native scanner hashes every block at memory speed and compares with the parent's
fast hashes.  Only changed, non-zero blocks are SHA-256-hashed, looked up in the
repository, compressed and packed.  Unchanged blocks inherit the parent's digests, so
every snapshot index is complete and restores alone.

Pipeline and memory bound: the work is cut into jobs; ``workers`` threads run them
(native scan, native SHA-256 and zstandard release the GIL); workers = ``threads``
(default: all cores) for files, 4 x ``threads`` for network sources whose reads wait on a
server.  A job is either a group of block runs of at most ``CHUNK_BYTES`` in all to read
(every NBD request of the group in flight at once; files by ``preadv``), scan, hash and
compress -- the dirty runs change tracking names are short, and a job per run cost ~0.4 ms
of Python each under the GIL -- or, for files and block devices with a parent, a window
of the disk the native scanner maps and hashes, after which only the window's changed
blocks are read (in such groups) while still in the page cache.  Blocks in holes (sparse
files, NBD unallocated extents) are zero without a read, and stretches of them get no job.
The main thread keeps at most
``2 * workers`` jobs in flight and feeds finished frames to the PackWriter, which holds
one open pack and at most two uploading.  Peak memory is therefore about
``2 * workers * CHUNK_BYTES * 2`` for chunk jobs (data + frames; 128 MiB for an NBD
source on 2 cores; a full read of a file or block device on up to 4 cores takes jobs of
LOCAL_CHUNK_BYTES: 64 MiB on 2 cores, 128 MiB on 4; sources are read into one reused
buffer per worker, so their data is at most ``workers`` jobs' worth), at most ``MAPPED_FRAMES_BUDGET`` (256 MiB) of
frames for window jobs when every block changed, + ``3 * PACK_TARGET_BYTES`` + the
per-block arrays: the snapshot index being built (48 bytes per block: the parent's,
decompressed and taken over when the disk kept its size), the new zero flags and fast
hashes (17 bytes per block; a change-tracking incremental updates the parent's hashes in
place instead) and the parent's zero flags (1 byte per block; its hashes are read in the
index): ~0.9 GiB in all for a 1 TiB disk.  An incremental of a disk with at least
STREAM_PARENT_MIN_BYTES of index holds no index but records for the blocks it changes
(plus both hash arrays where a scan finds data: 34 bytes per written block), the rest
streamed at commit (1 TiB thin: 145-198 MiB peak).  + the repository's
digest index: 80 bytes per stored block merged in memory for small repositories, pages of
the memory-mapped local cache otherwise (repo/digest_index.py).
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import zstandard

from .. import native
from ..allocator import sparse_zeros
from ..errors import IntegrityError, SourceError
from ..repo import format as fmt
from ..repo.packer import PackWriter
from ..repo.repository import PACK_TARGET_BYTES, Repository
from ..repo.snapshots import SnapshotInfo, check_vm_disk_names, new_snapshot_id, snapshot_time

CHUNK_BYTES = 4 * 1024 * 1024
# Mapped-scan windows (bench/RESULTS.md, "Incremental of an image file: scan windows"):
# 32 MiB did as well as or better than 8, 16 and 64 MiB; on a 2 GiB image the windowed
# pipeline equals the former whole-disk scan followed by re-reads within the noise, and
# it keeps the changed blocks cached between scan and read on disks larger than RAM.
# Smaller on many cores, so that the frames of the windows in flight (every block
# changed and incompressible) stay within MAPPED_FRAMES_BUDGET.
SCAN_WINDOW_BYTES = 32 * 1024 * 1024
#: most bytes of short block runs one job reads (then scans, hashes, compresses).  In-process
#: hot incrementals of a 1 GiB disk, 15 MiB changed, 8 alternating rounds: groups of 256 KiB
#: 66 ms, 512 KiB 62, 1 MiB 65, 2 MiB 61, 4 MiB 52; then 4/8/16 MiB 70/70/75 (noise).
GROUP_BYTES = CHUNK_BYTES
MAPPED_FRAMES_BUDGET = 256 * 1024 * 1024
#: jobs of a full read of a local file or block device: 8 MiB while the data and frames
#: of the jobs in flight (``2 * workers * chunk * 2``) stay within LOCAL_CHUNK_BUDGET (up
#: to 4 workers), else CHUNK_BYTES.  In-process full backups of the 2 GiB peers image on
#: 2 cores, a fresh process each, alternating (bench/RESULTS.md, "Full-read job size"):
#: 1 MiB 2.31 s, 2 MiB 1.97, 4 MiB 1.86, 8 MiB 1.80, 16 MiB 1.82 (CPU 3.55 -> 3.46 s
#: from 4 to 8 MiB): half the jobs, half the hand-offs to the thread that packs.  NBD
#: sources keep CHUNK_BYTES: they run 4 workers per core.
LOCAL_CHUNK_BYTES = 8 * 1024 * 1024
LOCAL_CHUNK_BUDGET = 128 * 1024 * 1024
#: an incremental of a disk whose index is at least this large does not hold its parent's
#: index: it keeps the dirty blocks' records (change tracking) or every block's hash and
#: the changed blocks' records (a scan), the rest streamed at commit (see _Parent).  64 MiB
#: of records is a ~85 GiB disk at 64 KiB blocks; a 1 TiB disk's incremental peaked at
#: 198 / 145 MiB instead of 982 / 868 MiB.  Below it the whole index is held: reading it
#: twice cost the 2 GiB bench disk's incremental 4-7 ms more (bench/RESULTS.md,
#: "Fragmented disks of a terabyte").
STREAM_PARENT_MIN_BYTES = 64 * 1024 * 1024
#: a first backup's index is compressed with zeros fed for spans of this many records
#: holding no data block (3 MiB of records: 768 pages)
ZERO_SPAN_RECORDS = 65536


@dataclass
class BackupResult:
    snapshot_id: str
    vm: str
    disk: str
    parent: str | None
    size: int
    block_size: int
    bytes_scanned: int = 0
    bytes_read: int = 0
    changed_blocks: int = 0
    changed_bytes: int = 0
    new_blocks: int = 0
    new_bytes: int = 0
    stored_bytes: int = 0
    packs_written: int = 0
    duration: float = 0.0
    #: seconds per phase (prepare: parent index and change tracking; data: scan, read, hash,
    #: compress, pack writes; commit: pack index, snapshot index and metadata, fsyncs)
    phases: dict = field(default_factory=dict)
    cbt: bool = False
    fallback_reason: str | None = None
    cbt_missed_blocks: list[int] | None = None
    warnings: list[str] = field(default_factory=list)
    cleaned_leftovers: list[str] = field(default_factory=list)
    #: id, time and disks of the run that froze this disk with others at one instant
    consistency_group: dict | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        if out["consistency_group"] is None:  # a single disk: the key is absent
            del out["consistency_group"]
        return out


def compress_blocks(cctx, blocks: list) -> list:
    """One zstd frame per block of ``blocks``, in one call where the binding allows.

    ``multi_compress_to_buffer`` (python-zstandard's C backend) compresses a list into one
    output buffer with the GIL released throughout: no per-block call, output allocation
    and shrink.  The frames are the same bytes ``compress`` gives (tests/test_engine_compress.py).
    """
    if len(blocks) > 1 and hasattr(cctx, "multi_compress_to_buffer"):
        frames = cctx.multi_compress_to_buffer(blocks, threads=1)
        return [memoryview(frames[k]) for k in range(len(frames))]
    return [cctx.compress(b) for b in blocks]


def _run_arrays(indices: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted block indices as runs of contiguous blocks, none longer than
    ``max_blocks``: (firsts, ends) int64 arrays.  Vectorised: a fragmented incremental
    (a database's scattered page writes) has one run per changed block."""
    if not len(indices):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    firsts = indices[np.concatenate([[0], breaks])]
    ends = indices[np.concatenate([breaks - 1, [len(indices) - 1]])] + 1
    return _cut_runs(firsts, ends, max_blocks)


def _mask_run_arrays(mask: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs of True in a boolean per-block array, none longer than ``max_blocks``:
    (firsts, ends), without listing the blocks (a 1 TiB disk has 16.7 M)."""
    edges = _mask_edges(mask)
    return _cut_runs(edges[0::2], edges[1::2], max_blocks)


def _mask_edges(mask: np.ndarray) -> np.ndarray:
    """Where a boolean per-block array switches (int64 positions: the first of each run of
    True, then the one after it, alternating).  In int8, one byte per block: ``np.diff``
    with ``prepend=0`` made int64 copies (8 bytes per block, fresh memory: 0.6 s for a
    1 TiB disk's 16.7 M blocks)."""
    m = mask.view(np.int8)
    step = np.empty(len(m) + 1, np.int8)
    if len(m):
        step[0], step[-1] = m[0], -m[-1]
        np.subtract(m[1:], m[:-1], out=step[1:-1])
    else:
        step[0] = 0
    return np.flatnonzero(step).astype(np.int64)


def _cut_runs(firsts: np.ndarray, ends: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs [first, end) cut into pieces of at most ``max_blocks`` (the last shorter)."""
    pieces = -(-(ends - firsts) // max_blocks)
    if (pieces > 1).any():  # cut long runs into max_blocks pieces (the last one shorter)
        total = int(pieces.sum())
        k = np.arange(total) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        firsts, ends = np.repeat(firsts, pieces) + k * max_blocks, np.repeat(ends, pieces)
        ends = np.minimum(firsts + max_blocks, ends)
    return firsts, ends


def _runs(indices: np.ndarray, max_blocks: int):
    """Split sorted block indices into (first, last_exclusive) runs of contiguous blocks."""
    firsts, ends = _run_arrays(indices, max_blocks)
    return zip(firsts.tolist(), ends.tolist())


def _runs_within(mask: np.ndarray, firsts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per run [first, end): True when ``mask`` holds for every block of it (one
    vectorised pass: a fragmented incremental has thousands of runs)."""
    if not len(firsts):
        return np.zeros(0, dtype=bool)
    padded = np.concatenate([mask.view(np.uint8), [0]])  # reduceat needs ends < len
    bounds = np.empty(2 * len(firsts), np.int64)
    bounds[0::2], bounds[1::2] = firsts, ends
    return np.add.reduceat(padded, bounds, dtype=np.int64)[0::2] == ends - firsts


def _groups(runs, max_blocks: int):
    """Consecutive runs gathered into groups of at most ``max_blocks`` blocks (a run is
    never split here: ``_runs`` already cut them to that size)."""
    group: list[tuple[int, int]] = []
    count = 0
    for a, b in runs:
        if group and count + (b - a) > max_blocks:
            yield group
            group, count = [], 0
        group.append((a, b))
        count += b - a
    if group:
        yield group


class _Parent:
    """The parent snapshot's per-block arrays, in the shapes the native diff wants.

    ``records`` (the parent's index, decompressed into writable memory) is handed on to
    the new snapshot when the disk kept its size: its digests are then already those of
    every unchanged block, and the one n-sized index array is the only one there is.  The
    parent's zero marks are a copy; its fast hashes are read through ``fast``, a strided
    view into the records, window by window: the new snapshot's hashes are written into
    the records only at commit (or, in place, by the change-tracking path, which reads
    each block's old hash before writing its new one).  Each n-sized array costs fresh
    memory (1 TiB disk: 16.7 M blocks, 800 MB of records), which on this project's VMs is
    ~0.8 s per GiB of page faults (bench/RESULTS.md, "Thin disks of a terabyte").  An
    incremental of a large disk does not hold the parent's index (``streamed``): it keeps
    its dirty blocks' records (``only``) or every block's hash (``hashes``), and the rest
    is streamed again at commit."""

    def __init__(self, repo: Repository, snap, only: np.ndarray | None = None, hashes: bool = False):
        """``only`` (sorted block indices: a change-tracking incremental's dirty blocks):
        the records are read in chunks and kept for those blocks alone, in a
        ``sparse_zeros`` array (``streamed``); the zero marks of every block are kept.
        The other records are read again, in chunks, when the new index is written
        (``encode_snapshot_index_patched``): memory O(dirty blocks), not 48 bytes per
        block of the disk (a 1 TiB disk: 800 MB).  ``hashes`` (an incremental that scans
        the whole disk): every block's zero mark and fast hash are kept, and ``records``
        starts empty, for the blocks the backup finds changed (``patched``, set at commit)."""
        self.snap = snap
        self.streamed = (only is not None or hashes) and snap is not None
        #: (block, 16-byte fast hash) of the parent's last non-zero block outside ``only``
        #: (the dirty blocks), or None: what ``_missed_by_bitmap`` reads back
        self.last_clean_data: tuple[int, bytes] | None = None
        #: streamed: the blocks whose records ``records`` holds for the new index (``only``,
        #: or the blocks a scan found changed, set at commit); the rest are the parent's
        self.patched: np.ndarray | None = None
        if snap is None:
            self.n, self.size = 0, 0
            self.zero, self.fast = native.new_arrays(0)
            self.records = np.zeros(0, fmt.SNAPSHOT_RECORD)
            return
        if self.streamed:
            self.size = int(snap.meta["size"])
            self.n = native.block_count(self.size, int(snap.meta["block_size"]))
            self.records = sparse_zeros(self.n, fmt.SNAPSHOT_RECORD)
            self.zero = np.empty(self.n, np.uint8)
            fast = sparse_zeros((self.n, 2), np.uint64) if only is None else None
            base = 0
            for chunk in repo.iter_snapshot_index(snap):
                end = base + len(chunk)
                if end > self.n:
                    raise IntegrityError(f"the index of snapshot {snap.id} has more records than its disk has blocks")
                self.zero[base:end] = chunk["digest"].view("S32") == b""
                if only is None:  # a zero block's hash is never compared: written where data is
                    data = np.flatnonzero(self.zero[base:end] == 0)
                    fast.view("V16").reshape(self.n)[base + data] = chunk["fast"][data]
                else:
                    lo, hi = np.searchsorted(only, [base, end])
                    if hi > lo:
                        picked = only[lo:hi]
                        self.records[picked] = chunk[picked - base]
                    data = np.flatnonzero(self.zero[base:end] == 0) + base
                    if hi > lo and len(data):
                        data = data[~np.isin(data, only[lo:hi], assume_unique=True)]
                    if len(data):
                        self.last_clean_data = (int(data[-1]), bytes(chunk["fast"][data[-1] - base]))
                base = end
            if base != self.n:
                raise IntegrityError(f"the index of snapshot {snap.id} has {base} records for {self.n} blocks")
            self.fast = self.records.view("<u8").reshape(self.n, 6)[:, 4:6] if only is not None else fast
            self.patched = only
            return
        _, self.size, self.records = repo.load_snapshot_index(snap, writable=True)
        self.n = len(self.records)
        self.zero = (self.records["digest"].view("S32") == b"").astype(np.uint8)
        # (n, 2) uint64, strided; native byte order is little-endian on every platform built
        self.fast = self.records.view("<u8").reshape(self.n, 6)[:, 4:6]

    def find_last_clean_data(self, dirty: np.ndarray) -> None:
        """``last_clean_data`` for a parent held whole (the streamed one finds it as it reads)."""
        data = np.flatnonzero(self.zero == 0)
        if len(data) and len(dirty):
            data = data[~np.isin(data, dirty, assume_unique=True)]
        if len(data):
            self.last_clean_data = (int(data[-1]), self.fast[data[-1]].tobytes())

    def take_records(self, n: int) -> np.ndarray:
        """The new snapshot's records for an ``n``-block disk, holding the parent's digest
        for each block both have (zero for the rest); the parent's own if the size is
        unchanged (it must not be used as the parent's after this)."""
        if self.n == n and self.records.flags.writeable:
            records, self.records = self.records, None
            return records
        records = sparse_zeros(n, fmt.SNAPSHOT_RECORD)  # a thin disk's digests land here and there
        m = min(n, self.n)
        records["digest"][:m] = self.records["digest"][:m]
        return records


def run_backup(
    repo: Repository,
    source,
    *,
    vm: str,
    disk: str,
    threads: int | None = None,
    verify_cbt: bool = False,
    progress=None,
    extra_meta: dict | None = None,
    on_commit=None,
) -> BackupResult:
    """Back up ``source`` (an open Source) into ``repo``; returns the result.

    The caller holds the repository lock.  Raises PyvbakError subclasses; on any
    exception nothing visible is written (packs may remain and are adopted later) - but
    for a signal once the snapshot is committed: ``on_commit(result)`` is called as the
    snapshot becomes visible, with no signal heard in between (``interrupts.held``), so
    a caller that must record the commit (a hypervisor session retiring its old dirty
    bitmap) does so before a Ctrl-C is raised.
    """
    check_vm_disk_names(vm, disk)
    native.check_forced_kernels()  # a forced kernel this machine lacks fails every backup, not one with blocks to hash
    run = _BackupRun(repo, source, vm, disk, threads or os.cpu_count() or 1, verify_cbt)
    run.prepare()
    run.read_and_store(progress)
    return run.commit(extra_meta, on_commit)


class _IndexUpdate(enum.Enum):
    """How the new snapshot's index is made from its parent's: the records it starts from,
    and where its fast hashes are written (``_BackupRun._take_index`` decides).

    Whether the parent's index is held whole or streamed (``_Parent.streamed``: then the
    commit streams the parent's records again and patches them) is decided before, when the
    parent is read, from the disk's size; it is not one of these: a change-tracking
    incremental updates IN_PLACE a parent held whole and a streamed one alike."""

    #: a change-tracking incremental of a disk that kept its size: the parent's records
    #: (all, or a streamed parent's dirty blocks' alone) are taken over and each job writes
    #: its blocks' new fast hashes into them, ``fast`` being a view of them: copying 16
    #: bytes per block of the disk out and back instead cost a 1 TiB disk ~1 s
    IN_PLACE = "in place"
    #: a scan with a streamed parent: the records start empty; at commit the blocks found
    #: changed (``_Parent.patched``) get their fast hashes, the rest stay the parent's
    PATCH = "patch"
    #: a scan of a disk that kept its size: the parent's records are taken over, their
    #: digests those of every unchanged block; at commit every block's fast hash is replaced
    TAKEN = "taken"
    #: no parent, or the disk's size changed: zeroed records (the parent's digests copied
    #: for the blocks both have); at commit the data blocks get their fast hashes, a zero
    #: block's is zero already (most of a thin disk)
    FRESH = "fresh"


class _BackupRun:
    """One backup of one disk, in its three phases (``BackupResult.phases``):

    ``prepare``: the parent snapshot, the warnings about the source, whether change
    tracking can be trusted, the new index (the parent's, taken over), the jobs to run and
    the repository's digest index to deduplicate against;
    ``read_and_store``: the pipeline - jobs read, scan, hash and compress on worker threads,
    the main thread packs their frames - then what changed, counted;
    ``commit``: packs are durable; their index, then the snapshot index, metadata last.

    Every attribute is declared in ``__init__``, with the phase that sets it.  The per-block
    arrays the phases share: ``zero`` and ``fast`` (the disk's zero marks and fast hashes as
    the backup finds them; in place, the parent's own hashes), ``records`` (the new index;
    ``digests`` is its digest column) and ``parent`` (``_Parent``)."""

    def __init__(self, repo: Repository, source, vm: str, disk: str, threads: int, verify_cbt: bool):
        self.t0 = time.monotonic()  # when the backup began: its duration and phases count from here
        self.repo, self.source, self.vm, self.disk = repo, source, vm, disk
        self.threads, self.verify_cbt = threads, verify_cbt  # cores to use; --verify-cbt (scan, compare the tracking)
        cfg = repo.config  # the repository's block size, fast-hash key and zstd level:
        self.bs, self.key, self.level = cfg.block_size, cfg.hash_key, cfg.compression_level
        self.size = source.size  # the disk's size in bytes
        self.n = native.block_count(self.size, self.bs)  # its blocks
        self.tail = self.n * self.bs - self.size  # bytes the partial last block lacks (0 when size is a multiple of bs)
        self.chunk_blocks = max(1, CHUNK_BYTES // self.bs)
        self.mappable = hasattr(source, "path") and hasattr(source, "fileno")  # the native scanner can map it
        # -- set by prepare: the parent and the change tracking (_choose_parent, _decide_tracking)
        self.latest: SnapshotInfo | None = None  # the disk's newest snapshot: the parent, if it can be read
        self.damaged: list[str] = []  # snapshot metadata objects left out as corrupt (a warning)
        self.sequence = 0  # this snapshot's sequence number: after every snapshot the repository lists
        self.lost: list[str] = []  # the repository's lost/ markers, every one honoured by this snapshot
        self.ct = None  # the source's change tracking since the newest snapshot (None: the source has none)
        self.parent: _Parent | None = None  # the parent's per-block arrays (``parent.snap`` None: no parent)
        self.unreadable_parent: str | None = None  # why the newest snapshot is not the parent, or None
        # The blocks the change tracking names changed since the newest snapshot (sorted),
        # when it may stand for a scan (it has extents, no --verify-cbt, the disk kept its
        # size), else None.  A change-tracking incremental (``result.cbt``, which implies
        # it) reads these blocks alone; a parent streamed for one holds their records alone
        # (``_Parent(only=dirty)``: then ``parent.patched is dirty``, the blocks the new
        # index changes, the rest streamed from the parent at commit); and the bitmap is
        # checked by reading back the parent's last data block outside them.
        self.dirty: np.ndarray | None = None
        self.result: BackupResult | None = None  # what this backup did: made once the parent (which it names) is known
        # -- set by prepare: the new index and the jobs (_take_index, _plan_jobs)
        self.index_update: _IndexUpdate | None = None  # how the new index is made from the parent's
        self.records: np.ndarray | None = None  # the new index, one SNAPSHOT_RECORD per block
        self.digests: np.ndarray | None = None  # its digest column (a view)
        self.zero: np.ndarray | None = None  # per block: 1 if zero, as this backup finds it (uint8)
        self.fast: np.ndarray | None = None  # per block: the fast hash, (n, 2) uint64; in place, a view of records
        self.m = 0  # blocks the parent also has
        self.jobs: list[tuple[str, list[tuple[int, int]]]] = []  # (kind, block runs) in disk order: see _plan_jobs
        # changed blocks in holes: indices of those the parent had data in, and the runs
        # beyond the parent's end (a full backup of a thin disk: most of the disk)
        self.hole_changed: list[np.ndarray] = []
        self.hole_changed_runs: list[tuple[int, int]] = []
        self.repo_index = None  # the repository's digest index: which blocks are stored already
        self.t_data = 0.0  # when the data phase began (time.monotonic)
        # -- read_and_store and its workers
        self.claimed: set[bytes] = set()  # blocks a job of this backup stores
        self.claim_lock = threading.Lock()  # guards ``claimed``
        self.local = threading.local()  # per worker: its compressor and read buffer
        # whether the source reads into a buffer it is given: a range at a time (a network
        # source), or several ranges at once (files by preadv; NBD requests all in flight)
        self.reads_into = hasattr(source, "read_into") and not hasattr(source, "fileno")
        self.reads_ranges = hasattr(source, "read_ranges_into")
        self.packer: PackWriter | None = None  # packs the new blocks' frames
        self.pack_records: np.ndarray | None = None  # the written packs' index records, indexed at commit
        self.job_changed: np.ndarray | None = None  # the jobs' changed blocks, ascending (holes': hole_changed)

    # -- prepare ---------------------------------------------------------------------------

    def prepare(self) -> None:
        self._choose_parent()
        self.result = BackupResult(new_snapshot_id(), self.vm, self.disk,
                                   self.parent.snap.id if self.parent.snap else None, self.size, self.bs)
        self._note_warnings()
        self._decide_tracking()
        self._take_index()
        self._plan_jobs()
        self.repo_index = self.repo.dedup_index()  # blocks whose every copy is flagged bad are stored again
        self.t_data = time.monotonic()
        self.result.phases["prepare"] = self.t_data - self.t0

    def _choose_parent(self) -> None:
        """The disk's newest snapshot as the parent, unless it cannot be read or names
        lost blocks; the source's change tracking since it, and the blocks it calls dirty."""
        repo, source, n, bs, size = self.repo, self.source, self.n, self.bs, self.size
        self.latest = latest = repo.latest(self.vm, self.disk)
        self.damaged = list(repo.damaged_snapshots)
        # after every snapshot of the repository listed: the newest by this number, whatever
        # the clocks said (snapshots.snapshot_order)
        self.sequence = repo.highest_sequence + 1
        prev_state = latest.tracking_state if latest else None
        self.ct = ct = source.change_tracking(prev_state)
        if (ct is not None and ct.extents is not None and not self.verify_cbt and latest is not None
                and latest.meta.get("size") == size):
            self.dirty = _extent_blocks(ct.extents, n, bs)
        # An incremental of a large disk does not hold its parent's index (see _Parent): a
        # change-tracking one keeps the dirty blocks' records, one that scans (an image
        # file) every block's hash and zero mark, and records for the blocks it finds changed.
        stream_parent = (latest is not None and n * fmt.SNAPSHOT_RECORD.itemsize >= STREAM_PARENT_MIN_BYTES
                         and latest.meta.get("size") == size and latest.meta.get("block_size") == bs)
        self.lost = lost = repo.lost_markers()
        missing = 0
        try:
            # blocks whose every copy is flagged bad (a plain verify's flags; usually none)
            flag_only = getattr(repo.dedup_index(), "excluded", None) if lost else None
            if latest is not None and (not set(lost) <= set(latest.meta.get("lost_checked") or ())
                                       or (flag_only is not None and len(flag_only)
                                           and not latest.meta.get("flags_honoured"))):
                # A prune or repair removed the records of packs gone from storage after this
                # parent was made, or a verify flagged copies: an incremental would carry its
                # records of those blocks on, unread.  A parent made by an older pyvbak lists
                # markers without having honoured their flags: while blocks are flagged-only
                # it is looked at whatever it lists (once per disk: its child honours them).
                missing = repo.lost_blocks_of(latest)
            self.parent = _Parent(repo, latest if not missing else None, only=self.dirty if stream_parent else None,
                                  hashes=stream_parent and self.dirty is None and self.mappable)
            if missing:
                self.unreadable_parent = (f"the previous snapshot {latest.id} names {missing} block(s) lost from the "
                                          f"repository (see {lost[-1]}); they are stored again if the disk still has them")
        except IntegrityError as exc:
            # A damaged latest snapshot must not stop every later backup of the disk: this one
            # is made without it (a full scan; dedup still finds the stored blocks).
            self.parent = _Parent(repo, None)
            self.unreadable_parent = f"the previous snapshot {latest.id} cannot be read ({exc})"

    def _note_warnings(self) -> None:
        """What the user should know about the source and the parent before the data."""
        result, latest, vm, disk = self.result, self.latest, self.vm, self.disk
        started = snapshot_time()
        # what the control plane found about the source itself (a misnamed image read as raw)
        result.warnings.extend(getattr(self.source, "source_warnings", None) or ())
        if self.unreadable_parent:
            result.warnings.append(f"{self.unreadable_parent}; scanned the whole disk")
        if latest is not None and latest.time > started:
            # an NTP step back, a host restored from a VM snapshot, or a clock that once ran
            # ahead: this snapshot still comes after that one (its sequence number), but its
            # time will read as older
            result.warnings.append(f"this machine's clock ({started}) is behind the time of {vm}/{disk}'s newest "
                                   f"snapshot {latest.id} ({latest.time}): this snapshot still comes after it "
                                   f"(snapshots are ordered by sequence number, not time); check the clock")
        before = latest.meta.get("source") if latest is not None else None
        now = getattr(self.source, "description", None)
        if before and now and before != now and before.startswith("file:") and now.startswith("file:"):
            # Two images under one disk name chain into each other (and retention counts them
            # as one disk): right when the image moved, wrong when it is another disk.
            result.warnings.append(f"the previous snapshot {latest.id} of {vm}/{disk} was read from {before[5:]}, this "
                                   f"one from {now[5:]}: if that is another disk, give it its own --disk NAME")
        elif before and now and {before.split(":", 1)[0], now.split(":", 1)[0]} == {"file", "image"}:
            # One image file read both ways (raw bytes, and through qemu-nbd: --format): the
            # container's bytes and the guest's disk would chain and count as one disk.
            kind = lambda d: "the disk the image holds" if d.startswith("image:") else "the image file's raw bytes"  # noqa: E731
            result.warnings.append(f"the previous snapshot {latest.id} of {vm}/{disk} holds {kind(before)} ({before}), "
                                   f"this one {kind(now)} ({now}): give one of them its own --disk NAME, so that "
                                   f"{vm}/{disk}@latest and retention do not mix the two")
        if self.damaged:  # perhaps this disk's newest: then this backup is a full scan, not wrong
            damaged = self.damaged
            result.warnings.append(f"{len(damaged)} snapshot metadata object(s) are corrupt and were left out "
                                   f"({', '.join(damaged[:3])}{', …' if len(damaged) > 3 else ''}): run 'pyvbak verify'")

    def _decide_tracking(self) -> None:
        """Whether the change tracking's dirty blocks are what this backup reads
        (``result.cbt``: then ``dirty``), and if not, why (``result.fallback_reason``).

        The dirty bitmap is checked first, by one block read back (``_missed_by_bitmap``).
        Caught missing a change, it is not used, and a parent streamed for its dirty blocks
        is read again for the full scan this backup becomes."""
        ct, size, result, latest = self.ct, self.size, self.result, self.latest
        missed_by_bitmap = None
        if self.dirty is not None and self.parent.snap is not None and latest.meta.get("block_size") == self.bs:
            if not self.parent.streamed:  # (a streamed parent found its last clean block as it read)
                self.parent.find_last_clean_data(self.dirty)
            missed_by_bitmap = _missed_by_bitmap(self.source, self.parent, self.bs, self.key, size)
            if missed_by_bitmap and self.parent.streamed:
                # the parent was read for an incremental (its dirty blocks' records only): read
                # it again for the full scan this backup becomes
                self.parent = _Parent(self.repo, latest, hashes=self.mappable)
        parent = self.parent
        use_cbt = (ct is not None and ct.extents is not None and parent.snap is not None
                   and parent.size == size and not missed_by_bitmap)
        if ct is not None:
            if ct.extents is None:
                reason = ct.fallback_reason or "change tracking unavailable"
            elif missed_by_bitmap:
                reason = missed_by_bitmap
            elif parent.snap is None:
                reason = self.unreadable_parent or "no previous backup of this disk"
            elif parent.size != size:
                reason = f"disk size changed from {parent.size} to {size} bytes"
            elif self.verify_cbt:
                reason = "--verify-cbt requested a full scan"
            else:
                reason = None
            result.fallback_reason = reason
            # (a disk's first backup in this repository can only read it all: the reason
            # stays in fallback_reason; a warning on every new VM's first night would be noise)
            if reason and latest is not None:
                result.warnings.append(f"change tracking not used: {reason}; scanned the whole disk")
        else:
            result.fallback_reason = getattr(self.source, "why_untracked", None)
            if self.verify_cbt:
                # (an image file is compared block by block on every backup anyway; the user
                # may think some tracking was checked: say there was none)
                result.warnings.append("--verify-cbt: this source has no change tracking to verify")
        result.cbt = bool(use_cbt and not self.verify_cbt)

    def _take_index(self) -> None:
        """The arrays the backup fills: the new index (the parent's, taken over when the
        disk kept its size; ``index_update``), zero marks and fast hashes."""
        parent, n = self.parent, self.n
        self.zero, self.fast = native.new_arrays(n)
        self.m = min(n, parent.n)
        taken = parent.snap is not None and parent.n == n and parent.records.flags.writeable
        if self.result.cbt and taken:
            self.index_update = _IndexUpdate.IN_PLACE
        elif parent.streamed:
            self.index_update = _IndexUpdate.PATCH
        elif taken:
            self.index_update = _IndexUpdate.TAKEN
        else:
            self.index_update = _IndexUpdate.FRESH
        self.records = parent.take_records(n)  # the new index: digests filled in below, fast at commit
        self.digests = self.records["digest"]
        if self.index_update is _IndexUpdate.IN_PLACE:
            self.fast = parent.fast  # the parent's hashes, each until its block's job writes the new one

    def _plan_jobs(self) -> None:
        """``jobs``: (kind, block runs) in disk order, and the blocks in holes settled.

        Three kinds of job, each covering blocks [a, b):
          "stream": read the blocks, scan them, then hash and compress the changed ones
                    (change-tracking candidates; sources that cannot be mapped; no parent,
                    where every non-zero block is new and hashing it while hot saves a pass);
          "mapped": files and block devices with a parent: the native scanner maps a window
                    and hashes its blocks at memory speed, then only the window's changed
                    blocks are read again, still in the page cache -- on a disk larger than
                    RAM a separate whole-disk scan first would have evicted them;
          "read":   read, hash and compress blocks known to have changed (inside "mapped").
        Blocks in holes (sparse files: SEEK_DATA/SEEK_HOLE; NBD: base:allocation) are zero
        without being read.  Whole stretches of them get no job: a job per 4 MiB chunk or
        32 MiB window of holes cost ~150 us of Python, ~5-40 s for a 1 TB thin image."""
        source, n, bs, size, result, parent = self.source, self.n, self.bs, self.size, self.result, self.parent
        # (a change-tracking incremental only needs to know about its dirty extents)
        holes = _zero_extent_blocks(source, n, bs, within=self.ct.extents if result.cbt else None)
        # bytes in holes: zero without being read (a partial last block counts its own bytes)
        hole_bytes = int(np.count_nonzero(holes)) * bs - (self.tail if n and holes[-1] else 0)
        chunk_blocks = self.chunk_blocks
        if result.cbt:
            m = self.m
            self.zero[:m] = parent.zero[:m]
            if self.index_update is not _IndexUpdate.IN_PLACE:
                self.fast[:m] = parent.fast[:m]
            # Dirty runs are short (a 1 % rewrite: ~160 runs of ~3 blocks over 2 GiB): one job
            # per run cost ~0.4 ms of Python each, under the GIL; a job takes up to
            # CHUNK_BYTES of runs, read with all their requests in flight at once.
            candidates = self.dirty
            firsts, ends = _run_arrays(candidates, chunk_blocks)
            in_hole = _runs_within(holes, firsts, ends)  # unallocated: zero, never read
            if in_hole.any():
                self._settle_holes(zip(firsts[in_hole].tolist(), ends[in_hole].tolist()), prefilled=True)
                firsts, ends = firsts[~in_hole], ends[~in_hole]
            runs = list(zip(firsts.tolist(), ends.tolist()))
            self.jobs = [("stream", g) for g in _groups(runs, max(1, GROUP_BYTES // bs))]
            result.bytes_scanned = (int(len(candidates)) * bs
                                    - (self.tail if len(candidates) and candidates[-1] == n - 1 else 0))
        elif self.mappable and parent.snap is not None:
            window_bytes = max(CHUNK_BYTES, min(SCAN_WINDOW_BYTES, MAPPED_FRAMES_BUDGET // (2 * self.threads)))
            window = max(1, window_bytes // bs)
            starts = np.arange(0, n, window)
            all_hole = np.logical_and.reduceat(holes, starts) if n else np.zeros(0, bool)
            if all_hole.any():
                self._settle_holes(((a * window, min(b * window, n)) for a, b in _mask_runs(all_hole)), prefilled=False)
            self.jobs = [("mapped", [(a, min(a + window, n))]) for a in starts[~all_hole].tolist()]
            # The scan reads the whole disk but its holes; the changed blocks read again for
            # SHA-256 and compression are added as they go.
            result.bytes_scanned = result.bytes_read = size - hole_bytes
        else:
            if holes.any():
                self._settle_holes(_mask_runs(holes), prefilled=False)
            # Allocated runs are grouped like dirty ones: a fragmented image (20 000 scattered
            # 64 KiB clusters over 1 TiB) had a job, a hand-off and a round trip per cluster.
            job_bytes = GROUP_BYTES
            if hasattr(source, "fileno") and 4 * self.threads * LOCAL_CHUNK_BYTES <= LOCAL_CHUNK_BUDGET:
                job_bytes = max(GROUP_BYTES, LOCAL_CHUNK_BYTES)
            firsts, ends = _mask_run_arrays(~holes, max(chunk_blocks, job_bytes // bs))
            self.jobs = [("stream", g) for g in _groups(zip(firsts.tolist(), ends.tolist()), max(1, job_bytes // bs))]
            result.bytes_scanned = size - hole_bytes

    def _settle_holes(self, runs, prefilled: bool) -> None:
        """Mark the blocks of ``runs`` ((first, last_exclusive) block runs in holes) zero
        and note the changed ones (the parent had data there, or had no such block).  By
        runs, touching no more memory than it must: on a 1 TiB thin disk (16.7 M blocks)
        boolean masks over the disk, index arrays of every hole block and writes of zeros
        into fresh zeroed arrays took seconds and ~1 GB per backup.  ``prefilled``: the
        fast hashes below the parent's end were copied from the parent (else all zero)."""
        zero, fast, m, parent_zero = self.zero, self.fast, self.m, self.parent.zero
        for a, b in runs:
            zero[a:b] = 1
            if a < m:
                c = min(b, m)
                if prefilled:
                    fast[a:c] = 0
                had_data = np.flatnonzero(parent_zero[a:c] == 0) + a
                if len(had_data):  # the parent's digests there (the rest are zero already)
                    self.digests[had_data] = ZERO_MARK
                    self.hole_changed.append(had_data)
            if b > m:
                self.hole_changed_runs.append((max(a, m), b))

    # -- read_and_store: the pipeline -----------------------------------------------------

    def read_and_store(self, progress) -> None:
        """Run the jobs on worker threads and pack their new blocks; then count what changed."""
        source, bs, result = self.source, self.bs, self.result
        changed_all: list[np.ndarray] = []  # per job, in job order: ascending
        digests = self.digests
        self.packer = packer = PackWriter(self.repo.backend, PACK_TARGET_BYTES)
        total_job_bytes = sum((b - a) * bs for _, ranges in self.jobs for a, b in ranges) or 1
        done_bytes = 0
        try:
            # Reads from a network source (NBD) wait on the server, not on a core: give them
            # more workers so more requests are in flight while others hash and compress.
            workers = self.threads if hasattr(source, "fileno") else 4 * self.threads
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyvbak-worker") as pool:
                inflight: deque = deque()

                def drain_one():
                    nonlocal done_bytes
                    nblocks, changed, out, nread = inflight.popleft().result()
                    result.bytes_read += nread
                    changed_all.append(changed)
                    for data_idx, joined, stored in out:
                        digests[data_idx] = np.frombuffer(joined, "V32")
                        for d, frame, ulen in stored:
                            packer.add(d, frame, ulen)
                            result.new_bytes += ulen
                            result.stored_bytes += len(frame)
                        result.new_blocks += len(stored)
                    done_bytes += nblocks * bs
                    if progress is not None:
                        progress(done_bytes, total_job_bytes)

                for job in self.jobs:
                    inflight.append(pool.submit(self._run_job, *job))
                    if len(inflight) >= 2 * workers:
                        drain_one()
                while inflight:
                    drain_one()
            done_reading = getattr(source, "done_reading", None)
            if done_reading is not None:
                # a hot source's point-in-time view can go now: the guest stops paying for it
                # while the packs below are made durable.  The last pack is handed to the
                # writer thread first, so its write and fsync overlap the view's removal (QMP
                # round trips, ~3-6 ms of QEMU's time per disk) instead of following it.
                packer.flush()
                done_reading()
            self.pack_records = packer.finish()
        except BaseException as exc:
            _index_stored_packs(self.repo, packer.abort(), exc)
            raise
        self._count_changes(changed_all)
        if self.verify_cbt:
            self._check_tracking()
        written = getattr(source, "written_while_read", None)  # a source read as it is, not frozen
        why = written() if written is not None else None
        if why:
            result.warnings.append(why)

    def _run_job(self, kind: str, ranges: list[tuple[int, int]]):
        if kind == "mapped":
            return self._scan_mapped(*ranges[0])
        return self._work(ranges, scan=True)

    def _compressor(self):
        c = getattr(self.local, "cctx", None)
        if c is None:
            c = self.local.cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
        return c

    def _read_ranges(self, ranges: list[tuple[int, int]]):
        """The blocks of ``ranges`` back to back: (memoryview, bytes read)."""
        source, bs, size = self.source, self.bs, self.size
        spans = [(a * bs, min(b * bs, size) - a * bs) for a, b in ranges]
        total = sum(ln for _, ln in spans)
        if self.reads_into or self.reads_ranges:
            # one reused buffer per worker: no copy of each reply into a fresh bytes
            # object (1 GiB over NBD, 4 MiB reads on 2 threads: 0.25-0.33 s of CPU
            # instead of 0.35-0.43 s); nothing of it outlives this job
            buf = getattr(self.local, "read_buffer", None)
            if buf is None or len(buf) < total:
                buf = self.local.read_buffer = memoryview(bytearray(max(total, CHUNK_BYTES)))
            view = buf[:total]
            if self.reads_ranges:
                nread = source.read_ranges_into(spans, view)
            else:
                nread, pos = 0, 0
                for off, ln in spans:
                    nread += source.read_into(off, view[pos:pos + ln])
                    pos += ln
            if nread != total:
                raise SourceError(f"short read from {source.description} at offset {spans[0][0]}: "
                                  f"{nread} of {total} bytes")
            return view, nread
        data = source.read(*spans[0]) if len(spans) == 1 else b"".join(source.read(o, ln) for o, ln in spans)
        return memoryview(data), len(data)

    def _work(self, ranges: list[tuple[int, int]], scan: bool):
        """Read the blocks of ``ranges`` (block runs in ascending order), scan them, then
        hash and compress the changed non-zero ones; (blocks covered, changed indices,
        frames out, bytes read).  ``scan``: changed means changed since the parent; else
        every block of ``ranges`` is changed (a mapped window's scan found them so), and
        this read's zero flags and fast hashes replace that scan's.  A block written
        between the two reads was stored as the second saw it under the fast hash of the
        first: once the disk held the first again, every later backup took the block for
        unchanged and restored the second (session 26's audit).  Data, digest and fast
        hash now come from one read."""
        bs, key, zero, fast, parent = self.bs, self.key, self.zero, self.fast, self.parent
        mv, nread = self._read_ranges(ranges)
        # contiguous: the arrays' own slices, no gathering (in place, the gathered path copies
        # the parent's hashes before the scan overwrites them)
        if len(ranges) == 1 and self.index_update is not _IndexUpdate.IN_PLACE:
            a, b = ranges[0]
            count = b - a
            native.scan_buffer(mv, bs, key, zero[a:b], fast[a:b])
            if scan:
                changed = _changed(parent, zero, fast, a, b, bs)
            else:
                changed = np.arange(a, b, dtype=np.int64)
            local_changed = changed - a
        else:
            starts, lengths = np.array(ranges, dtype=np.int64).T
            lengths = lengths - starts
            count = int(lengths.sum())
            # every block of every run, in order, without an arange per run
            idx = np.arange(count, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            z, f = native.new_arrays(count)
            native.scan_buffer(mv, bs, key, z, f)
            if scan:
                k = int(np.searchsorted(idx, parent.n))  # blocks the parent also has
                # a gathered copy, taken before the writes below (in place, ``fast`` is the
                # parent's hashes until this job writes them)
                old_fast = parent.fast[idx[:k]]
                local_changed = native.changed_blocks(parent.zero[idx[:k]], old_fast, k * bs,
                                                      z, f, count * bs, bs)
            else:
                local_changed = np.arange(count, dtype=np.int64)
            zero[idx], fast[idx] = z, f
            changed = idx[local_changed]
        nonzero = zero[changed] == 0
        data_local = local_changed[nonzero]
        if not len(data_local):
            return count, changed, [], nread
        data_idx = changed[nonzero]
        # One native call per job (16 blocks at a time in AVX-512 lanes, or SHA-NI pairs) and one vectorised
        # lookup, instead of a call per block under the GIL.  Blocks lie back to back
        # in ``mv``; only the disk's last block may be short, and it comes last.
        offsets = data_local * bs
        lengths = np.minimum(nread - offsets, bs)
        joined = native.sha256_blocks(mv, offsets, lengths)
        names = [joined[k : k + 32] for k in range(0, len(joined), 32)]
        known = self.repo_index.locate(np.frombuffer(joined, "S32")) >= 0
        new = []  # (position among the job's data blocks) of blocks this job stores
        if not known.all():
            with self.claim_lock:
                for k in np.flatnonzero(~known).tolist():
                    if names[k] not in self.claimed:
                        self.claimed.add(names[k])
                        new.append(k)
        offs, lens = offsets.tolist(), lengths.tolist()
        frames = compress_blocks(self._compressor(), [mv[offs[k] : offs[k] + lens[k]] for k in new])
        stored = [(names[k], frame, lens[k]) for k, frame in zip(new, frames)]
        return count, changed, [(data_idx, joined, stored)], nread

    def _scan_mapped(self, a: int, b: int):
        bs, size, zero = self.bs, self.size, self.zero
        native.scan_fd_range(self.source.fileno(), a * bs, min(b * bs, size) - a * bs, bs, self.key,
                             zero[a:b], self.fast[a:b], name=self.source.path, size=size)
        changed = _changed(self.parent, zero, self.fast, a, b, bs)
        out, nread = [], 0
        # the window's changed blocks, re-read while in the page cache, as few jobs' worth
        # of work as fit CHUNK_BYTES (one hashing call and one lookup per group)
        for group in _groups(_runs(changed[zero[changed] == 0], self.chunk_blocks), max(1, GROUP_BYTES // bs)):
            _, _, part, nr = self._work(group, scan=False)
            out.extend(part)
            nread += nr
        return b - a, changed, out, nread

    def _count_changes(self, changed_all: list[np.ndarray]) -> None:
        """The jobs' changed zero blocks get the zero marker; the result's change counts."""
        n, result = self.n, self.result
        # Hole blocks were settled by runs (_settle_holes); the jobs' zero blocks get the zero
        # marker here.  The two sets are disjoint: the count is their sum.
        self.job_changed = job_changed = np.concatenate(changed_all) if changed_all else np.empty(0, np.int64)
        self.digests[job_changed[self.zero[job_changed] == 1]] = ZERO_MARK
        hole_changed, hole_changed_runs = self.hole_changed, self.hole_changed_runs
        result.changed_blocks = (len(job_changed) + sum(len(h) for h in hole_changed)
                                 + sum(b - a for a, b in hole_changed_runs))
        last_changed = n > 0 and ((len(job_changed) > 0 and int(job_changed[-1]) == n - 1)
                                  or any(len(h) and int(h.max()) == n - 1 for h in hole_changed)
                                  or any(b == n for _, b in hole_changed_runs))
        result.changed_bytes = result.changed_blocks * self.bs - (self.tail if last_changed else 0)
        result.packs_written = self.packer.packs_written

    def _check_tracking(self) -> None:
        """--verify-cbt: the changed blocks the full scan found that the bitmap did not name."""
        ct, parent, n, result = self.ct, self.parent, self.n, self.result
        if ct is None or ct.extents is None or parent.snap is None or parent.size != self.size:
            return
        marks = _extent_mask(ct.extents, n, self.bs)
        changed_idx = np.sort(np.concatenate([self.job_changed, *self.hole_changed,
                                              *(np.arange(a, b, dtype=np.int64) for a, b in self.hole_changed_runs)]),
                              kind="stable")
        missed = changed_idx[~marks[changed_idx]] if len(changed_idx) else changed_idx
        result.cbt_missed_blocks = [int(x) for x in missed[:1000]]
        if len(missed):
            result.warnings.append(f"change tracking missed {len(missed)} changed blocks (found by the full scan)")

    # -- commit: packs are durable; index them, then the snapshot, metadata last ---------

    def commit(self, extra_meta: dict | None, on_commit) -> BackupResult:
        repo, result, records, parent, n = self.repo, self.result, self.records, self.parent, self.n
        t_commit = time.monotonic()
        result.phases["data"] = t_commit - self.t_data
        try:
            written_index = repo.write_pack_index(self.pack_records)
        except BaseException as exc:  # Ctrl-C or SIGTERM in the write: once more, as for a failed data phase
            _index_stored_packs(repo, self.pack_records, exc)
            raise
        update, known_zero = self.index_update, None
        if update is not _IndexUpdate.IN_PLACE:  # (in place, the jobs wrote them)
            new_fast = np.ascontiguousarray(self.fast).view("V16").reshape(n)
            if update is _IndexUpdate.PATCH:  # records for the changed blocks alone: the rest are the parent's
                parent.patched = np.unique(np.concatenate([self.job_changed, *self.hole_changed]))
                records["fast"][parent.patched] = new_fast[parent.patched]
            elif update is _IndexUpdate.TAKEN:  # the parent's hashes are there: every block's is replaced
                records["fast"] = new_fast
            else:  # FRESH
                nonzero_blocks = np.flatnonzero(self.zero == 0)
                records["fast"][nonzero_blocks] = new_fast[nonzero_blocks]
                if parent.snap is None:
                    # A first backup wrote records for data blocks only (zero blocks' records
                    # are zero): spans of the index holding none are fed to the compressor as
                    # zeros, never read (never-written memory: a read faults in its pages, 4 KiB
                    # at a time).
                    span = ZERO_SPAN_RECORDS
                    has_data = np.zeros(-(-n // span), dtype=bool)
                    has_data[nonzero_blocks // span] = True
                    edges = _mask_edges(~has_data) * span
                    known_zero = list(zip(edges[0::2].tolist(), np.minimum(edges[1::2], n).tolist()))
        result.duration = time.monotonic() - self.t0
        meta = self._snapshot_meta(written_index)
        if extra_meta:
            meta.update(extra_meta)
        committed = (lambda: on_commit(result)) if on_commit is not None else None
        if parent.streamed:
            # records hold those of parent.patched alone (the dirty blocks, updated in place,
            # or the changed ones): the others are the parent's, read again in chunks and
            # patched on the way to the compressor
            repo.commit_snapshot(result.snapshot_id, meta, records, base=(parent.snap, parent.patched), on_commit=committed)
        else:
            repo.commit_snapshot(result.snapshot_id, meta, records, known_zero=known_zero, on_commit=committed)
        t_end = time.monotonic()
        result.phases["commit"] = t_end - t_commit
        result.duration = t_end - self.t0
        return result

    def _snapshot_meta(self, written_index: str | None) -> dict:
        result, ct = self.result, self.ct
        meta = {
            "vm": self.vm,
            "disk": self.disk,
            "source": self.source.description,
            "size": self.size,
            "block_size": self.bs,
            "time": snapshot_time(),
            "sequence": self.sequence,
            "parent": result.parent,
            "change_tracking": {
                "used": result.cbt,
                "state": ct.state if ct is not None else {},
                "fallback_reason": result.fallback_reason,
            },
            "stats": {
                k: getattr(result, k)
                for k in ("bytes_scanned", "bytes_read", "changed_blocks", "changed_bytes", "new_blocks", "new_bytes", "stored_bytes", "duration")
            },
            "warnings": result.warnings,
        }
        if written_index:  # (the next backup of the disk checks it is still there: FORMAT.md)
            meta["pack_index"] = written_index
        if self.lost:  # every block this snapshot names is in the index (checked, or stored anew)
            meta["lost_checked"] = self.lost
            # ... and none is flagged-only by those markers (an older pyvbak's snapshot lists
            # them without this: its parent check ignored their flags)
            meta["flags_honoured"] = True
        return meta


def _index_stored_packs(repo, records: np.ndarray, exc: BaseException) -> None:
    """A failed backup indexes the packs it stored whole before the failure, so that they
    are not dead weight until a prune: its retry (out of space, a source that went away,
    Ctrl-C) finds their blocks stored and writes only the rest.  Indexing is what leftover
    recovery does after a crash, and always safe for a pack stored whole - but only under
    this run's lock: a lock taken away (``unlock --all``) may mean a prune is deleting
    unindexed packs right now.  Best effort: if this fails too (still no room, a second
    Ctrl-C), the packs stay unindexed, for a later recovery or prune.  ``exc.kept_packs``
    tells the caller what was kept: (packs, bytes)."""
    if not len(records):
        return
    try:
        for lock in repo._locks:
            if lock.held:
                lock.check_held()
        repo.write_pack_index(records)
    except BaseException:  # noqa: BLE001 - the backup's own failure is what gets reported
        return
    packs = len(np.unique(records["pack"].view("S32")))
    try:
        exc.kept_packs = (packs, int(records["clen"].astype(np.int64).sum()))
    except AttributeError:
        pass  # an exception type that takes no attributes: nothing to say, nothing lost


def _missed_by_bitmap(source, parent: _Parent, bs: int, key, size: int) -> str | None:
    """Whether the dirty bitmap is caught missing a change, by reading back one block it
    calls clean: the parent's last non-zero block outside the dirty set
    (``parent.last_clean_data``), which must still hash the same.  A reason, or None.

    QEMU keeps no history of resizes: a disk shrunk and grown back to its old size
    between two backups has the same size, and its bitmap was cut at the shrink and grown
    with clean bits - every check on the bitmap itself passes while the disk's tail now
    reads as zeros.  Every block of the parent's from the shrink point on is then either
    zero or dirty (written after the grow), so the last non-zero block not marked dirty
    lies past the shrink point exactly when the shrink cut data the bitmap does not show:
    one block read (~0.1 ms) finds every such case.  It also catches a bitmap cleared by
    hand when that block changed since."""
    if parent.last_clean_data is None:
        return None
    block, fast = parent.last_clean_data
    offset = block * bs
    length = min(bs, size - offset)
    if length <= 0:
        return None
    data = source.read(offset, length)
    if len(data) == length and native.hash_block(data, key) == fast:
        return None
    return (f"the dirty bitmap calls block {block} (offset {offset}) unchanged since the previous backup, "
            f"but it changed (was the disk shrunk and grown back, or the bitmap cleared?)")


def _changed(parent: _Parent, zero, fast, a: int, b: int, bs: int) -> np.ndarray:
    """Indices of the blocks in [a, b) that changed since the parent: the native
    changed-block kernel on the window's slices (past the parent's end, zero flag changed,
    or both non-zero with different hashes; a grown disk's old partial tail block hashes
    differently because the hash covers the length)."""
    m = max(0, min(b, parent.n) - a)
    return a + native.changed_blocks(parent.zero[a : a + m], np.ascontiguousarray(parent.fast[a : a + m]), m * bs,
                                     zero[a:b], fast[a:b], (b - a) * bs, bs)


ZERO_MARK = np.frombuffer(fmt.ZERO_DIGEST, "V32")[0]


def _extent_mask(extents, n: int, bs: int) -> np.ndarray:
    """Per block: whether one of the (offset, length) byte extents touches it."""
    marks = np.zeros(n, dtype=bool)
    for off, length in extents:
        if length > 0:
            marks[off // bs : -(-(off + length) // bs)] = True
    return marks


def _extent_blocks(extents, n: int, bs: int) -> np.ndarray:
    """The sorted indices of the blocks (offset, length) byte extents touch."""
    return np.flatnonzero(_extent_mask(extents, n, bs))


def _mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The (first, last_exclusive) runs of True in a boolean array."""
    edges = _mask_edges(mask)
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _zero_extent_blocks(source, n: int, bs: int, within=None) -> np.ndarray:
    """Per block: True when the whole block lies in a zero (unallocated) extent.

    Sources that can give their zero extents as an array (``zero_ranges()``: NBD's
    base:allocation map) are asked for that, and the blocks are marked without a Python
    step per extent: a fragmented disk's map has 10^5-10^6 extents.  ``within``: the
    (offset, length) extents the caller will read (a change-tracking incremental's dirty
    ones); such a source is asked about those alone, and blocks elsewhere may be marked
    not zero."""
    try:
        if hasattr(source, "zero_ranges"):
            zr = source.zero_ranges() if within is None else source.zero_ranges(within=within)
            ranges = np.asarray(zr, dtype=np.int64).reshape(-1, 2)
        else:
            ranges = np.array([(e.offset, e.length) for e in source.extents() if e.zero], np.int64).reshape(-1, 2)
    except MemoryError:
        raise
    except Exception:  # an allocation map is an optimisation; read everything instead
        return np.zeros(n, dtype=bool)
    ends = ranges[:, 0] + ranges[:, 1]
    first = -(-ranges[:, 0] // bs)  # whole blocks only; the disk's short last block too
    last = np.where(ends >= source.size, n, ends // bs)
    keep = last > first
    first, last = first[keep], last[keep]
    if not len(first):
        return np.zeros(n, dtype=bool)
    # the extents are disjoint and ascending: the disk is gap, run, gap, run, ..., gap
    counts = np.empty(2 * len(first) + 1, np.int64)
    counts[0:-1:2] = first - np.concatenate([[0], last[:-1]])
    counts[1::2] = last - first
    counts[-1] = n - last[-1]
    if (counts < 0).any():  # not disjoint and ascending, as the Source contract says
        covered = np.zeros(n, dtype=bool)
        for a, b in zip(first.tolist(), last.tolist()):
            covered[a:b] = True
        return covered
    return np.repeat(np.tile(np.array([False, True]), len(first) + 1)[:len(counts)], counts)
