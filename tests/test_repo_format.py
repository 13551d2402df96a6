"""The repository's bytes: every stored block is a standard zstd frame, a pack is a valid
zstd stream (the trailer is a skippable frame), metadata is zstd with checksums, and golden
bytes freeze the format so a change to it fails loudly."""

from __future__ import annotations

import hashlib
import os
import subprocess

import numpy as np
import pytest
import zstandard

from conftest import require_tool
from images import BS, MiB, backup_file, make_image, vm_image
from pyvbak.backends import MemoryBackend
from pyvbak.errors import IntegrityError
from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository, RepoConfig


@pytest.fixture
def filled(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    img = vm_image(tmp_path / "d.img", 6 * MiB + 321, seed=21)
    res = backup_file(repo, img)
    return repo, res


def _pack_paths(repo):
    root = os.path.join(repo.location, "packs")
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_each_block_is_a_standard_zstd_frame(filled):
    zstd = require_tool("zstd", "zstd")
    repo, res = filled
    idx = repo.load_digest_index()
    assert len(idx) == res.new_blocks > 3
    # first, last and a middle record: range-read the frame named by the pack index
    for k in (0, len(idx) // 2, len(idx) - 1):
        rec = idx.records[k]
        pack = os.path.join(repo.location, fmt.pack_name(bytes(rec["pack"]).hex()))
        with open(pack, "rb") as f:
            f.seek(int(rec["offset"]))
            frame = f.read(int(rec["clen"]))
        assert frame[:4] == bytes.fromhex("28b52ffd")  # zstd frame magic
        out = subprocess.run(f"{zstd} -dc | sha256sum", shell=True, input=frame, capture_output=True, check=True)
        assert out.stdout.split()[0].decode() == bytes(rec["digest"]).hex()
        plain = subprocess.run([zstd, "-dc"], input=frame, capture_output=True, check=True).stdout
        assert len(plain) == int(rec["ulen"])


def test_whole_pack_is_a_valid_zstd_stream(filled):
    zstd = require_tool("zstd", "zstd")
    repo, _ = filled
    packs = _pack_paths(repo)
    assert packs
    idx = repo.load_digest_index()
    for pack in packs:
        subprocess.run([zstd, "-tq", pack], check=True)  # the trailer is a skippable frame
        # zstd -dc PACK == the pack's blocks in offset order
        plain = subprocess.run([zstd, "-dcq", pack], capture_output=True, check=True).stdout
        mine = idx.records[idx.records["pack"].view("S32") == bytes.fromhex(os.path.basename(pack))]
        mine = mine[np.argsort(mine["offset"])]
        assert len(plain) == int(mine["ulen"].sum())
        pos = 0
        for rec in mine:
            n = int(rec["ulen"])
            assert hashlib.sha256(plain[pos : pos + n]).digest() == bytes(rec["digest"])
            pos += n
        # a pack is named by the SHA-256 of its trailer (its table of contents)
        raw = open(pack, "rb").read()
        tlen = fmt.trailer_length_from_tail(raw[-4:])
        assert hashlib.sha256(raw[-tlen:]).hexdigest() == os.path.basename(pack)


def test_metadata_files_are_checksummed_zstd(filled):
    zstd = require_tool("zstd", "zstd")
    repo, res = filled
    names = [fmt.snapshot_index_name(res.snapshot_id)] + repo.pack_index_names()
    for name in names:
        subprocess.run([zstd, "-tq", os.path.join(repo.location, name)], check=True)
    # a flipped byte inside the frame is detected (content checksum)
    path = os.path.join(repo.location, names[0])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    with pytest.raises(IntegrityError):
        fmt.decode_snapshot_index(bytes(data), "test index")


def test_pack_trailer_found_from_the_end(filled):
    repo, _ = filled
    for pack in _pack_paths(repo):
        blob = open(pack, "rb").read()
        tlen = fmt.trailer_length_from_tail(blob[-4:])
        recs = fmt.decode_pack_trailer(blob[-tlen:], pack)
        assert len(recs)
        assert int(recs["offset"][0]) == 0
        last = recs[-1]
        assert int(last["offset"]) + int(last["clen"]) == len(blob) - tlen


# -- golden bytes ------------------------------------------------------------------------
GOLDEN_KEY = bytes(range(16))
GOLDEN_SNAPSHOT_HEADER = (
    "29388ea2738fa92c"  # magic = sha256("pyvbak snapshot index v1")[:8]
    "00000001"  # version
    "00010000"  # block size 65536
    "000000000003008c"  # disk size 196748
    "0000000000000004"  # 4 records
    + "00" * 16
)
GOLDEN_FAST = [  # native keyed fast hash of each block under GOLDEN_KEY
    "71027138bc47ed6fc9277dc133c3fb3f",
    "ef6ed34bbf1af48ad1070cac53054771",
    "00000000000000000000000000000000",  # zero block
    "3ed240cffde7b89db7f417324fe9c08f",
]
GOLDEN_SNAPSHOT_INDEX_SHA256 = "ab05248542bb5af3ec976e60473a0225367709a7e7264f3d8604c5a981dc5bd2"


def _golden_image(path) -> bytes:
    data = bytes([1]) * BS + bytes([2]) * BS + bytes(BS) + b"pyvbak golden\n" * 10
    make_image(path, len(data), [(0, len(data), data)])
    return data


def test_golden_snapshot_index(tmp_path):
    """A fixed key and fixed data give these exact decompressed snapshot-index bytes."""
    for name in ("SNAPSHOT_INDEX_MAGIC", "PACK_INDEX_MAGIC", "PACK_TRAILER_MAGIC"):
        text = {"SNAPSHOT_INDEX_MAGIC": "snapshot index", "PACK_INDEX_MAGIC": "pack index", "PACK_TRAILER_MAGIC": "pack trailer"}[name]
        assert getattr(fmt, name) == hashlib.sha256(f"pyvbak {text} v1".encode()).digest()[:8]
    cfg = RepoConfig("00" * 16, 1, BS, 3, GOLDEN_KEY)
    repo = Repository(MemoryBackend(), cfg)
    data = _golden_image(tmp_path / "g.img")
    res = backup_file(repo, tmp_path / "g.img")
    raw = fmt._decompress_meta(repo.backend.read(fmt.snapshot_index_name(res.snapshot_id)), "golden")
    assert raw[:48].hex() == GOLDEN_SNAPSHOT_HEADER
    blocks = [data[i : i + BS] for i in range(0, len(data), BS)]
    for i, block in enumerate(blocks):
        rec = raw[48 + 48 * i : 96 + 48 * i]
        want = bytes(32) if i == 2 else hashlib.sha256(block).digest()
        assert rec[:32] == want, f"digest of block {i}"
        assert rec[32:].hex() == GOLDEN_FAST[i], f"fast hash of block {i}"
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_SNAPSHOT_INDEX_SHA256

    # the engine's pack index names exactly the three non-zero blocks with their lengths
    recs = repo.load_digest_index().records
    got = sorted((bytes(r["digest"]), int(r["ulen"])) for r in recs)
    assert got == sorted((hashlib.sha256(b).digest(), len(b)) for k, b in enumerate(blocks) if k != 2)


GOLDEN_PACK_INDEX = (
    "692fe50019b13e63" "00000001" "0000000000000002" + "00" * 60  # magic, version, count, pad
    + "11" * 32 + "aa" * 32 + "0000000000000000" + "00000010" + "00010000"
    + "22" * 32 + "aa" * 32 + "0000000000000010" + "00000020" + "0000008c"
)
GOLDEN_PACK_TRAILER = (
    "5e2a4d18"  # skippable frame magic 0x184D2A5E, little-endian
    "74000000"  # frame length 116 (16 header + 2 * 48 records + 4), little-endian
    "e529f3c35eb6d9dc" "00000001" "00000002"  # trailer magic, version, count
    + "11" * 32 + "0000000000000000" + "00000010" + "00010000"
    + "22" * 32 + "0000000000000010" + "00000020" + "0000008c"
    + "00000074"  # payload length again (116), big-endian, so readers find it from the end
)


def _fixed_records():
    idx = np.zeros(2, fmt.PACK_INDEX_RECORD)
    idx["digest"] = np.frombuffer(b"\x11" * 32 + b"\x22" * 32, "V32")
    idx["pack"] = np.frombuffer(b"\xaa" * 32, "V32")[0]
    idx["offset"] = [0, 16]
    idx["clen"] = [16, 32]
    idx["ulen"] = [65536, 140]
    tr = np.zeros(2, fmt.PACK_TRAILER_RECORD)
    for f in ("digest", "offset", "clen", "ulen"):
        tr[f] = idx[f]
    return idx, tr


def test_golden_pack_index_and_trailer():
    idx, tr = _fixed_records()
    raw = fmt._decompress_meta(fmt.encode_pack_index(idx), "golden")
    assert raw.hex() == GOLDEN_PACK_INDEX
    assert fmt.decode_pack_index(fmt.encode_pack_index(idx), "golden").tobytes() == idx.tobytes()
    trailer = fmt.encode_pack_trailer(tr)
    assert trailer.hex() == GOLDEN_PACK_TRAILER
    assert fmt.trailer_length_from_tail(trailer[-4:]) == len(trailer)
    assert fmt.decode_pack_trailer(trailer, "golden").tobytes() == tr.tobytes()
    assert (fmt.SNAPSHOT_RECORD.itemsize, fmt.PACK_INDEX_RECORD.itemsize, fmt.PACK_TRAILER_RECORD.itemsize) == (48, 80, 48)


def test_decoders_reject_damage():
    idx, tr = _fixed_records()
    trailer = bytearray(fmt.encode_pack_trailer(tr))
    trailer[12] ^= 1  # trailer magic
    with pytest.raises(IntegrityError):
        fmt.decode_pack_trailer(bytes(trailer), "t")
    raw = fmt._decompress_meta(fmt.encode_pack_index(idx), "x")
    bad = fmt._compress_meta(raw[:8] + b"\x00\x00\x00\x02" + raw[12:])  # version 2
    with pytest.raises(IntegrityError, match="version"):
        fmt.decode_pack_index(bad, "p")
    recs = np.zeros(3, fmt.SNAPSHOT_RECORD)
    good = fmt.encode_snapshot_index(BS, 3 * BS, recs)
    assert fmt.decode_snapshot_index(good, "s")[1] == 3 * BS
    with pytest.raises(IntegrityError, match="inconsistent"):
        fmt.decode_snapshot_index(fmt.encode_snapshot_index(BS, 4 * BS, recs), "s")
    for writable in (False, True):
        with pytest.raises(IntegrityError):
            fmt.decode_snapshot_index(b"not zstd at all" * 40, "s", writable=writable)
        # a valid frame whose content size disagrees with the index header it holds
        lying = fmt._compress_meta(fmt._decompress_meta(good, "s") + bytes(48))
        with pytest.raises(IntegrityError, match="inconsistent"):
            fmt.decode_snapshot_index(lying, "s", writable=writable)


def test_snapshot_index_streamed_in_chunks_equals_decoded(tmp_path):
    """iter_snapshot_index gives the records decode_snapshot_index gives, chunk by chunk
    (a reused buffer), and the same errors for a bad frame, count or metadata."""
    rng = np.random.default_rng(5)
    n = 1000
    records = np.zeros(n, fmt.SNAPSHOT_RECORD)
    records.view(np.uint8).reshape(n, 48)[::3] = rng.integers(0, 256, (len(range(0, n, 3)), 48), dtype=np.uint8)
    data = fmt.encode_snapshot_index(4096, n * 4096 - 100, records)
    for chunk in (1, 7, 333, 1000, 5000):
        got = np.concatenate([c.copy() for c in fmt.iter_snapshot_index(data, "t", chunk, expect=(4096, n * 4096 - 100))])
        assert (got == fmt.decode_snapshot_index(data, "t")[2]).all() and len(got) == n
    with pytest.raises(IntegrityError, match="does not match its snapshot's metadata"):
        list(fmt.iter_snapshot_index(data, "t", 100, expect=(4096, n * 4096)))
    bad = bytearray(data)
    bad[-1] ^= 0xFF  # the checksum: found only at the end, after every chunk was handed out
    with pytest.raises(IntegrityError, match="corrupt"):
        list(fmt.iter_snapshot_index(bytes(bad), "t", 100))
    short = fmt._compress_meta(zstandard.ZstdDecompressor().decompress(data)[:-48])
    with pytest.raises(IntegrityError, match="inconsistent"):
        list(fmt.iter_snapshot_index(short, "t", 100))
    longer = fmt._compress_meta(zstandard.ZstdDecompressor().decompress(data) + bytes(48))
    with pytest.raises(IntegrityError, match="inconsistent"):
        list(fmt.iter_snapshot_index(longer, "t", 100))


@pytest.mark.parametrize("seed", range(6))
def test_a_patched_index_is_the_frame_of_the_whole_patched_array(seed):
    """encode_snapshot_index_patched: another index streamed in chunks, some records
    replaced on the way: the same frame as encoding the whole patched array."""
    import random

    rng = random.Random(seed)
    n = rng.randrange(1, 5000)
    parent = np.zeros(n, fmt.SNAPSHOT_RECORD)
    parent.view(np.uint8)[:] = np.frombuffer(rng.randbytes(parent.nbytes), np.uint8)
    parent["digest"][rng.sample(range(n), n // 3)] = np.frombuffer(bytes(32), "V32")[0]  # zero blocks
    patched = np.array(sorted(rng.sample(range(n), rng.randrange(0, n + 1))), dtype=np.int64)
    records = np.zeros(n, fmt.SNAPSHOT_RECORD)
    records.view(np.uint8)[:] = np.frombuffer(rng.randbytes(records.nbytes), np.uint8)
    whole = parent.copy()
    whole[patched] = records[patched]
    data = fmt.encode_snapshot_index(65536, n * 65536, parent)
    chunks = fmt.iter_snapshot_index(data, "parent", rng.choice([1, 7, 1000, 1 << 20]))
    assert fmt.encode_snapshot_index_patched(65536, n * 65536, chunks, records, patched) == \
        fmt.encode_snapshot_index(65536, n * 65536, whole)
    with pytest.raises(IntegrityError):  # a base of another length is refused
        fmt.encode_snapshot_index_patched(65536, (n + 1) * 65536, fmt.iter_snapshot_index(data, "parent"),
                                          np.zeros(n + 1, fmt.SNAPSHOT_RECORD), patched)


def test_bytes_after_a_metadata_frame_are_damage():
    """zstd stops at the end of a frame and ignores what follows: bytes appended to a pack
    index or snapshot index went unseen by every reader and by verify."""
    idx, _ = _fixed_records()
    good = fmt.encode_pack_index(idx)
    assert len(fmt.decode_pack_index(good, "p")) == len(idx)
    with pytest.raises(IntegrityError, match="3 bytes after its zstd frame"):
        fmt.decode_pack_index(good + b"abc", "p")
    recs = np.zeros(3, fmt.SNAPSHOT_RECORD)
    snap = fmt.encode_snapshot_index(BS, 3 * BS, recs)
    for writable in (False, True):
        with pytest.raises(IntegrityError, match="after its zstd frame"):
            fmt.decode_snapshot_index(snap + b"\x00", "s", writable=writable)
    with pytest.raises(IntegrityError, match="after its zstd frame"):
        list(fmt.iter_snapshot_index(snap + b"junk", "s"))
    # a long index (many blocks, RLE and compressed ones) is walked to its exact end
    big = np.zeros(100_000, fmt.SNAPSHOT_RECORD)
    big["digest"][::7] = np.frombuffer(os.urandom(32 * len(big[::7])), "V32")
    data = fmt.encode_snapshot_index(BS, len(big) * BS, big)
    assert len(fmt.decode_snapshot_index(data, "s")[2]) == len(big)
