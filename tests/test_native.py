"""Tests of pyvbak.native: golden values, kernel equivalence, zero detection, diff, files."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvbak import native
from pyvbak.errors import SourceError, UsageError

KERNELS = native.available_kernels()
KEY = bytes(range(16))
KEYS = [bytes(16), bytes(range(16)), b"\xff" * 16]
KIB = 1024


def data_for(n: int, seed: bytes = b"pyvbak golden") -> bytes:
    return hashlib.shake_256(seed).digest(n)


def scan(buf, bs=4096, key=KEY, kernel=None):
    n = native.block_count(len(memoryview(buf).cast("B")), bs)
    z, h = native.new_arrays(n)
    native.scan_buffer(buf, bs, key, z, h, kernel=kernel)
    return z, h


# ---- golden values (frozen: a change here changes every stored index -> must fail) -------

GOLDEN = {
    (0, 1): "b5af16d830fdb7e0bd00fef4908059f1",
    (0, 100): "957c3ec1c55725f3e1d9a2f4d0233a81",
    (0, 1023): "992dc06996f4c0644236d2de4b838cbf",
    (0, 1024): "60fcfe190780cfd108423a2a1b782ab7",
    (0, 1025): "7ba691257ccfbd3fc76de5518bb7fcfc",
    (0, 4095): "d1a57b892a698c07de49bee36fb73a32",
    (0, 4096): "8519cdc884485ff1e8a761786f1774fc",
    (0, 4097): "a5311011296296abe6f27c50dae3d61f",
    (0, 65536): "a47c7371ec5009a3d566d0643177a5c2",
    (0, 65869): "8c6086897e7d72276e0576f4bf0fd366",
    (1, 1): "de9251ccfd1bac2ffd798a4a7d039e40",
    (1, 100): "0ba6571574ac6e31470367f7f01dd202",
    (1, 1023): "94258b7330827825e862113db5b9ce8f",
    (1, 1024): "bfb6d89e8fdd2015182510ca80784c28",
    (1, 1025): "4506df41dffb1ced20a05aacbb54bdbb",
    (1, 4095): "536d6d6f317e59f2d60c7638f55228a8",
    (1, 4096): "962c4cd47f63aeb116aefa68f4c5f5c2",
    (1, 4097): "6363edf2064ae06d36d608e3dce70f14",
    (1, 65536): "ccb511de8477aa07d6885319d4fa849d",
    (1, 65869): "221dbd3ded80471dc9f7080e18d91cb0",
    (2, 1): "f8abee3adf979220916d2c1c12a7f8d3",
    (2, 100): "8be80c79c91b7aa5374d0a63cfe35154",
    (2, 1023): "e0a2f0e9e179f76b1f1722a6c355f319",
    (2, 1024): "fcc830bf666691eeb2ba1b8c04b266d6",
    (2, 1025): "4b5732f7cae92453c807051c0ce7e5ac",
    (2, 4095): "e64c02a527015c41ee6b9c7fbec85d30",
    (2, 4096): "53e8d21a7da90f198faa79d53ae58845",
    (2, 4097): "eceb287c3604ff6512067ac6f8cde32a",
    (2, 65536): "04d4d9e2ce96f9cad6f1557871797f15",
    (2, 65869): "3d170cd17e2eaba5b43c0996cf01b8d7",
}
# SHA-256 of the hash array of a 3 MiB + 12345 byte scan in 64 KiB blocks under KEY.
GOLDEN_SCAN = "b2165ba308dbcc7a3c16019abb000fe003219a0b100567d5ae48dc8413c89fc5"


@pytest.mark.parametrize("kernel", KERNELS)
def test_golden_hash_block(kernel):
    for (ki, n), want in GOLDEN.items():
        assert native.hash_block(data_for(n), KEYS[ki], kernel=kernel).hex() == want, (ki, n)


@pytest.mark.parametrize("kernel", KERNELS)
def test_golden_scan(kernel):
    z, h = scan(data_for(3 * 2**20 + 12345), 65536, kernel=kernel)
    assert z.shape == (49,) and not z.any()
    assert hashlib.sha256(h.astype("<u8").tobytes()).hexdigest() == GOLDEN_SCAN


# ---- an independent, slow Python model of docs/HASH.md -------------------------------------

P61 = 2**61 - 1
M32, M64 = 2**32 - 1, 2**64 - 1


def ref_key_table(key: bytes) -> bytes:
    label = b"pyvbak fast block hash v1 key table\x00"
    return b"".join(hashlib.sha256(label + key + i.to_bytes(4, "little")).digest() for i in range(35))


def ref_mix(x: int) -> int:
    c = 0xD6E8FEB86659FD93
    x ^= x >> 32
    x = (x * c) & M64
    x ^= x >> 32
    x = (x * c) & M64
    return x ^ (x >> 32)


def ref_hash(data: bytes, key: bytes) -> bytes:
    if not any(data):
        return bytes(16)
    kt = ref_key_table(key)
    k = struct.unpack("<272I", kt[:1088])
    r = [v & P61 for v in struct.unpack("<2Q", kt[1088:1104])]
    r = [0 if v == P61 else v for v in r]
    fin = struct.unpack("<2Q", kt[1104:1120])
    padded = data + bytes(-len(data) % 1024)
    h = [1, 1]
    for s in range(0, len(padded), 1024):
        m = struct.unpack("<256I", padded[s:s + 1024])
        for lane in range(2):
            acc = 0
            for u in range(16):
                for j in range(8):
                    a = (m[16 * u + j] + k[16 * u + j + 16 * lane]) & M32
                    b = (m[16 * u + j + 8] + k[16 * u + j + 8 + 16 * lane]) & M32
                    acc += a * b
            acc &= M64
            for limb in (acc & M32, acc >> 32):
                h[lane] = (h[lane] * r[lane] + limb) % P61
    out = b""
    for lane in range(2):
        for limb in (len(data) & M32, len(data) >> 32):
            h[lane] = (h[lane] * r[lane] + limb) % P61
        out += ref_mix((h[lane] + fin[lane]) & M64).to_bytes(8, "little")
    return out


@pytest.mark.parametrize("n", [1, 1023, 1024, 2049, 4096, 5000])
def test_matches_documented_construction(n):
    for key in (KEY, b"\xff" * 16):
        assert native.hash_block(data_for(n, b"ref"), key, kernel="scalar") == ref_hash(data_for(n, b"ref"), key)


def test_adversarial_matches_model():
    # data words = -key words (mod 2^32): every lane-0 factor is 0
    k = struct.unpack("<272I", ref_key_table(KEY)[:1088])
    data = struct.pack("<256I", *[(-w) & M32 for w in k[:256]]) * 2
    for kernel in KERNELS:
        assert native.hash_block(data, KEY, kernel=kernel) == ref_hash(data, KEY)


# ---- kernels agree with scalar ---------------------------------------------------------------

def adversarial_buffers():
    rng = np.random.default_rng(7)
    kt = np.frombuffer(native._key(KEY)[:1088], dtype="<u4")
    yield "ff", b"\xff" * (70 * KIB)
    yield "near2^32", (np.uint32(2**32 - 1) - rng.integers(0, 4, 17920, dtype=np.uint32)).tobytes()
    neg = (-kt[:256].astype(np.int64)) % 2**32  # m + k == 0 mod 2^32 in lane 0
    yield "negkey0", np.tile(neg.astype("<u4"), 70).tobytes()
    neg1 = (-kt[16:272].astype(np.int64)) % 2**32  # ... and in lane 1
    yield "negkey1", np.tile(neg1.astype("<u4"), 70).tobytes()
    yield "negkey-1", np.tile(((neg - 1) % 2**32).astype("<u4"), 70).tobytes()
    yield "random", rng.integers(0, 256, 70 * KIB, dtype=np.uint8).tobytes()
    sparse = np.zeros(70 * KIB, np.uint8)
    sparse[rng.integers(0, sparse.size, 50)] = 1
    yield "sparse", sparse.tobytes()


LENGTHS = sorted({n + d for n in (0, 1024, 2048, 4096, 8192, 65536) for d in (-65, -1, 0, 1, 3, 64)} - {-65, -1})


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "scalar"])
def test_kernels_equal_scalar(kernel):
    for name, data in adversarial_buffers():
        for off in (0, 1, 3, 17, 63):  # unaligned starts
            raw = bytearray(off + len(data))
            raw[off:] = data
            mv = memoryview(raw)[off:]
            for n in LENGTHS:
                if n > len(data):
                    continue
                want = native.hash_block(mv[:n], KEY, kernel="scalar")
                assert native.hash_block(mv[:n], KEY, kernel=kernel) == want, (name, off, n)
            for bs in (4096, 8192):
                zs, hs = scan(mv, bs, kernel="scalar")
                zk, hk = scan(mv, bs, kernel=kernel)
                assert np.array_equal(zs, zk) and np.array_equal(hs, hk), (name, off, bs)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=9000), key=st.binary(min_size=16, max_size=16))
def test_kernels_equal_scalar_random(data, key):
    want = native.hash_block(data, key, kernel="scalar")
    for kernel in KERNELS:
        assert native.hash_block(data, key, kernel=kernel) == want


# ---- block semantics ------------------------------------------------------------------------

def test_hash_block_is_scan_entry_and_little_endian():
    buf = data_for(3 * 4096 + 100)
    z, h = scan(buf)
    for i in range(4):
        assert native.hash_block(buf[i * 4096:(i + 1) * 4096], KEY) == h[i].astype("<u8").tobytes()


def test_zero_and_length():
    assert native.hash_block(b"", KEY) == bytes(16)
    assert native.hash_block(bytes(4096), KEY) == bytes(16)
    assert native.hash_block(bytes(100), KEY) == bytes(16)
    d = b"\x01" + bytes(99)
    assert native.hash_block(d, KEY) != native.hash_block(d + bytes(1), KEY)  # length counts
    assert native.hash_block(d, KEY) != native.hash_block(d + bytes(4096 - 100), KEY)
    assert native.hash_block(d, KEY) != native.hash_block(d, bytes(16))  # key counts


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_detection_exact(kernel):
    bs, size = 4096, 3 * 4096 + 100
    base = bytearray(size)
    z, h = scan(base, bs, kernel=kernel)
    assert z.tolist() == [1, 1, 1, 1] and not h.any()
    positions = sorted(set(range(0, size, 61)) | {0, 1, 4095, 4096, 8191, 12287, 12288, size - 2, size - 1})
    for pos in positions:
        for val in (0x01, 0x80):
            buf = bytearray(base)
            buf[pos] = val
            z, h = scan(buf, bs, kernel=kernel)
            blk = pos // bs
            assert z[blk] == 0 and h[blk].any(), pos
            assert z.sum() == 3 and not np.delete(h, blk, axis=0).any(), pos


def test_scan_buffer_inputs_any_buffer(tmp_path):
    data = data_for(20000)
    want = scan(data)
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        z, h = scan(buf)
        assert np.array_equal(h, want[1])
    z, h = scan(np.frombuffer(data[:16384], "<u4"))  # any itemsize: bytes are what count
    assert np.array_equal(h, want[1][:4])
    # arrays larger than needed: only the first entries are filled
    z, h = native.new_arrays(10)
    native.scan_buffer(data, 4096, KEY, z, h)
    assert np.array_equal(h[:5], want[1]) and not h[5:].any()


# ---- collisions -------------------------------------------------------------------------------

def hash_variants(base: np.ndarray, pos: np.ndarray, val: np.ndarray, batch: int = 32768) -> np.ndarray:
    """Hashes of copies of ``base`` with byte pos[i] set to val[i], scanned in batches."""
    n = pos.size
    hashes = np.empty((n, 2), np.uint64)
    blocks = np.empty((batch, base.size), np.uint8)
    for s in range(0, n, batch):
        e = min(n, s + batch)
        b = blocks[: e - s]
        b[:] = base
        b[np.arange(e - s), pos[s:e]] = val[s:e]
        z, h = native.new_arrays(e - s)
        native.scan_buffer(b, base.size, KEY, z, h)
        assert not z.any()
        hashes[s:e] = h
    return hashes


def assert_unique(hashes: np.ndarray) -> None:
    # each 64-bit word alone must already be collision-free (a stronger check than pairs)
    assert np.unique(hashes[:, 0]).size == hashes.shape[0]
    assert np.unique(hashes[:, 1]).size == hashes.shape[0]


def test_no_collision_single_byte_changes():
    """All 4096*255 = 1,044,480 single-byte changes (incl. all 32768 bit flips) of a random
    4 KiB block, plus the block itself: 1,044,481 distinct hashes."""
    base = np.frombuffer(data_for(4096, b"collision base"), np.uint8)
    pos = np.repeat(np.arange(4096), 255)
    val = base[pos] ^ np.tile(np.arange(1, 256, dtype=np.uint8), 4096)
    hashes = np.concatenate([hash_variants(base, pos, val), scan(base)[1]])
    assert hashes.shape[0] >= 10**6
    assert_unique(hashes)


def test_no_collision_one_nonzero_byte():
    """Near-zero blocks (one non-zero byte anywhere; every 4th value) all hash differently."""
    base = np.zeros(4096, np.uint8)
    pos = np.repeat(np.arange(4096), 64)
    val = np.tile(np.arange(1, 256, 4, dtype=np.uint8), 4096)
    assert_unique(hash_variants(base, pos, val))


# ---- changed_blocks ----------------------------------------------------------------------------

BS = 4096
KINDS = [bytes(BS), b"\x01" * BS, b"\x02" * BS, bytes(BS - 1) + b"\x03"]


def image(kinds, tail):
    return b"".join(KINDS[k] for k in kinds) + (KINDS[tail[0]][: tail[1]] if tail[1] else b"")


def brute_changed(old: bytes, new: bytes) -> list[int]:
    on, nn = -(-len(old) // BS), -(-len(new) // BS)
    out = []
    for i in range(nn):
        nb = new[i * BS:(i + 1) * BS]
        if i >= on:
            out.append(i)
            continue
        ob = old[i * BS:(i + 1) * BS]
        oz, nz = not any(ob), not any(nb)
        if oz != nz or (not nz and ob != nb):
            out.append(i)
    return out


img_st = st.tuples(
    st.lists(st.integers(0, 3), max_size=12),
    st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 100, 4095])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=img_st, new=img_st)
def test_changed_blocks_matches_brute_force(old, new):
    o, n = image(*old), image(*new)
    oz, oh = scan(o, BS)
    nz, nh = scan(n, BS)
    got = native.changed_blocks(oz, oh, len(o), nz, nh, len(n), BS)
    assert got.dtype == np.int64
    assert got.tolist() == brute_changed(o, n)


def test_changed_blocks_grow_shrink_examples():
    old = b"\x01" * BS * 2 + b"\x01" * 100
    new = b"\x01" * BS * 3 + bytes(BS)
    oz, oh = scan(old)
    nz, nh = scan(new)
    assert native.changed_blocks(oz, oh, len(old), nz, nh, len(new), BS).tolist() == [2, 3]
    assert native.changed_blocks(nz, nh, len(new), oz, oh, len(old), BS).tolist() == [2]
    assert native.changed_blocks(oz, oh, len(old), oz, oh, len(old), BS).tolist() == []
    e = native.new_arrays(0)
    assert native.changed_blocks(*e, 0, oz, oh, len(old), BS).tolist() == [0, 1, 2]
    assert native.changed_blocks(oz, oh, len(old), *e, 0, BS).tolist() == []


def test_changed_blocks_bad_lengths():
    oz, oh = scan(bytes(3 * BS))
    with pytest.raises(UsageError, match="old_zero has 3 entries.*12289"):
        native.changed_blocks(oz, oh, 3 * BS + 1, oz, oh, 3 * BS, BS)
    with pytest.raises(UsageError, match="new_hash has 2 rows"):
        native.changed_blocks(oz, oh, 3 * BS, oz, oh[:2].copy(), 3 * BS, BS)
    with pytest.raises(UsageError, match="new_zero has dtype int64"):
        native.changed_blocks(oz, oh, 3 * BS, oz.astype(np.int64), oh, 3 * BS, BS)


# ---- kernel selection --------------------------------------------------------------------------

def test_kernel_selection(monkeypatch):
    assert KERNELS[0] == "scalar" and set(KERNELS) <= {"scalar", "avx2", "avx512"}
    monkeypatch.delenv("PYVBAK_KERNEL", raising=False)
    assert native.selected_kernel() == KERNELS[-1]
    monkeypatch.setenv("PYVBAK_KERNEL", "scalar")
    assert native.selected_kernel() == "scalar"
    assert native.selected_kernel("avx2" if "avx2" in KERNELS else "scalar") != ""
    monkeypatch.setenv("PYVBAK_KERNEL", "neon")
    with pytest.raises(UsageError, match="unknown scan kernel 'neon'.*PYVBAK_KERNEL"):
        native.hash_block(b"x", KEY)
    with pytest.raises(UsageError, match="unknown scan kernel 'sse9'"):
        native.selected_kernel("sse9")


def test_forced_unsupported_kernel_raises(monkeypatch):
    monkeypatch.setattr(native, "available_kernels", lambda: ["scalar"])
    monkeypatch.setenv("PYVBAK_KERNEL", "avx512")
    with pytest.raises(UsageError, match="'avx512'.*not supported by this CPU"):
        native.scan_buffer(bytes(4096), 4096, KEY, *native.new_arrays(1))
    monkeypatch.delenv("PYVBAK_KERNEL")
    with pytest.raises(UsageError, match="not supported"):
        native.hash_block(b"x", KEY, kernel="avx2")
    assert native.selected_kernel() == "scalar"


# ---- bad arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("bs", [0, 1, 2048, 4095, 3 * 4096, 32 * 2**20, -4096, 2**30])
def test_bad_block_size(bs):
    with pytest.raises(UsageError, match=f"block size {bs} is invalid"):
        native.scan_buffer(bytes(8192), bs, KEY, *native.new_arrays(2))
    with pytest.raises(UsageError, match=f"block size {bs}"):
        native.block_count(100, bs)


@pytest.mark.parametrize("bs", ["4096", 4096.0, True, None])
def test_block_size_wrong_type(bs):
    with pytest.raises(UsageError, match="block size must be an integer"):
        native.block_count(100, bs)


@pytest.mark.parametrize("key", [b"", bytes(15), bytes(17), "0123456789abcdef", 5])
def test_bad_key(key):
    with pytest.raises(UsageError, match="key must be 16 bytes"):
        native.hash_block(b"abc", key)


def test_bad_arrays():
    buf = bytes(3 * 4096)
    z, h = native.new_arrays(3)
    cases = [
        (z[:2], h, "zero_out has 2 entries, needs at least 3"),
        (z.astype(np.int8), h, "zero_out has dtype int8"),
        (z, h.astype(np.int64), "hash_out has dtype int64"),
        (z, np.zeros((3, 3), np.uint64), r"hash_out has shape \(3, 3\)"),
        (z, np.zeros(6, np.uint64), r"hash_out has shape \(6,\)"),
        (np.zeros(6, np.uint8)[::2], h, "zero_out is not C-contiguous"),
        (z, np.zeros((3, 4), np.uint64)[:, :2], "hash_out is not C-contiguous"),
        ([0, 0, 0], h, "zero_out must be a numpy"),
    ]
    for zz, hh, msg in cases:
        with pytest.raises(UsageError, match=msg):
            native.scan_buffer(buf, 4096, KEY, zz, hh)
    ro = np.zeros(3, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(UsageError, match="zero_out is read-only"):
        native.scan_buffer(buf, 4096, KEY, ro, h)
    with pytest.raises(UsageError, match="buf is not a contiguous buffer"):
        native.scan_buffer(np.zeros((4096, 2), np.uint8)[:, 0], 4096, KEY, z, h)
    with pytest.raises(UsageError, match="buffer protocol"):
        native.scan_buffer("text", 4096, KEY, z, h)


def test_block_count_and_new_arrays():
    assert native.block_count(0, 4096) == 0
    assert native.block_count(1, 4096) == 1
    assert native.block_count(4096, 4096) == 1
    assert native.block_count(4097, 4096) == 2
    z, h = native.new_arrays(5)
    assert z.shape == (5,) and z.dtype == np.uint8 and not z.any() and z.flags.c_contiguous
    assert h.shape == (5, 2) and h.dtype == np.uint64 and h.flags.c_contiguous
    with pytest.raises(UsageError, match="size must be an integer from 0 to 2\\^63-1"):
        native.block_count(-1, 4096)
    assert native.KEY_BYTES == 16 and native.MIN_BLOCK_SIZE == 4096 and native.MAX_BLOCK_SIZE == 16 * 2**20


# ---- files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    size = 40 * 2**20 + 5000
    data = rng.integers(0, 256, size, dtype=np.uint8)
    for mib in range(0, 40, 3):
        data[mib * 2**20:(mib + 1) * 2**20] = 0  # written zeros, not holes
    path = tmp_path_factory.mktemp("img") / "disk.raw"
    path.write_bytes(data.tobytes())
    return path, data


@pytest.mark.parametrize("bs", [4096, 65536, 2**20])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_scan_file_equals_scan_buffer(image_file, bs, threads):
    path, data = image_file
    want = scan(data, bs)
    z, h = native.scan_file(path, bs, KEY, threads=threads)
    assert np.array_equal(z, want[0]) and np.array_equal(h, want[1])
    assert want[0].any() and not want[0].all()


@pytest.mark.parametrize("flags", [native.SCAN_PREAD, native.SCAN_NO_POPULATE, native.SCAN_NO_HOLES])
def test_scan_file_modes(image_file, flags):
    path, data = image_file
    want = scan(data, 65536)
    z, h = native.scan_file(str(path), 65536, KEY, threads=2, _flags=flags, _window=3 * 2**20)
    assert np.array_equal(z, want[0]) and np.array_equal(h, want[1])


def test_scan_file_fd_and_size(image_file):
    path, data = image_file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 12345, os.SEEK_SET)
        z, h = native.scan_file(fd, 4096, KEY, size=10 * 2**20 + 7)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 12345  # position restored
    finally:
        os.close(fd)
    want = scan(data[: 10 * 2**20 + 7], 4096)
    assert np.array_equal(z, want[0]) and np.array_equal(h, want[1])


def test_sparse_file_holes(tmp_path):
    path = tmp_path / "sparse.raw"
    size = 64 * 2**20 + 777
    pieces = {5 * 2**20 + 100: b"\x07" * 5000, 33 * 2**20: b"\x09" * 4096, size - 1: b"\x01"}
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in pieces.items():
            f.seek(off)
            f.write(b)
    z, h = native.scan_file(path, 4096, KEY)
    data = path.read_bytes()
    want = scan(data, 4096)
    assert np.array_equal(z, want[0]) and np.array_equal(h, want[1])
    nonzero = set(np.flatnonzero(z == 0).tolist())
    assert nonzero == {(5 * 2**20 + 100) // 4096, (5 * 2**20 + 5099) // 4096, 33 * 2**20 // 4096,
                       (size - 1) // 4096}
    assert not h[z == 1].any()


def test_empty_file(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    z, h = native.scan_file(p, 4096, KEY)
    assert z.shape == (0,) and h.shape == (0, 2)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(SourceError, match="cannot open image .*nope.raw"):
        native.scan_file(tmp_path / "nope.raw", 4096, KEY)
    with pytest.raises(SourceError, match="not a regular file or block device"):
        native.scan_file(tmp_path, 4096, KEY)
    with pytest.raises(UsageError, match="threads must be a positive integer, got 0"):
        native.scan_file(tmp_path / "x", 4096, KEY, threads=0)
    with pytest.raises(SourceError, match="file descriptor 9999"):
        native.scan_file(9999, 4096, KEY)


def test_file_shorter_than_stated_size(tmp_path):
    p = tmp_path / "short.raw"
    p.write_bytes(b"\x01" * 10000)
    with pytest.raises(SourceError, match=r"short.raw is shorter than the 1048576 bytes.*10000"):
        native.scan_file(p, 4096, KEY, size=2**20)


@pytest.mark.parametrize("threads", [1, 2])
def test_truncated_while_mapped(tmp_path, threads):
    """Test hook: the scanner truncates the file right after mapping its window, so the
    scan touches vanished pages (SIGBUS) deterministically; it must raise, not crash."""
    p = tmp_path / "trunc.raw"
    p.write_bytes(b"\x05" * (8 * 2**20))
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(SourceError, match=r"file descriptor \d+ was truncated while being scanned"):
            native.scan_file(fd, 65536, KEY, threads=threads, _flags=native.SCAN_TEST_TRUNCATE)
    finally:
        os.close(fd)
    # the process is fine afterwards, and SIGBUS is usable again
    p.write_bytes(b"\x05" * (8 * 2**20))
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(SourceError, match="truncated"):
            native.scan_file(fd, 65536, KEY, threads=1, _flags=native.SCAN_TEST_TRUNCATE)
    finally:
        os.close(fd)
    z, h = native.scan_file(p, 65536, KEY)
    assert z.shape == (0,) or z.all()


@pytest.mark.parametrize("bs", [4096, 65536])
def test_scan_fd_range_windows_equal_whole_scan(image_file, bs):
    """Windows of any size (the engine's jobs), including a partial last block, fill the
    same entries a whole-buffer scan does."""
    path, data = image_file
    want = scan(data, bs)
    n = len(want[0])
    z, h = native.new_arrays(n)
    fd = os.open(path, os.O_RDONLY)
    try:
        for window in (1, 7, 3 * 2**20 // bs, 2**30):
            z[:], h[:] = 9, 9
            for a in range(0, n, window):
                b = min(a + window, n)
                native.scan_fd_range(fd, a * bs, min(b * bs, len(data)) - a * bs, bs, KEY, z[a:b], h[a:b])
            assert np.array_equal(z, want[0]) and np.array_equal(h, want[1])
    finally:
        os.close(fd)


def test_scan_fd_range_errors(tmp_path):
    p = tmp_path / "r.raw"
    p.write_bytes(b"\x03" * 20000)
    z, h = native.new_arrays(8)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(UsageError, match="offset 100 is not a multiple of the block size 4096"):
            native.scan_fd_range(fd, 100, 4096, 4096, KEY, z, h)
        with pytest.raises(UsageError, match="zero_out has 8 entries, needs at least 9"):
            native.scan_fd_range(fd, 0, 9 * 4096, 4096, KEY, z, h)
        with pytest.raises(SourceError, match=r"disk r.raw is shorter than the 32768 bytes.*20000"):
            native.scan_fd_range(fd, 0, 8 * 4096, 4096, KEY, z, h, name="disk r.raw")
        native.scan_fd_range(fd, 4096, 0, 4096, KEY, z[:0], h[:0])  # empty range: nothing to do
    finally:
        os.close(fd)


# ---- gather_into (the local backend's O_DIRECT staging copy) -------------------------------

def test_gather_into_copies_back_to_back():
    parts = [b"abc", memoryview(b"xdefg")[1:], b"", bytearray(b"h" * 5000), np.arange(3, dtype=np.uint8)]
    dst = bytearray(6000)
    n = native.gather_into(dst, parts)
    want = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert n == len(want) and bytes(dst[:n]) == want and not any(dst[n:])
    assert native.gather_into(dst, []) == 0


def test_gather_into_refuses_overflow_and_readonly():
    with pytest.raises(UsageError, match="do not fit in a 4-byte buffer"):
        native.gather_into(bytearray(4), [b"abc", b"de"])
    with pytest.raises(UsageError, match="writable buffer"):
        native.gather_into(b"immutable", [b"x"])


# -- argument checks once missing (each once reached C with bad memory) ---------------

def test_sha256_blocks_bounds_cannot_wrap():
    """offs + lens past 2^63 wrapped negative and passed the check: the SHA-NI kernel then
    read far outside the buffer (a segfault)."""
    for kernel in native.available_sha256_kernels():
        for offs, lens in (([2**62], [2**62]), ([4096], [2**63 - 1]), ([1], [4096])):
            with pytest.raises(UsageError, match="outside the 4096-byte buffer"):
                native.sha256_blocks(bytes(4096), np.array(offs), np.array(lens), kernel=kernel)
        with pytest.raises(UsageError, match="integers"):
            native.sha256_blocks(bytes(4096), [2**64], [0], kernel=kernel)


def test_misaligned_arrays_are_refused():
    """C reads and writes the arrays as uint64_t: a view at an odd byte offset is UB."""
    h = np.zeros(49, np.uint8)[1:].view(np.uint64).reshape(3, 2)
    assert not h.flags.aligned and h.flags.c_contiguous
    with pytest.raises(UsageError, match="not aligned"):
        native.scan_buffer(b"\x01" * 10000, 4096, KEY, np.zeros(3, np.uint8), h)


def test_scan_fd_range_end_past_2_63_is_refused(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x01" * 16384)
    z, h = np.full(2, 7, np.uint8), np.full((2, 2), 7, np.uint64)
    with open(p, "rb") as f:
        with pytest.raises(UsageError):  # it returned success without writing its outputs
            native.scan_fd_range(f.fileno(), 2**64 - 4096, 8192, 4096, KEY, z, h)
        with pytest.raises(UsageError, match="past 2\\^63-1"):
            native.scan_fd_range(f.fileno(), 2**63 - 4096, 8192, 4096, KEY, z, h)
        with pytest.raises(UsageError, match="file descriptor"):
            native.scan_fd_range("3", 0, 8192, 4096, KEY, z, h)


def test_gather_into_refuses_overlap_and_odd_sources():
    b = bytearray(range(256)) * 16
    with pytest.raises(UsageError, match="overlaps"):
        native.gather_into(b, [memoryview(b)[1:2000]])
    assert native.gather_into(b, [memoryview(b)[2000:3000]]) == 1000  # beside what is written: fine
    with pytest.raises(UsageError):
        native.gather_into(bytearray(100), [np.zeros((4, 4), np.uint8)[:, 1]])  # not contiguous


def test_sha256_many_takes_any_iterable_and_refuses_the_same_things_on_every_kernel():
    data = [b"a", b"bc" * 1000, b""]
    want = [__import__("hashlib").sha256(d).digest() for d in data]
    for kernel in native.available_sha256_kernels():
        assert native.sha256_many((d for d in data), kernel=kernel) == want
        with pytest.raises(UsageError):
            native.sha256_many(["text"], kernel=kernel)


def test_scan_file_restores_the_descriptor_position_on_errors_too(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x01" * 8192)
    with open(p, "rb") as f:
        os.lseek(f.fileno(), 123, os.SEEK_SET)
        with pytest.raises(Exception):
            native.scan_file(f.fileno(), 4096, KEY, size=1 << 20)  # longer than the file
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 123
