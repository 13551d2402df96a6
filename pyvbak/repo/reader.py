"""Reading stored blocks back: coalesced pack range reads, decompression, digest checks.

Shared by restore and verify.  Blocks are read pack by pack in offset order; frames
closer than ``GAP_BYTES`` are fetched with one range read of at most ``RANGE_BYTES``
(fewer requests to object stores, sequential reads on disks).  Every block is
decompressed and its SHA-256 compared with its name before anyone sees it.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
import zstandard

from .. import native
from ..backends import AccessDenied, ObjectMissing, RangeBeyondEnd
from . import digest_sets
from . import format as fmt

GAP_BYTES = 256 * 1024
RANGE_BYTES = 16 * 1024 * 1024
#: ranges (of up to RANGE_BYTES) the backend is asked to prefetch beyond those queued
PREFETCH_GROUPS = 2
class ReadFailure(str):
    """The failure reason of a block copy that could not be read at all (an I/O error, a
    timeout, a store that is down) - unlike one that is missing, cut short or damaged, it
    says nothing about the stored data, and may pass: ``verify --repair`` keeps such
    copies' records unless told to drop them (``--drop-unreadable``)."""


#: after a failed range read its frames are read one by one; this many failing in a row
#: end that (the rest are reported unread): a bad sector spoils a frame or two, a pack cut
#: short or a store that is down fails them all
FRAME_RETRY_GIVE_UP = 8
#: read buffers grow in steps of this much (a group is at most RANGE_BYTES, or one frame)
_BUF_STEP = 1024 * 1024


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DICT_ID_BYTES = (0, 1, 2, 4)
_FCS_BYTES = (0, 2, 4, 8)


def raw_frame_content(frame: memoryview, ulen: int) -> memoryview | None:
    """The content of a zstd frame that holds it in one Raw_Block (RFC 8878, 3.1.1),
    as a view into ``frame`` - or None for any other frame (decompress those).

    zstd stores incompressible blocks (~half the bench image) raw; taking the bytes in
    place skips a 64 KiB allocation, a copy and the frame's XXH64 for each - the
    caller's SHA-256 check covers them.  Only a frame of exactly header + one last raw
    block of ``ulen`` bytes + optional checksum qualifies.
    """
    if len(frame) < ulen + 8 or frame[:4] != _ZSTD_MAGIC:
        return None
    fhd = frame[4]
    if fhd & 0x08:  # reserved bit: not a frame this reader knows; let zstd judge it
        return None
    single_segment = (fhd >> 5) & 1
    fcs = _FCS_BYTES[fhd >> 6] or single_segment  # flag 0: 1 byte if single segment
    pos = 5 + (0 if single_segment else 1) + _DICT_ID_BYTES[fhd & 3] + fcs
    if pos + 3 > len(frame):
        return None
    bh = frame[pos] | (frame[pos + 1] << 8) | (frame[pos + 2] << 16)
    last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
    end = pos + 3 + bsize
    if not last or btype != 0 or bsize != ulen or end + (4 if fhd & 0x04 else 0) != len(frame):
        return None
    return frame[pos + 3 : end]


#: what a bad block's status means, for the messages of restore and verify
PROBLEMS = {native.DECODE_CORRUPT: "has a corrupt frame", native.DECODE_MISMATCH: "does not match its digest"}


def _frame_status(dctx, frame: memoryview, ulen: int):
    """(content, DECODE_OK) or (None, a bad status): the reference decision for one frame,
    which csrc/decode.c makes identically (tests/test_decode.py)."""
    data = raw_frame_content(frame, ulen)
    if data is not None:
        return data, native.DECODE_OK
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return None, native.DECODE_CORRUPT
    if declared < 0:  # -1: the header does not say (pyvbak's frames always do)
        return None, native.DECODE_CORRUPT
    if declared != ulen:
        return None, native.DECODE_MISMATCH
    try:
        data = dctx.decompress(frame)
    except zstandard.ZstdError:
        return None, native.DECODE_CORRUPT
    return (data, native.DECODE_OK) if len(data) == ulen else (None, native.DECODE_MISMATCH)


def decode_block(dctx, frame: memoryview, ulen: int, digest: bytes):
    """``(data, None)`` when ``frame`` holds the ``ulen``-byte block named ``digest``, else
    ``(None, reason)``.  ``data`` may be a view into ``frame`` (raw frames are not copied)."""
    return decode_blocks(dctx, [frame], [ulen], [digest])[0]


def decode_blocks(dctx, frames: list, ulens: list, digests: list) -> list:
    """``decode_block`` for several frames: one ``(data, problem)`` per frame, in order.

    The SHA-256 checks run as one native call (two blocks at a time, native.sha256_many),
    so callers pass a handful of frames - a few hundred KiB decompressed, still in cache.
    """
    out: list = []
    check: list[int] = []
    for i, (frame, ulen) in enumerate(zip(frames, ulens)):
        data, status = _frame_status(dctx, frame, ulen)
        if data is None:
            out.append((None, PROBLEMS[status]))
            continue
        out.append((data, None))
        check.append(i)
    for i, got in zip(check, native.sha256_many([out[i][0] for i in check])):
        if got != digests[i]:
            out[i] = (None, PROBLEMS[native.DECODE_MISMATCH])
    return out


class BlockDecoder:
    """Decodes and checks stored blocks into a caller's buffer; one per thread.

    Kernel "native" (csrc/decode.c: libzstd + the SHA-256 kernel, one call per batch
    without the GIL) when it runs here, else "python", the reference (python-zstandard +
    ``native.sha256_many`` + a copy); $PYVBAK_DECODE forces one.  Both give the same
    statuses and bytes (tests/test_decode.py)."""

    def __init__(self, kernel: str | None = None):
        self.kernel = native.selected_decode_kernel(kernel)
        self._ctx = native.new_decode_context() if self.kernel == "native" else zstandard.ZstdDecompressor()
        # (without SHA extensions the kernel checks blocks in the AVX-512 lanes, and a
        # short batch - one pack's few blocks of a fragmented snapshot - goes the
        # reference way, its SHA-256 through hashlib: native.decode_min_batch)
        self._min_native = native.decode_min_batch() if self.kernel == "native" else 0
        self._reference_ctx = None

    def decode_into(self, src, src_offsets: np.ndarray, src_lengths: np.ndarray, dst, dst_offsets: np.ndarray,
                    ulens: np.ndarray, digests: np.ndarray) -> np.ndarray:
        """Block i: the frame ``src[src_offsets[i] : +src_lengths[i]]`` decoded into
        ``dst[dst_offsets[i] : +ulens[i]]`` and checked against ``digests[i]`` (an ``S32``
        or ``V32`` array); returns a uint8 ``native.DECODE_*`` status per block.  A bad
        block's destination bytes are undefined."""
        digests = np.ascontiguousarray(digests)
        n = len(src_offsets)
        if self.kernel == "native" and n >= self._min_native:
            return native.decode_blocks_into(self._ctx, src, src_offsets, src_lengths, dst, dst_offsets, ulens, digests)
        ctx = self._ctx
        if self.kernel == "native":
            ctx = self._reference_ctx = self._reference_ctx or zstandard.ZstdDecompressor()
        status = np.empty(n, np.uint8)
        src, dst = memoryview(src).cast("B"), memoryview(dst).cast("B")
        so, sl, do, ul = (a.tolist() for a in (src_offsets, src_lengths, dst_offsets, ulens))
        good: list[int] = []
        for i in range(n):
            data, status[i] = _frame_status(ctx, src[so[i] : so[i] + sl[i]], ul[i])
            if data is not None:
                dst[do[i] : do[i] + ul[i]] = data
                good.append(i)
        sums = native.sha256_many(dst[do[i] : do[i] + ul[i]] for i in good)
        want = digests.tobytes()  # not bytes(digests[i]): an S32 scalar drops trailing zero bytes
        for i, got in zip(good, sums):
            if got != want[32 * i : 32 * i + 32]:
                status[i] = native.DECODE_MISMATCH
        return status


def max_frame_bytes(block_size: int) -> int:
    """More than any zstd frame of a ``block_size`` block can take (ZSTD_compressBound is
    block + 1/256 + a few hundred bytes): a pack index record claiming a longer frame is
    damaged, and is not read."""
    return block_size + block_size // 64 + 64 * 1024


def _groups(recs: np.ndarray, max_clen: int | None = None):
    """Yield (pack_hex, start, end, k0, k1): records k0..k1-1 (``recs`` sorted by pack,
    then offset) are read with one range read [start, end) of that pack.  A record whose
    ``clen`` exceeds ``max_clen`` is a group of its own."""
    n = len(recs)
    if not n:
        return
    packs = recs["pack"]
    edges = [0, *(np.flatnonzero(packs[1:] != packs[:-1]) + 1).tolist(), n]
    for a, b in zip(edges[:-1], edges[1:]):
        # Plain lists per pack (a few hundred records): numpy scalar indexing per record
        # holds the GIL the workers need; lists of the whole snapshot cost ~100 bytes per
        # block (gigabytes for a multi-TB disk).
        offs = recs["offset"][a:b].tolist()
        clens = recs["clen"][a:b].tolist()
        pack_hex = bytes(packs[a]).hex()
        k, m = 0, b - a
        while k < m:
            start = offs[k]
            end = start + clens[k]
            k0 = k
            k += 1
            alone = max_clen is not None and clens[k0] > max_clen
            while k < m and not alone:
                off = offs[k]
                if off - end > GAP_BYTES or off + clens[k] - start > RANGE_BYTES or (max_clen is not None and clens[k] > max_clen):
                    break
                end = max(end, off + clens[k])
                k += 1
            yield pack_hex, start, end, a + k0, a + k


def group_members(group_of: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, bounds)``: the members of group g (``group_of[i] == g``, 0 <= g < groups)
    are ``order[bounds[g] : bounds[g + 1]]``, in index order."""
    order = np.argsort(group_of, kind="stable")
    return order, np.searchsorted(group_of[order], np.arange(groups + 1))


def sort_for_reading(recs: np.ndarray, disk_pos: np.ndarray | None = None) -> np.ndarray:
    """Order for _groups: pack by pack, each pack's frames by offset.

    With ``disk_pos`` (per record, the first disk block it restores) the packs come in the
    order of the disk regions they fill, so a restore writes its target front to back -
    sequential writes for a disk or block device (cold 2 GiB restore on this project's VM,
    9 alternating pairs: median 1.74 s vs 1.81 s in pack-name order); else by pack id."""
    if not len(recs):
        return np.empty(0, np.intp)
    _, inv = digest_sets.unique_inverse(recs["pack"].view("S32"))  # pack rank: integer keys sort fast
    if disk_pos is None:
        return np.lexsort((recs["offset"], inv))
    by_pack, bounds = group_members(inv, int(inv.max()) + 1)
    rank = np.minimum.reduceat(np.asarray(disk_pos, dtype=np.int64)[by_pack], bounds[:-1])
    return np.lexsort((recs["offset"], inv, rank[inv]))


class BlockSink:
    """Where ``read_blocks`` decodes blocks to, and what it tells about them.  Methods run
    on reader threads (several at once, each for its own records).

    For the records ``k, k+1, …`` of one pack range, ``reserve(k, ulens)`` returns
    ``(buffer, offsets)``: room for the first ``len(offsets) >= 1`` of them (``ulens``:
    their sizes) at ``buffer[offsets[i] : +ulens[i]]``.  The reader decodes them there,
    calls ``error(k_i, reason)`` for each bad one, then ``filled(k, buffer, offsets,
    ulens, ok)`` once (``ok``: a bool per reserved record); a bad record's bytes are
    undefined.  ``error`` is also called for the records of a pack that cannot be read,
    without a reservation."""

    def reserve(self, k: int, ulens: np.ndarray) -> tuple[memoryview, np.ndarray]:
        raise NotImplementedError

    def filled(self, k: int, buffer: memoryview, offsets: np.ndarray, ulens: np.ndarray, ok: np.ndarray) -> None:
        raise NotImplementedError

    def error(self, k: int, reason: str) -> None:
        raise NotImplementedError


#: bytes of decoded blocks a ScratchSink holds per thread (64 blocks of 64 KiB)
SCRATCH_BYTES = 4 * 1024 * 1024


class ScratchBuffers:
    """A reused decode buffer per thread, of ``SCRATCH_BYTES`` (at least one block)."""

    def __init__(self, block_size: int):
        self._local = threading.local()
        self._bytes = max(SCRATCH_BYTES, block_size)
        self._bs = block_size

    def reserve(self, ulens: np.ndarray) -> tuple[memoryview, np.ndarray]:
        """``BlockSink.reserve`` in this thread's buffer: as many records as fit (each at
        most one block: read_blocks sees to that)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(mmap.mmap(-1, self._bytes))
        ends = np.cumsum(ulens[: self._bytes // self._bs])
        m = max(1, int(np.searchsorted(ends, self._bytes, side="right")))
        return buf, ends[:m] - ulens[:m]


class ScratchSink(BlockSink):
    """Decodes into ScratchBuffers and passes each batch on in one call:
    ``on_blocks(k, buffer, offsets, ulens, ok)`` (views valid during the call only) and
    ``on_error(k, reason)``."""

    def __init__(self, on_blocks, on_error, *, block_size: int):
        self._scratch = ScratchBuffers(block_size)
        self.filled, self.error = on_blocks, on_error

    def reserve(self, k: int, ulens: np.ndarray):
        return self._scratch.reserve(ulens)


def read_blocks(repo, recs: np.ndarray, sink: BlockSink, *, threads: int, kernel: str | None = None) -> None:
    """Decode every record of ``recs`` (sorted with ``sort_for_reading``) into ``sink``
    (see BlockSink), each block's SHA-256 checked against its name; ``kernel`` as for
    BlockDecoder."""
    native.selected_decode_kernel(kernel)  # a forced kernel this machine lacks fails here, not per thread
    block_size = repo.config.block_size
    max_clen = max_frame_bytes(block_size)
    local = threading.local()
    stop = threading.Event()  # set on the first failure: the workers' remaining tasks end early

    def decoder() -> BlockDecoder:
        d = getattr(local, "decoder", None)
        if d is None:
            d = local.decoder = BlockDecoder(kernel)
        return d

    def read_buffer(n: int) -> memoryview:
        # One buffer per worker thread, reused for every range it reads: a fresh 16 MiB
        # bytes object per range page-faults every time (~0.8 s per GiB on this project's
        # VMs; recycled memory ~0.02 s per GiB).  Anonymous mmap, so it is page-aligned
        # for backends that read into it with preadv (or O_DIRECT).
        # A smaller old buffer is unmapped when its last view is gone.
        view = getattr(local, "view", None)
        if view is None or len(view) < n:
            view = local.view = memoryview(mmap.mmap(-1, -(-n // _BUF_STEP) * _BUF_STEP))
        return view[:n]

    def _store_reads(name: str, off: int, clen: int) -> bool:
        """Whether the store reads [off, off + clen) of ``name`` (nothing is decoded)."""
        try:
            repo.backend.read_range_into(name, off, bytearray(clen))
        except Exception:
            return False
        return True

    def _pack_size(name: str):
        """The object's size, "missing", or "unknown" when that cannot be told either: the frames
        of a range given up on that lie past the end are damage (the pack is cut short, a
        fact about the stored data), not a read failure that may pass."""
        try:
            return repo.backend.stat(name)
        except ObjectMissing:
            return "missing"
        except Exception:
            return "unknown"

    def work(pack_hex: str, start: int, end: int, k0: int, k1: int) -> bool:
        """Read and decode records [k0, k1) of one pack range; False if the read failed."""
        if stop.is_set():
            return True
        name = fmt.pack_name(pack_hex)
        if k1 - k0 == 1 and end - start > max_clen:  # _groups leaves such a record alone
            sink.error(k0, f"block in pack {pack_hex[:16]}… has a damaged pack index record "
                           f"(a {end - start}-byte frame, more than a block's frame can be)")
            return True
        try:
            view = read_buffer(end - start)
            repo.backend.read_range_into(name, start, view)
        except ObjectMissing:
            for k in range(k0, k1):
                sink.error(k, f"pack {pack_hex[:16]}… is missing")
            return False
        except AccessDenied:
            raise  # this process's rights, not the data: the command stops, nothing is called lost
        except Exception as exc:  # a short or failed read: report per block, keep going
            if k1 - k0 > 1:
                # One frame past the pack's end (a pack cut short, a damaged record) or on
                # a bad sector fails the whole range: read each frame alone, so only the
                # bad ones are reported (verify --repair drops the records reported).  A
                # run of failures in a row may mean the pack (or its store) fails as a
                # whole: then the rest is reported unread, not asked for frame by frame
                # (hundreds of requests per range against a store that is down).  But
                # what is reported is dropped by --repair, so a run is taken for that
                # only once one more read proves it (a frame of the range read alone
                # before, else its last frame, fails too); a bad stretch of many small
                # frames, or a blip of the store, is read past frame by frame.
                offs, clens = recs["offset"][k0:k1].tolist(), recs["clen"][k0:k1].tolist()
                failed_in_a_row, given_up, good = 0, False, None  # good: a frame read alone
                size = None  # the pack's size, asked once given up (or "missing", "unknown")
                for i, (k, off, clen) in enumerate(zip(range(k0, k1), offs, clens)):
                    if failed_in_a_row >= FRAME_RETRY_GIVE_UP and not given_up and i < len(offs) - 1:
                        probe = good if good is not None else (offs[-1], clens[-1])
                        if _store_reads(name, *probe):
                            failed_in_a_row = 0
                        else:
                            given_up = True
                    if given_up:
                        if size is None:  # once per range: what is past the end is damage
                            size = _pack_size(name)
                        if isinstance(size, int) and off + clen > size:
                            sink.error(k, f"pack {pack_hex[:16]}… is cut short: frame [{off}, {off + clen}) "
                                          f"beyond its end ({size} bytes)")
                        elif size == "missing":
                            sink.error(k, f"pack {pack_hex[:16]}… is missing")
                        else:
                            sink.error(k, ReadFailure(f"pack {pack_hex[:16]}… unreadable (not retried: "
                                                      f"{failed_in_a_row} frames before it failed in a row): {exc}"))
                        continue
                    if work(pack_hex, off, off + clen, k, k + 1):
                        failed_in_a_row, good = 0, (off, clen)
                    else:
                        failed_in_a_row += 1
                return True
            if isinstance(exc, RangeBeyondEnd):  # the pack is shorter than its index says
                sink.error(k0, f"pack {pack_hex[:16]}… is cut short: {exc}")
            else:  # the read failed: nothing is known about the copy
                sink.error(k0, ReadFailure(f"pack {pack_hex[:16]}… unreadable: {exc}"))
            return False
        dec = decoder()
        part = recs[k0:k1]
        src_off = part["offset"].astype(np.int64) - start
        src_len = part["clen"].astype(np.int64)
        ulens = part["ulen"].astype(np.int64)
        # A record claiming more than a block (a damaged pack index) is bad as it stands:
        # decoded as a 0-byte block it gets no room it could overrun, and is reported.
        oversize = ulens > block_size
        if oversize.any():
            ulens[oversize] = 0
        digests = np.ascontiguousarray(part["digest"])
        i, n = 0, k1 - k0
        while i < n and not stop.is_set():
            buf, offs = sink.reserve(k0 + i, ulens[i:])
            m = len(offs)
            status = dec.decode_into(view, src_off[i : i + m], src_len[i : i + m], buf, offs, ulens[i : i + m],
                                     digests[i : i + m])
            ok = status == native.DECODE_OK
            if oversize.any():
                status[oversize[i : i + m]] = native.DECODE_MISMATCH
                ok &= ~oversize[i : i + m]
            if not ok.all():
                for j in np.flatnonzero(~ok).tolist():
                    sink.error(k0 + i + j, f"block in pack {pack_hex[:16]}… {PROBLEMS[int(status[j])]}")
            sink.filled(k0 + i, buf, offs, ulens[i : i + m], ok)
            i += m
        return True

    groups = list(_groups(recs, max_clen))
    # Ask the backend to fetch ahead of the workers (PREFETCH_GROUPS beyond the ones
    # queued), so the worker threads stay on decompression and hashing instead of
    # waiting on the disk: see restore_snapshot for the measurement.
    ahead = 2 * threads + PREFETCH_GROUPS
    for pack_hex, start, end, *_ in groups[:ahead]:
        repo.backend.prefetch(fmt.pack_name(pack_hex), start, end - start)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyvbak-reader")
    inflight: deque = deque()
    try:
        for i, group in enumerate(groups):
            if i + ahead < len(groups):
                pack_hex, start, end, *_ = groups[i + ahead]
                repo.backend.prefetch(fmt.pack_name(pack_hex), start, end - start)
            inflight.append(pool.submit(work, *group))
            if len(inflight) >= 2 * threads:
                inflight.popleft().result()
        while inflight:
            inflight.popleft().result()
    except BaseException:
        stop.set()
        raise
    finally:
        _finish_workers(pool, inflight, stop)


def _finish_workers(pool: ThreadPoolExecutor, pending, stop: threading.Event) -> None:
    """Return only once no task runs, even when interrupted again meanwhile (a second
    Ctrl-C): the tasks write into the caller's sink, whose buffers and descriptors the
    caller releases once read_blocks returns (restore closes its target).  Once ``stop``
    is set a queued task returns at once and a running one at its next batch, so the wait
    is short; an interruption during it is raised after it.  Waits on the futures, not by
    joining threads: an interrupted Thread.join() marks a thread that is still running as
    stopped (CPython 3.11), and the next join returns at once.  (Not cancel_futures: wait()
    never returns for a future cancelled that way.)"""
    interrupted = None
    while True:
        try:
            futures_wait(pending)
            pool.shutdown(wait=True)  # idle threads now: they exit at once
            break
        except BaseException as exc:
            stop.set()
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
