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

import numpy as np
import zstandard

from .. import native
from ..backends import ObjectMissing
from . import digest_sets
from . import format as fmt

GAP_BYTES = 256 * 1024
RANGE_BYTES = 16 * 1024 * 1024
#: ranges (of up to RANGE_BYTES) the backend is asked to prefetch beyond those queued
PREFETCH_GROUPS = 2
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
        try:
            data = raw_frame_content(frame, ulen)
            if data is None:
                data = dctx.decompress(frame)
        except zstandard.ZstdError as exc:
            out.append((None, f"has a corrupt frame ({exc})"))
            continue
        if len(data) != ulen:
            out.append((None, "does not match its digest"))
            continue
        out.append((data, None))
        check.append(i)
    for i, got in zip(check, native.sha256_many([out[i][0] for i in check])):
        if got != digests[i]:
            out[i] = (None, "does not match its digest")
    return out


#: frames decoded and SHA-256-checked together by a reader worker (64 KiB blocks: 512 KiB)
DECODE_BATCH = 8


def _groups(recs: np.ndarray):
    """Yield (pack_hex, start, end, k0, k1): records k0..k1-1 (``recs`` sorted by pack,
    then offset) are read with one range read [start, end) of that pack."""
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
            while k < m:
                off = offs[k]
                if off - end > GAP_BYTES or off + clens[k] - start > RANGE_BYTES:
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


def read_blocks(repo, recs: np.ndarray, on_block, on_error, *, threads: int) -> None:
    """Call ``on_block(k, data)`` for every record k whose block reads back intact and
    ``on_error(k, reason)`` for each missing or corrupt one.  Callbacks run on worker
    threads; ``data`` is bytes-like and only valid during the call (copy to keep it).
    ``recs`` must be sorted with ``sort_for_reading``."""
    local = threading.local()

    def dctx():
        d = getattr(local, "dctx", None)
        if d is None:
            d = local.dctx = zstandard.ZstdDecompressor()
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

    def work(pack_hex: str, start: int, end: int, k0: int, k1: int) -> None:
        name = fmt.pack_name(pack_hex)
        members = range(k0, k1)
        try:
            view = read_buffer(end - start)
            repo.backend.read_range_into(name, start, view)
        except ObjectMissing:
            for k in members:
                on_error(k, f"pack {pack_hex[:16]}… is missing")
            return
        except Exception as exc:  # a short or failed read: report per block, keep going
            for k in members:
                on_error(k, f"pack {pack_hex[:16]}… unreadable: {exc}")
            return
        d = dctx()
        # this range's per-block fields as lists (numpy scalar indexing per block holds the GIL)
        part = recs[k0:k1]
        offs, clens, ulens = part["offset"].tolist(), part["clen"].tolist(), part["ulen"].tolist()
        digests = part["digest"].tolist()  # V32: full 32-byte bytes objects
        for b in range(0, k1 - k0, DECODE_BATCH):
            idx = range(b, min(b + DECODE_BATCH, k1 - k0))
            frames = [view[offs[i] - start : offs[i] - start + clens[i]] for i in idx]
            decoded = decode_blocks(d, frames, [ulens[i] for i in idx], [digests[i] for i in idx])
            for k, (data, problem) in zip((k0 + i for i in idx), decoded):
                if problem is not None:
                    on_error(k, f"block in pack {pack_hex[:16]}… {problem}")
                    continue
                on_block(k, data)

    groups = list(_groups(recs))
    # Ask the backend to fetch ahead of the workers (PREFETCH_GROUPS beyond the ones
    # queued), so the worker threads stay on decompression and hashing instead of
    # waiting on the disk: see restore_snapshot for the measurement.
    ahead = 2 * threads + PREFETCH_GROUPS
    for pack_hex, start, end, *_ in groups[:ahead]:
        repo.backend.prefetch(fmt.pack_name(pack_hex), start, end - start)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyvbak-reader") as pool:
        inflight: deque = deque()
        for i, group in enumerate(groups):
            if i + ahead < len(groups):
                pack_hex, start, end, *_ = groups[i + ahead]
                repo.backend.prefetch(fmt.pack_name(pack_hex), start, end - start)
            inflight.append(pool.submit(work, *group))
            if len(inflight) >= 2 * threads:
                inflight.popleft().result()
        while inflight:
            inflight.popleft().result()
