"""On-disk formats of a pyvbak repository (version 1), as byte grammars.

docs/FORMAT.md is the normative description; this module is its only implementation.
All multi-byte integers are big-endian so that ``restore.sh`` can read them from an
``od`` hex dump with plain shell arithmetic.  Fast hashes are stored as the 16 bytes the
native scanner produces (two little-endian uint64).

DO NOT MODIFY the magic numbers or record layouts: existing repositories depend on them.
A change of layout is a new format version with its own magic.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct

import numpy as np
import zstandard

from ..errors import IntegrityError

FORMAT_VERSION = 1

# Magic numbers: first 8 bytes of SHA-256 of a versioned string (as Proxmox Backup Server
# does), so they are unlikely to collide with anything else and document themselves.
SNAPSHOT_INDEX_MAGIC = bytes.fromhex("29388ea2738fa92c")  # sha256("pyvbak snapshot index v1")[:8]
PACK_INDEX_MAGIC = bytes.fromhex("692fe50019b13e63")  # sha256("pyvbak pack index v1")[:8]
PACK_TRAILER_MAGIC = bytes.fromhex("e529f3c35eb6d9dc")  # sha256("pyvbak pack trailer v1")[:8]

# zstd skippable frame magic (zstd format spec: 0x184D2A50..0x184D2A5F, little-endian).
SKIPPABLE_FRAME_MAGIC = 0x184D2A5E

ZERO_DIGEST = bytes(32)  # the zero-block marker in a snapshot index; never a stored block

# -- record layouts -------------------------------------------------------------------
SNAPSHOT_RECORD = np.dtype([("digest", "V32"), ("fast", "V16")])  # 48 bytes
assert SNAPSHOT_RECORD.itemsize == 48
SNAPSHOT_HEADER = struct.Struct(">8sIIQQ16x")  # magic, version, block_size, disk_size, block_count
assert SNAPSHOT_HEADER.size == 48

PACK_INDEX_RECORD = np.dtype(
    [("digest", "V32"), ("pack", "V32"), ("offset", ">u8"), ("clen", ">u4"), ("ulen", ">u4")]
)  # 80 bytes
assert PACK_INDEX_RECORD.itemsize == 80
PACK_INDEX_HEADER = struct.Struct(">8sIQ60x")  # magic, version, record count
assert PACK_INDEX_HEADER.size == 80

PACK_TRAILER_RECORD = np.dtype([("digest", "V32"), ("offset", ">u8"), ("clen", ">u4"), ("ulen", ">u4")])
assert PACK_TRAILER_RECORD.itemsize == 48
PACK_TRAILER_HEADER = struct.Struct(">8sII")  # magic, version, record count

# -- object names ---------------------------------------------------------------------
CONFIG_NAME = "config"
#: the config's copy, the same bytes: read when config is missing or damaged (one small
#: file was all that stood between a user and every snapshot: session 25's audit)
CONFIG_COPY_NAME = "config.copy"
#: markers a prune leaves when it removed the index records of packs gone from storage
LOST_PREFIX = "lost/"


#: the folder every pack lies under (PackWriter opens its streams there)
PACKS_FOLDER = "packs/"


#: the pack storage's mark (docs/FORMAT.md, "Pack storage mark"): it says that the
#: ``packs/`` the repository sees is its own pack storage, not an empty mount point; the
#: root holds a copy, which says that the mark exists
PACK_STORAGE_MARK = PACKS_FOLDER + "pack-storage.json"
PACK_STORAGE_MARK_COPY = "pack-storage.json"
_PACK_STORAGE_FORMAT = "pyvbak-pack-storage"


def encode_pack_storage_mark(repository_id: str, created: str) -> bytes:
    """The mark's bytes (mark and root copy are the same bytes)."""
    return json.dumps({"format": _PACK_STORAGE_FORMAT, "repository": repository_id, "created": created},
                      indent=2).encode()


def decode_pack_storage_mark(data: bytes, what: str) -> str:
    """The repository id a mark names.  Raises IntegrityError for anything that is not a
    mark as ``encode_pack_storage_mark`` writes it."""
    try:
        doc = json.loads(data)
        repo_id = doc["repository"] if isinstance(doc, dict) and doc.get("format") == _PACK_STORAGE_FORMAT else None
    except (ValueError, KeyError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        repo_id = None
    if not isinstance(repo_id, str) or not re.fullmatch(r"[0-9a-f]{32}", repo_id):
        raise IntegrityError(f"{what} is damaged (not a pyvbak pack-storage mark)")
    return repo_id


def pack_name(pack_id_hex: str) -> str:
    return f"{PACKS_FOLDER}{pack_id_hex[:2]}/{pack_id_hex}"


def pack_index_name(index_id_hex: str) -> str:
    return f"index/{index_id_hex}"


def snapshot_meta_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.json"


def snapshot_index_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.index"


# -- metadata frames ------------------------------------------------------------------
# Metadata files are one zstd frame with content checksum, so `zstd -t` checks them and a
# torn or bit-flipped file is always detected.
def _compress_meta(payload: bytes) -> bytes:
    # Level 1: a 2 GiB disk's index (1.5 MB, mostly random digests) takes 1.2 ms at level
    # 1, 2.8 ms at level 3 and 37 ms at level 9 on the critical path of every backup, and
    # compresses to the same 1.06 MB at all three - SHA-256 digests are incompressible.
    return _meta_compressor().compress(payload)


def _meta_compressor():
    return zstandard.ZstdCompressor(level=1, write_checksum=True)


def _decompress_meta(data: bytes, what: str, max_output: int | None = None) -> bytes:
    """One zstd frame's content; with ``max_output``, a frame that declares (or decodes to)
    more is damage, found before the memory is taken: a 19-byte frame claiming 1 TiB made
    every command fail with "out of memory", and a 49 KB bomb took 3 GB."""
    _check_one_frame(data, what)
    try:
        if max_output is not None:
            declared = zstandard.get_frame_parameters(data).content_size
            if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > max_output:
                raise IntegrityError(f"{what} is damaged: it claims {declared} bytes of content, more than such "
                                     f"an object can hold ({max_output})")
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_output)
        return zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise _corrupt(what, exc) from None


#: a pack index's records are half random bytes (the digests): it cannot decompress to
#: more than this many times its stored size (real ones: under 2)
PACK_INDEX_MAX_RATIO = 8


_FHD_DICT_ID_BYTES = (0, 1, 2, 4)
_FHD_FCS_BYTES = (0, 2, 4, 8)


def _check_one_frame(data, what: str) -> None:
    """IntegrityError unless ``data`` is exactly one zstd frame (RFC 8878 3.1.1: header,
    blocks up to the last, optional checksum): zstd's decoders stop at the frame's end
    and ignore whatever follows, so bytes appended to a metadata object went unseen.
    Walks the block headers only (3 bytes per <= 128 KiB block)."""
    mv = memoryview(data)
    n = len(mv)
    if n < 6 or bytes(mv[:4]) != b"\x28\xb5\x2f\xfd":
        return  # not a zstd frame: the decoder says so in its own words
    fhd = mv[4]
    single_segment = (fhd >> 5) & 1
    pos = 5 + (0 if single_segment else 1) + _FHD_DICT_ID_BYTES[fhd & 3] + (_FHD_FCS_BYTES[fhd >> 6] or single_segment)
    while pos + 3 <= n:
        bh = mv[pos] | (mv[pos + 1] << 8) | (mv[pos + 2] << 16)
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        pos += 3 + (1 if btype == 1 else bsize)  # an RLE block stores one byte
        if last:
            end = pos + (4 if fhd & 0x04 else 0)
            if end < n:
                raise IntegrityError(f"{what} is corrupt ({n - end} bytes after its zstd frame): run "
                                     f"'pyvbak verify' and restore the file from a copy")
            return
    # truncated inside the frame: the decoder reports it


def _corrupt(what: str, exc: Exception) -> IntegrityError:
    return IntegrityError(f"{what} is corrupt ({exc}): run 'pyvbak verify' and restore the file from a copy")


def _read_full(reader, view) -> int:
    """Fill ``view`` from a zstd stream reader; the bytes read (fewer only at its end)."""
    got = 0
    while got < len(view):
        n = reader.readinto(view[got:])
        if not n:
            break
        got += n
    return got


#: zero bytes fed to the index compressor for records known to be zero (see below)
_ZERO_FEED = bytes(1 << 20)


def encode_snapshot_index(block_size: int, disk_size: int, records: np.ndarray,
                          known_zero: list[tuple[int, int]] | None = None) -> bytes:
    """Snapshot index := zstd_frame( header(48) record(48)* ).

    Compressed as a stream straight from ``records``: a 1 TiB disk's index is 800 MB, and
    the former ``header + records.tobytes()`` made two copies of it in fresh memory, ~1.5 s
    of page faults per backup here (bench/RESULTS.md, "Thin disks of a terabyte").
    ``known_zero``: (first, end) record ranges, ascending, that the caller knows are all
    zero: zeros are fed for them from a small buffer instead of reading ``records`` there
    (a fresh thin disk's index is mostly never-written memory, whose every 4 KiB page a
    read would fault in).  The frame is the same either way."""
    if records.dtype != SNAPSHOT_RECORD:
        raise TypeError("records must have dtype SNAPSHOT_RECORD")
    body = memoryview(np.ascontiguousarray(records).view(np.uint8))
    stream, out = _index_stream(block_size, disk_size, len(records))
    size, pos = SNAPSHOT_RECORD.itemsize, 0
    for first, end in known_zero or ():
        first, end = max(first, pos // size) * size, min(end * size, len(body))
        if first >= end:
            continue
        out.append(stream.compress(body[pos:first]))
        for at in range(first, end, len(_ZERO_FEED)):
            out.append(stream.compress(_ZERO_FEED[: min(len(_ZERO_FEED), end - at)]))
        pos = end
    out.append(stream.compress(body[pos:]))
    out.append(stream.flush())
    return b"".join(out)


def _index_stream(block_size: int, disk_size: int, count: int):
    """(compressor stream, output pieces holding the header's) for a snapshot index of
    ``count`` records, fed piece by piece."""
    header = SNAPSHOT_HEADER.pack(SNAPSHOT_INDEX_MAGIC, FORMAT_VERSION, block_size, disk_size, count)
    stream = _meta_compressor().compressobj(size=len(header) + count * SNAPSHOT_RECORD.itemsize)
    return stream, [stream.compress(header)]


def encode_snapshot_index_patched(block_size: int, disk_size: int, base_chunks, records: np.ndarray,
                                  patched: np.ndarray) -> bytes:
    """``encode_snapshot_index`` of the records ``base_chunks`` yields (another index's, in
    order and in chunks: ``iter_snapshot_index``, whose buffers may be changed) with the
    records at the sorted indices ``patched`` replaced by ``records[patched]``; the same
    frame as encoding the whole patched array.  An incremental of a large disk holds only
    the records of the blocks it changes: the parent's others pass through here in chunks."""
    count = len(records)
    stream, out = _index_stream(block_size, disk_size, count)
    base = 0
    for chunk in base_chunks:
        end = base + len(chunk)
        if end > count:
            raise IntegrityError(f"the base index has more records than the {count} being written")
        lo, hi = np.searchsorted(patched, [base, end])
        if hi > lo:
            chunk[patched[lo:hi] - base] = records[patched[lo:hi]]
        out.append(stream.compress(memoryview(np.ascontiguousarray(chunk).view(np.uint8))))
        base = end
    if base != count:
        raise IntegrityError(f"the base index has {base} records, {count} being written")
    out.append(stream.flush())
    return b"".join(out)


def _decompress_snapshot_writable(data: bytes, what: str, expect: tuple[int, int] | None) -> memoryview:
    """A snapshot index decompressed into writable memory of its own (not zero-filled
    first).  The frame header's content size is only trusted once the index header it
    announces agrees with it: a damaged frame must give IntegrityError, not an
    allocation of whatever size its garbage names."""
    _check_one_frame(data, what)
    try:
        size = zstandard.frame_content_size(data) if len(data) >= 18 else -1
    except zstandard.ZstdError as exc:  # not a zstd frame at all
        raise _corrupt(what, exc) from None
    if size < 0:  # no content size in the header: decompress, then copy once
        return memoryview(bytearray(_decompress_meta(data, what, max_output=_index_bytes(expect))))
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            head = reader.read(SNAPSHOT_HEADER.size)
    except zstandard.ZstdError as exc:
        raise _corrupt(what, exc) from None
    block_size, disk_size, count = _snapshot_header(head, what)
    _check_expected(what, expect, block_size, disk_size)
    if size != SNAPSHOT_HEADER.size + count * SNAPSHOT_RECORD.itemsize:
        raise IntegrityError(f"{what} is inconsistent: its frame holds {size} bytes for {count} records")
    out = np.empty(size, np.uint8)
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            got = _read_full(reader, out)
            if got != size or reader.read(1):  # reading to the frame's end checks its checksum
                raise zstandard.ZstdError(f"content is {got}+ bytes, its frame header says {size}")
    except zstandard.ZstdError as exc:
        raise _corrupt(what, exc) from None
    return memoryview(out)


def decode_snapshot_index(data: bytes, what: str, *, writable: bool = False,
                          expect: tuple[int, int] | None = None) -> tuple[int, int, np.ndarray]:
    """Returns (block_size, disk_size, records); IntegrityError on any inconsistency.
    ``records`` is a view of the decompressed bytes (no copy), read-only unless
    ``writable`` (then the caller may change it in place).  ``expect``: the (block size,
    disk size) the snapshot's metadata gives, checked before any memory is taken for the
    records: an index of a snapshot made before its metadata recorded the index's SHA-256
    could claim a petabyte disk, and the backup it parented failed "out of memory"."""
    if writable:
        raw = _decompress_snapshot_writable(data, what, expect)
    else:
        raw = memoryview(_decompress_meta(data, what, max_output=_index_bytes(expect)))
    block_size, disk_size, count = _snapshot_header(raw[: SNAPSHOT_HEADER.size], what)
    _check_expected(what, expect, block_size, disk_size)
    body = raw[SNAPSHOT_HEADER.size :]
    if len(body) != count * SNAPSHOT_RECORD.itemsize:
        raise IntegrityError(f"{what} is inconsistent: {count} records for a {disk_size}-byte disk")
    return block_size, disk_size, np.frombuffer(body, dtype=SNAPSHOT_RECORD)


def _snapshot_header(head, what: str) -> tuple[int, int, int]:
    """(block size, disk size, record count) from a snapshot index's first bytes, checked."""
    if len(head) < SNAPSHOT_HEADER.size:
        raise IntegrityError(f"{what} is truncated: run 'pyvbak verify'")
    magic, version, block_size, disk_size, count = SNAPSHOT_HEADER.unpack(head)
    if magic != SNAPSHOT_INDEX_MAGIC:
        raise IntegrityError(f"{what} is not a pyvbak snapshot index (bad magic)")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"{what} has index version {version}; this pyvbak reads version {FORMAT_VERSION}")
    if count != (_record_count(block_size, disk_size) if block_size else -1):
        raise IntegrityError(f"{what} is inconsistent: {count} records for a {disk_size}-byte disk")
    return block_size, disk_size, count


def _record_count(block_size: int, disk_size: int) -> int:
    return -(-disk_size // block_size)


def _index_bytes(expect: tuple[int, int] | None) -> int | None:
    """The decompressed size of an index of a (block size, disk size) snapshot, or None."""
    return None if expect is None else SNAPSHOT_HEADER.size + _record_count(*expect) * SNAPSHOT_RECORD.itemsize


def _check_expected(what: str, expect: tuple[int, int] | None, block_size: int, disk_size: int) -> None:
    """IntegrityError unless an index header's (block size, disk size) is ``expect``'s."""
    if expect is not None and expect != (block_size, disk_size):
        raise IntegrityError(f"{what} does not match its snapshot's metadata: one of them is damaged; run "
                             f"'pyvbak verify'")


def iter_snapshot_index(data: bytes, what: str, chunk_records: int = 1 << 20, *,
                        expect: tuple[int, int] | None = None):
    """``decode_snapshot_index`` as a stream: yields the records in chunks of at most
    ``chunk_records`` (views into one reused buffer: each is valid until the next is
    asked for), checking the header first and the count and the frame's checksum at the
    end - a consumer must drop what it gathered if IntegrityError comes late.  ``expect``:
    the (block size, disk size) the snapshot's metadata gives.  For passes
    over many snapshots (verify, prune): a thin 1 TiB disk's index is 800 MB decompressed,
    most of it the zero marker."""
    record = SNAPSHOT_RECORD.itemsize
    _check_one_frame(data, what)
    buf = np.empty(chunk_records * record, np.uint8)
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            block_size, disk_size, count = _snapshot_header(reader.read(SNAPSHOT_HEADER.size), what)
            _check_expected(what, expect, block_size, disk_size)
            left = count
            while left:
                want = min(left, chunk_records) * record
                if _read_full(reader, buf[:want]) != want:
                    raise IntegrityError(f"{what} is inconsistent: {count} records for a {disk_size}-byte disk")
                left -= want // record
                yield buf[:want].view(SNAPSHOT_RECORD)
            if reader.read(1):  # past the records, and to the frame's end: its checksum
                raise IntegrityError(f"{what} is inconsistent: {count} records for a {disk_size}-byte disk")
    except zstandard.ZstdError as exc:
        raise _corrupt(what, exc) from None


def encode_pack_index(records: np.ndarray) -> bytes:
    """Pack index file := zstd_frame( header(80) record(80)* )."""
    header = PACK_INDEX_HEADER.pack(PACK_INDEX_MAGIC, FORMAT_VERSION, len(records))
    return _compress_meta(header + records.astype(PACK_INDEX_RECORD).tobytes())


def decode_pack_index(data: bytes, what: str) -> np.ndarray:
    raw = _decompress_meta(data, what, max_output=len(data) * PACK_INDEX_MAX_RATIO + (1 << 16))
    if len(raw) < PACK_INDEX_HEADER.size:
        raise IntegrityError(f"{what} is truncated")
    magic, version, count = PACK_INDEX_HEADER.unpack_from(raw)
    if magic != PACK_INDEX_MAGIC or version != FORMAT_VERSION:
        raise IntegrityError(f"{what} is not a pyvbak pack index of version {FORMAT_VERSION}")
    body = raw[PACK_INDEX_HEADER.size :]
    if len(body) != count * PACK_INDEX_RECORD.itemsize:
        raise IntegrityError(f"{what} is inconsistent: header says {count} records")
    records = np.frombuffer(body, dtype=PACK_INDEX_RECORD)
    # offsets past any pack (2^48 bytes): damage, not a read to attempt (one of 2^63 or
    # more crashed restore, verify and --repair, so the repair could not drop it)
    if len(records) and int(records["offset"].max()) >= 1 << 48:
        raise IntegrityError(f"{what} is damaged: it places a block at an offset no pack reaches")
    return records


def encode_pack_trailer(records: np.ndarray) -> bytes:
    """Pack trailer := skippable_magic(u32 LE) frame_len(u32 LE) header(16) record(48)* payload_len(u32 BE).

    A zstd skippable frame: ``zstd -dc PACK`` ignores it and decodes the block frames.
    Its last 4 bytes repeat the payload length so a reader finds the trailer from the end
    of the pack with two range reads (how indexes are rebuilt from packs alone).
    """
    body = PACK_TRAILER_HEADER.pack(PACK_TRAILER_MAGIC, FORMAT_VERSION, len(records)) + records.tobytes()
    payload = body + struct.pack(">I", len(body) + 4)
    return struct.pack("<II", SKIPPABLE_FRAME_MAGIC, len(payload)) + payload


def pack_trailer_length(count: int) -> int:
    """The size of the trailer ``encode_pack_trailer`` writes for ``count`` records."""
    return 8 + PACK_TRAILER_HEADER.size + count * PACK_TRAILER_RECORD.itemsize + 4


def pack_id(trailer: bytes) -> bytes:
    """A pack's 32-byte id: SHA-256 of its trailer (frame header included).

    The trailer lists every block's digest, offset and lengths, so two packs with one id
    hold the same blocks at the same places; each block is checked by its digest on read.
    """
    return hashlib.sha256(trailer).digest()


def trailer_length_from_tail(tail4: bytes) -> int:
    """Total trailer size (frame header included) from the pack's last 4 bytes."""
    (payload_len,) = struct.unpack(">I", tail4)
    return payload_len + 8


def decode_pack_trailer(trailer: bytes, what: str) -> np.ndarray:
    """Decode a trailer as cut from the end of a pack (see trailer_length_from_tail)."""
    if len(trailer) < 8 + PACK_TRAILER_HEADER.size + 4:
        raise IntegrityError(f"{what} has no valid pack trailer")
    magic, frame_len = struct.unpack_from("<II", trailer)
    tmagic, version, count = PACK_TRAILER_HEADER.unpack_from(trailer, 8)
    body = trailer[8 + PACK_TRAILER_HEADER.size : -4]
    if (
        magic != SKIPPABLE_FRAME_MAGIC
        or frame_len != len(trailer) - 8
        or tmagic != PACK_TRAILER_MAGIC
        or version != FORMAT_VERSION
        or len(body) != count * PACK_TRAILER_RECORD.itemsize
    ):
        raise IntegrityError(f"{what} has no valid pack trailer")
    return np.frombuffer(body, dtype=PACK_TRAILER_RECORD)


def pack_id_of(buffers) -> str:
    h = hashlib.sha256()
    for b in buffers:
        h.update(b)
    return h.hexdigest()
