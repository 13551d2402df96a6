"""The native decode kernel (csrc/decode.c) against its reference (reader.py's python path).

Restore and verify decide with one of them whether a stored block is intact; the two must
take the same decision for every frame (a kernel that accepted what the reference rejects
would restore damage; one that rejected good frames would fail restores), and produce the
same bytes.  Frames of every shape pyvbak or another zstd writer could produce are covered,
and random damage to them.
"""

from __future__ import annotations

import hashlib
import os

from types import SimpleNamespace

import numpy as np
import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from images import BS, MiB, backup_file, make_image, random_bytes, restore_to, same_file, text_bytes
from pyvbak import native
from pyvbak.errors import IntegrityError, UsageError
from pyvbak.repo import format as fmt
from pyvbak.repo.reader import BlockDecoder, ScratchSink, read_blocks, sort_for_reading
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository

KERNELS = native.available_decode_kernels()
OK, CORRUPT, MISMATCH = native.DECODE_OK, native.DECODE_CORRUPT, native.DECODE_MISMATCH
needs_native = pytest.mark.skipif("native" not in KERNELS,
                                  reason="no libzstd.so.1 or no SHA extensions here: only the reference runs")


def sha(data) -> bytes:
    return hashlib.sha256(data).digest()


def decode_all(kernel: str, frames: list[bytes], ulens: list[int], digests: list[bytes]):
    """(statuses, decoded bytes of the good blocks) with ``kernel``, frames packed into
    one source buffer as in a pack."""
    src = b"".join(frames)
    src_off = np.cumsum([0] + [len(f) for f in frames[:-1]]).astype(np.int64)
    src_len = np.array([len(f) for f in frames], np.int64)
    ul = np.array(ulens, np.int64)
    dst_off = np.cumsum([0] + ulens[:-1]).astype(np.int64)
    dst = bytearray(max(1, sum(ulens)))
    dig = np.frombuffer(b"".join(digests), "S32")
    status = BlockDecoder(kernel).decode_into(src, src_off, src_len, dst, dst_off, ul, dig)
    good = [bytes(dst[o : o + u]) if s == OK else None for s, o, u in zip(status.tolist(), dst_off.tolist(), ulens)]
    return status.tolist(), good


def frame_cases():
    """(name, frame, ulen, digest, expected status)."""
    text, rnd = text_bytes(BS, seed=1), random_bytes(BS, seed=2)
    big = text_bytes(256 * 1024, seed=3) + random_bytes(256 * 1024, seed=4)  # several zstd blocks
    c1 = zstandard.ZstdCompressor(level=1, write_checksum=True)
    c19 = zstandard.ZstdCompressor(level=19, write_checksum=False)
    nosize = zstandard.ZstdCompressor(level=1, write_content_size=False)
    cases = [
        ("text level 1", c1.compress(text), BS, sha(text), OK),
        ("text level 19, no checksum", c19.compress(text), BS, sha(text), OK),
        ("random: one raw block", c1.compress(rnd), BS, sha(rnd), OK),
        ("random, no checksum", c19.compress(rnd), BS, sha(rnd), OK),
        ("multi-block frame", c1.compress(big), len(big), sha(big), OK),
        ("short block", c1.compress(b"x" * 100), 100, sha(b"x" * 100), OK),
        ("trailing bytes after the frame", c1.compress(text) + b"junk", BS, sha(text), OK),
        ("two frames", c1.compress(text) + c1.compress(rnd), BS, sha(text), OK),
        ("wrong digest", c1.compress(text), BS, sha(rnd), MISMATCH),
        ("declares another size", c1.compress(text), BS - 1, sha(text[:-1]), MISMATCH),
        ("raw frame, another size", c1.compress(rnd), BS + 1, sha(rnd), MISMATCH),
        ("no content size in the header", nosize.compress(text), BS, sha(text), CORRUPT),
        ("truncated", c1.compress(text)[:-10], BS, sha(text), CORRUPT),
        ("truncated raw frame", c1.compress(rnd)[:-10], BS, sha(rnd), CORRUPT),
        ("not zstd at all", random_bytes(500, seed=5), BS, sha(text), CORRUPT),
        ("empty", b"", BS, sha(text), CORRUPT),
        ("zstd magic and zeros", b"\x28\xb5\x2f\xfd" + bytes(20), BS, sha(text), CORRUPT),
        # a skippable frame declares no content: size 0 is not the block's size
        ("skippable frame", b"\x50\x2a\x4d\x18" + (16).to_bytes(4, "little") + bytes(16), BS, sha(text), MISMATCH),
    ]
    bad_sum = bytearray(c1.compress(text))
    bad_sum[-1] ^= 1
    cases.append(("compressed, checksum wrong", bytes(bad_sum), BS, sha(text), CORRUPT))
    raw_bad_sum = bytearray(c1.compress(rnd))
    raw_bad_sum[-1] ^= 1
    # raw content is taken as is (reader.raw_frame_content); the SHA-256 proves it intact
    cases.append(("raw, checksum wrong, content intact", bytes(raw_bad_sum), BS, sha(rnd), OK))
    raw_bad_byte = bytearray(c1.compress(rnd))
    raw_bad_byte[len(raw_bad_byte) // 2] ^= 1
    cases.append(("raw, a content byte flipped", bytes(raw_bad_byte), BS, sha(rnd), MISMATCH))
    return cases


CASES = frame_cases()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_frame_shape_gets_the_same_decision(kernel, case):
    _, frame, ulen, digest, want = case
    status, good = decode_all(kernel, [frame], [ulen], [digest])
    assert status == [want]
    if want == OK:
        assert sha(good[0]) == digest


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_batch_reports_each_block_in_place(kernel):
    # all cases in one call, in one source buffer: a bad block must not disturb its neighbours
    status, good = decode_all(kernel, [c[1] for c in CASES], [c[2] for c in CASES], [c[3] for c in CASES])
    assert status == [c[4] for c in CASES]
    for (_, _, _, digest, want), data in zip(CASES, good):
        assert (data is not None) == (want == OK) and (data is None or sha(data) == digest)


def _lanes_alone_available() -> bool:
    return bool(native.lib.pv_sha256_kernels() >> native.lib.PV_SHA_X16_ALONE & 1)


@needs_native
@pytest.mark.parametrize("sha_kernel", [k for k in native.available_sha256_kernels() if k != "hashlib"]
                         + (["avx512-alone"] if _lanes_alone_available() else []))
def test_each_sha256_kernel_checks_every_block_of_a_long_batch_in_place(monkeypatch, sha_kernel):
    # The native kernel checks blocks in groups (two for SHA-NI, sixteen for the AVX-512
    # lanes): a bad block in any lane of a group, or a group that is short or cut by a
    # length change, must not change its neighbours' decisions.  "avx512-alone": the lanes
    # as a CPU with AVX-512 and no SHA extensions runs them (every group, short or not).
    if sha_kernel == "avx512-alone":
        monkeypatch.setattr(native, "_decode_sha_kernel", lambda: native.lib.PV_SHA_X16_ALONE)
    else:
        monkeypatch.setenv("PYVBAK_SHA256", sha_kernel)
    c1 = zstandard.ZstdCompressor(level=1, write_checksum=True)
    blocks = [text_bytes(4096, seed=i) if i % 3 else random_bytes(4096, seed=i) for i in range(45)]
    blocks[20] = blocks[20][:1000]  # a length change inside what would be one group
    frames = [c1.compress(b) for b in blocks]
    digests = [sha(b) for b in blocks]
    want = [OK] * len(blocks)
    for i in (0, 9, 15, 31):
        digests[i] = sha(b"another block")
        want[i] = MISMATCH
    for i in (16, 44):
        frames[i] = b"\x28\xb5\x2f\xfd" + bytes(20)
        want[i] = CORRUPT
    status, good = decode_all("native", frames, [len(b) for b in blocks], digests)
    assert status == want
    assert all(g == b for g, b, w in zip(good, blocks, want) if w == OK)


@needs_native
@pytest.mark.skipif(not _lanes_alone_available(), reason="needs AVX-512 (the lanes alone)")
@pytest.mark.parametrize("n,native_called", [(1, False), (8, False), (9, True), (20, True)])
def test_with_the_lanes_alone_a_short_batch_goes_the_reference_way(monkeypatch, n, native_called):
    # Without SHA extensions a group of fewer than 9 blocks costs the lanes as much as
    # sixteen: such a batch is decoded by python-zstandard and hashed by hashlib.
    monkeypatch.setattr(native, "_decode_sha_kernel", lambda: native.lib.PV_SHA_X16_ALONE)
    calls = []
    real = native.decode_blocks_into
    monkeypatch.setattr(native, "decode_blocks_into", lambda *a: calls.append(1) or real(*a))
    c1 = zstandard.ZstdCompressor(level=1, write_checksum=True)
    blocks = [text_bytes(4096, seed=i) for i in range(n)]
    digests = [sha(b) for b in blocks]
    digests[-1] = sha(b"another block")
    status, good = decode_all("native", [c1.compress(b) for b in blocks], [4096] * n, digests)
    assert status == [OK] * (n - 1) + [MISMATCH]
    assert good[:-1] == blocks[:-1]
    assert bool(calls) == native_called


@needs_native
def test_native_is_the_default_where_it_runs(monkeypatch):
    monkeypatch.delenv("PYVBAK_DECODE", raising=False)
    assert native.selected_decode_kernel() == "native" and BlockDecoder().kernel == "native"
    assert native.zstd_library_version() >= 10400


def zstd_libraries_disagree(frame: bytes) -> bool:
    """Whether python-zstandard's bundled zstd (the reference's) and the system libzstd.so.1
    (the kernel's) decode the first frame of ``frame`` differently: one refuses it, or they
    give other bytes.  Releases differ on frames no encoder writes: zstd 1.5.7 refuses a
    set reserved bit in a sequences section's Symbol_Compression_Modes byte, 1.5.4 ignores it."""
    import ctypes

    lib = ctypes.CDLL("libzstd.so.1")
    lib.ZSTD_findFrameCompressedSize.restype = lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
    size = lib.ZSTD_getFrameContentSize(frame, ctypes.c_size_t(len(frame)))
    fsz = lib.ZSTD_findFrameCompressedSize(frame, ctypes.c_size_t(len(frame)))
    sys_out = None
    if size < 2**63 and not lib.ZSTD_isError(ctypes.c_size_t(fsz)):
        buf = ctypes.create_string_buffer(max(1, size))
        got = lib.ZSTD_decompress(buf, ctypes.c_size_t(size), frame, ctypes.c_size_t(fsz))
        sys_out = None if lib.ZSTD_isError(ctypes.c_size_t(got)) else buf.raw[:got]
    try:
        py_out = zstandard.ZstdDecompressor().decompress(frame)
    except zstandard.ZstdError:
        py_out = None
    return sys_out != py_out


@needs_native
@settings(max_examples=150, deadline=None)
@given(case=st.integers(0, len(CASES) - 1), flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 2**31)))
@example(case=5, flips=[(13, 1)], cut=None)  # a reserved bit: zstd 1.5.4 decodes the block, 1.5.7 refuses
def test_random_damage_gets_the_same_decision_from_both_kernels(case, flips, cut):
    """Same status and bytes from both kernels - except where the two zstd libraries
    themselves disagree about the frame (each kernel decodes with its own): then any block
    a kernel accepts is still exactly the original, its SHA-256 proves it."""
    _, frame, ulen, digest, _ = CASES[case]
    damaged = bytearray(frame)
    for pos, mask in flips:
        if damaged:
            damaged[pos % len(damaged)] ^= mask
    if cut is not None and damaged:
        del damaged[cut % len(damaged):]
    ref = decode_all("python", [bytes(damaged)], [ulen], [digest])
    got = decode_all("native", [bytes(damaged)], [ulen], [digest])
    for status, good in (ref, got):
        assert status != [OK] or sha(good[0]) == digest
    if got != ref:
        assert zstd_libraries_disagree(bytes(damaged)), (got[0], ref[0])


@needs_native
def test_bad_arguments_are_refused_before_c_sees_them():
    ctx = native.new_decode_context()
    frame = zstandard.ZstdCompressor().compress(b"a" * 1000)
    dst = bytearray(2000)
    dig = np.frombuffer(sha(b"a" * 1000), "S32")

    def call(src=frame, so=(0,), sl=(len(frame),), d=dst, do=(0,), ul=(1000,), digests=dig):
        return native.decode_blocks_into(ctx, src, np.array(so), np.array(sl), d, np.array(do), np.array(ul), digests)

    assert call().tolist() == [OK]
    with pytest.raises(UsageError, match="outside the .*source"):
        call(sl=(len(frame) + 1,))
    with pytest.raises(UsageError, match="outside the .*source"):
        call(so=(2**63 - 1,), sl=(2,))
    with pytest.raises(UsageError, match="outside the .*destination"):
        call(do=(1001,))
    with pytest.raises(UsageError, match="outside the .*destination"):
        call(do=(-1,))
    with pytest.raises(UsageError, match="overlap"):
        call(so=(0, 0), sl=(len(frame),) * 2, do=(0, 999), ul=(1000, 1000), digests=np.frombuffer(dig.tobytes() * 2, "S32"))
    with pytest.raises(UsageError, match="digests"):
        call(digests=b"short")
    for bad in ({"so": (0.7,)}, {"sl": (float(len(frame)),)}, {"do": (True,)}, {"ul": ("1000",)}):
        with pytest.raises(UsageError, match="integers"):  # not truncated to an offset silently
            call(**bad)
    with pytest.raises(UsageError, match="writable"):
        call(d=bytes(2000))
    shared = bytearray(frame + bytes(2000))
    with pytest.raises(UsageError, match="overlaps the source"):
        native.decode_blocks_into(ctx, memoryview(shared)[: len(frame)], np.array([0]), np.array([len(frame)]),
                                  memoryview(shared)[len(frame) - 1 :], np.array([0]), np.array([1000]), dig)


def test_forced_kernels_are_checked(monkeypatch):
    monkeypatch.setenv("PYVBAK_DECODE", "lz4")
    with pytest.raises(UsageError, match="unknown decode kernel 'lz4'.*PYVBAK_DECODE"):
        BlockDecoder()
    monkeypatch.delenv("PYVBAK_DECODE")
    monkeypatch.setattr(native, "decode_kernel_available", lambda: False)
    with pytest.raises(UsageError, match="'native'.*not supported"):
        BlockDecoder("native")
    assert BlockDecoder().kernel == "python"  # the reference, where the kernel cannot run


@needs_native
def test_the_c_entry_points_refuse_a_sha256_kernel_number_they_do_not_have():
    # Python never passes one, but C must not shift by it (undefined behaviour) or accept
    # a number that aliases a real kernel and then compare digests it never computed.
    lib, ffi = native.lib, native.ffi
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b"x" * 4096)
    dst, status = bytearray(4096), bytearray(1)
    arg = lambda v: ffi.new("int64_t[]", [v])  # noqa: E731
    uarg = lambda v: ffi.new("uint64_t[]", [v])  # noqa: E731
    dctx = native.new_decode_context()
    for kernel in (-1, 0, 4, 31, 33, 34, 35, 40, 2**31 - 1):
        rc = lib.pv_decode_blocks(dctx, frame, arg(0), uarg(len(frame)), ffi.from_buffer(dst), arg(0), uarg(4096),
                                  sha(b"x" * 4096), 1, ffi.from_buffer(status), kernel)
        assert rc == lib.PV_ERR_KERNEL, kernel
        rc = lib.pv_sha256_blocks(b"x" * 64, arg(0), uarg(64), 1, ffi.from_buffer(bytearray(32)), kernel)
        assert rc == lib.PV_ERR_KERNEL, kernel
    mask = lib.pv_sha256_kernels()
    for kernel in (lib.PV_SHA_NI, lib.PV_SHA_X16, lib.PV_SHA_X16_ALONE):  # each where this CPU has it
        dst[:], status[:] = bytes(4096), b"\xff"
        rc = lib.pv_decode_blocks(dctx, frame, arg(0), uarg(len(frame)), ffi.from_buffer(dst), arg(0), uarg(4096),
                                  sha(b"x" * 4096), 1, ffi.from_buffer(status), kernel)
        if mask >> kernel & 1:
            assert rc == 1 and status[0] == OK and bytes(dst) == b"x" * 4096, kernel
        else:
            assert rc == lib.PV_ERR_KERNEL, kernel


# -- restore and verify with each kernel ---------------------------------------------------


def dedup_image(path) -> str:
    """Text, random and zero extents, the same block at several places (dedup inside the
    disk, also inside one staged run) and a partial last block."""
    size = 40 * BS + 1234
    make_image(path, size, [(0, 12 * BS, "text"), (12 * BS, 8 * BS, "random"), (30 * BS, 10 * BS + 1234, "text")], seed=7)
    same = random_bytes(BS, seed=9)
    with open(path, "r+b") as f:
        for i in (3, 4, 21, 22, 25, 33):
            f.seek(i * BS)
            f.write(same)
    return os.fspath(path)


def nonzero_blocks(path) -> list[bytes]:
    with open(path, "rb") as f:
        blocks = iter(lambda: f.read(BS), b"")
        return [b for b in blocks if b.count(0) != len(b)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("direct", ["1", "0"])
def test_restore_is_the_image_with_each_kernel(repo, tmp_path, monkeypatch, kernel, direct):
    monkeypatch.setenv("PYVBAK_DECODE", kernel)
    monkeypatch.setenv("PYVBAK_RESTORE_DIRECT", direct)
    img = dedup_image(tmp_path / "d.img")
    sid = backup_file(repo, img).snapshot_id
    out = tmp_path / "out.img"
    result = restore_to(repo, sid, out)
    assert same_file(img, out)
    assert result["bytes_written"] == sum(map(len, nonzero_blocks(img)))  # zero blocks are holes, not writes


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_damaged_block_fails_restore_and_verify_with_each_kernel(repo, tmp_path, monkeypatch, kernel):
    monkeypatch.setenv("PYVBAK_DECODE", kernel)
    img = dedup_image(tmp_path / "d.img")
    sid = backup_file(repo, img).snapshot_id
    clean = verify_repository(repo, threads=2).report
    unique = set(nonzero_blocks(img))
    assert clean["ok"] and clean["blocks_checked"] == len(unique) and clean["bytes_checked"] == sum(map(len, unique))
    pack = next(n for n in repo.pack_object_names())
    path = os.path.join(repo.location, pack)
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="restore of snapshot .* failed: block in pack .*(corrupt frame|does not match)"):
        restore_to(repo, sid, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    report = verify_repository(repo, threads=2).report
    assert not report["ok"] and report["problem_count"] == 1 and report["blocks_checked"] == len(unique) - 1


def test_both_kernels_restore_the_same_bytes(repo, tmp_path, monkeypatch):
    img = make_image(tmp_path / "v.img", 4 * MiB, [(0, 2 * MiB, "text"), (2 * MiB, MiB, "random")], seed=3)
    sid = backup_file(repo, img).snapshot_id
    outs = []
    for kernel in KERNELS:
        monkeypatch.setenv("PYVBAK_DECODE", kernel)
        outs.append(tmp_path / f"out-{kernel}.img")
        restore_to(repo, sid, outs[-1])
    assert all(same_file(img, o) for o in outs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_record_claiming_more_than_a_block_is_reported_not_followed(repo, tmp_path, kernel):
    """A damaged pack index could name a size no block has: it must be a bad block, not
    room to write past the decode buffer."""
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "text")], seed=2)
    backup_file(repo, img)
    recs = repo.load_digest_index().records_at(np.arange(4))
    recs = recs[sort_for_reading(recs)].copy()
    recs["ulen"][1] = 2**31
    seen, errors = [], []

    def on_blocks(k, buf, offsets, ulens, ok):
        seen.extend(k + i for i in np.flatnonzero(ok).tolist())

    read_blocks(repo, recs, ScratchSink(on_blocks, lambda k, r: errors.append((k, r)), block_size=BS), threads=1, kernel=kernel)
    assert sorted(seen) == [0, 2, 3]
    assert errors == [(1, errors[0][1])] and "does not match its digest" in errors[0][1]


@pytest.mark.parametrize("kernel", KERNELS)
def test_blocks_at_several_places_survive_their_staging_buffer_going_to_a_writer(repo, tmp_path, monkeypatch, kernel):
    """Blocks are decoded straight into a staging run; a block that also belongs elsewhere
    is written there from a copy.  Once a run is handed to a writer its buffer may be
    reused at any moment: here a handed-on buffer is overwritten at once, so reading any
    block from it afterwards would restore garbage."""
    from pyvbak.repo import restore as restore_mod

    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT here: nothing is staged")
    monkeypatch.setenv("PYVBAK_DECODE", kernel)
    blocks = [random_bytes(BS, seed=20 + i) for i in range(6)]
    img = tmp_path / "d.img"
    make_image(img, 16 * BS, [(i * BS, BS, b) for i, b in enumerate(blocks)] + [(10 * BS, BS, blocks[0]), (11 * BS, BS, blocks[1]),
                                                                                 (13 * BS, BS, blocks[1])])
    sid = backup_file(repo, img).snapshot_id

    def submit_then_reuse(self, stage):
        if stage.fill:
            buf, fill, offset = stage.buf, stage.fill, stage.offset
            stage.buf, stage.fill = None, 0
            self._write_run(buf, fill, offset)  # written, and back in the pool...
            buf[:] = b"\xaa" * len(buf)  # ...where the next run overwrites it

    monkeypatch.setattr(restore_mod._Target, "_submit", submit_then_reuse)
    out = tmp_path / "out.img"
    result = restore_mod.restore_snapshot(repo, repo.resolve(sid), os.fspath(out), threads=1)
    assert result["write_mode"] == "direct"
    assert same_file(img, out)


# -- a second copy of a block saves the restore -------------------------------------------


def second_copies(repo) -> None:
    """A second copy of every stored block in a pack of its own, as two backups storing
    the same blocks at the same time leave."""
    from pyvbak.repo.packer import PackWriter

    writer = PackWriter(repo.backend, 1 << 30)
    for r in repo.load_digest_index().records:
        writer.add(bytes(r["digest"]), repo.read_block_frame(r), int(r["ulen"]))
    repo.write_pack_index(writer.finish())


def damage_chosen_copy(repo, digest: bytes) -> None:
    """Flip a byte inside the frame of the copy restore reads first."""
    index = repo.load_digest_index()
    rec = index.records_at([index.find(digest)])[0]
    path = os.path.join(repo.location, fmt.pack_name(bytes(rec["pack"]).hex()))
    with open(path, "r+b") as f:
        f.seek(int(rec["offset"]) + int(rec["clen"]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x55]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_damaged_copy_is_restored_from_another_one(repo, tmp_path, monkeypatch, kernel):
    monkeypatch.setenv("PYVBAK_DECODE", kernel)
    img = dedup_image(tmp_path / "d.img")
    sid = backup_file(repo, img).snapshot_id
    second_copies(repo)
    repo = Repository.open(repo.location)
    victims = [sha(nonzero_blocks(img)[1]), sha(random_bytes(BS, seed=9))]  # the second: at six places
    for d in victims:
        damage_chosen_copy(repo, d)
    out = tmp_path / "out.img"
    report = restore_to(repo, sid, out)
    assert same_file(img, out) and report["blocks_from_other_copies"] == 2
    assert report["bytes_written"] == sum(map(len, nonzero_blocks(img)))


def test_without_an_intact_copy_the_restore_fails(repo, tmp_path):
    img = dedup_image(tmp_path / "d.img")
    sid = backup_file(repo, img).snapshot_id
    second_copies(repo)
    repo = Repository.open(repo.location)
    victim = sha(nonzero_blocks(img)[1])
    damage_chosen_copy(repo, victim)
    index = repo.load_digest_index()
    for rec in index.copies(victim):  # the other copy too
        if bytes(rec["pack"]) != bytes(index.records_at([index.find(victim)])[0]["pack"]):
            with open(os.path.join(repo.location, fmt.pack_name(bytes(rec["pack"]).hex())), "r+b") as f:
                f.seek(int(rec["offset"]) + 5)
                f.write(b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="1 bad block"):
        restore_to(repo, sid, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_the_cli_says_which_blocks_came_from_another_copy(repo, tmp_path, capsys):
    from pyvbak.cli.main import main

    img = dedup_image(tmp_path / "d.img")
    sid = backup_file(repo, img).snapshot_id
    second_copies(repo)
    damage_chosen_copy(Repository.open(repo.location), sha(nonzero_blocks(img)[0]))
    capsys.readouterr()
    code = main(["restore", sid, str(tmp_path / "out.img"), "--repo", repo.location])
    err = capsys.readouterr().err
    assert code == 0 and same_file(img, tmp_path / "out.img")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 block(s) of snapshot") and "verify --repair" in lines[0]


# -- one bad record costs its own block, not the good frames read in the same range --------


def one_pack_of_text_blocks(repo, tmp_path, n=8):
    """An image of ``n`` compressible blocks in one pack; (snapshot id, image, the pack's
    path, its records in reading order)."""
    img = make_image(tmp_path / "d.img", n * BS, [(0, n * BS, "text")], seed=2)
    sid = backup_file(repo, img).snapshot_id
    recs = repo.load_digest_index().records_at(np.arange(n))
    recs = recs[sort_for_reading(recs)].copy()
    assert len({bytes(p) for p in recs["pack"]}) == 1
    return sid, img, os.path.join(repo.location, fmt.pack_name(bytes(recs["pack"][0]).hex())), recs


class RangeSpy:
    """Wraps a backend; the largest range read_blocks asks for."""

    def __init__(self, inner):
        self.inner, self.largest = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_range_into(self, name, offset, buf):
        self.largest = max(self.largest, len(buf))
        return self.inner.read_range_into(name, offset, buf)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("damage", ["clen 4 GiB", "clen past the end", "offset past the end"])
def test_a_damaged_record_fails_alone_not_its_range(repo, tmp_path, monkeypatch, kernel, damage):
    """Records of one pack are read with one range read: a record whose frame lies past
    the pack's end made that read fail, and every good frame of the range was reported
    unreadable with it (verify --repair then dropped their index records)."""
    _, _, pack_path, recs = one_pack_of_text_blocks(repo, tmp_path)
    pack_size = os.path.getsize(pack_path)
    if damage == "clen 4 GiB":
        recs["clen"][3] = 2**32 - 1
    elif damage == "clen past the end":
        recs["clen"][3] = pack_size
    else:
        recs["offset"][7] = pack_size - 10
    spy = RangeSpy(repo.backend)
    monkeypatch.setattr(repo, "backend", spy)
    seen, errors = [], []

    def on_blocks(k, buf, offsets, ulens, ok):
        seen.extend(k + i for i in np.flatnonzero(ok).tolist())

    read_blocks(repo, recs, ScratchSink(on_blocks, lambda k, r: errors.append(k), block_size=BS), threads=2, kernel=kernel)
    bad = 7 if damage == "offset past the end" else 3
    assert sorted(seen) == [k for k in range(8) if k != bad] and errors == [bad]
    assert spy.largest <= 16 * MiB  # no 4 GiB buffer for a record that claims 4 GiB


def test_a_pack_cut_short_loses_only_the_frames_past_its_end(repo, tmp_path):
    """A pack truncated by a storage fault: verify names the frames that are gone, counts
    the others as checked, and --repair drops only the lost ones' records."""
    _, _, pack_path, recs = one_pack_of_text_blocks(repo, tmp_path)
    cut = int(recs["offset"][5]) + int(recs["clen"][5]) // 2  # inside frame 5: frames 5, 6, 7 are gone
    os.chmod(pack_path, 0o644)
    os.truncate(pack_path, cut)
    verified = verify_repository(repo, threads=2)
    report = verified.report
    assert report["problem_count"] == 3 and report["blocks_checked"] == 5
    assert sorted(d for d, *_ in verified.findings.bad_copies) == sorted(bytes(d) for d in recs["digest"][5:])


def test_a_store_that_fails_every_read_is_not_asked_frame_by_frame(repo, tmp_path):
    """After a failed range read each frame is read alone (a bad sector spoils one or
    two); a store that fails them all (down, or the pack gone bad as a whole) was asked
    once per frame of every range - hundreds of requests each.  Now a run of failures
    ends the retries and the rest are reported unread."""
    from pyvbak.backends import BackendError
    from pyvbak.repo import reader

    n = 40
    _, _, _, recs = one_pack_of_text_blocks(repo, tmp_path, n=n)

    class Down(RangeSpy):
        calls = 0

        def read_range_into(self, name, offset, buf):
            Down.calls += 1
            raise BackendError("connection refused (the store is down)")

    errors = []
    sink = ScratchSink(lambda *a: None, lambda k, r: errors.append((k, r)), block_size=BS)
    read_blocks(SimpleNamespace(backend=Down(repo.backend), config=repo.config), recs, sink, threads=1)
    assert sorted(k for k, _ in errors) == list(range(n))  # every block reported, once
    assert Down.calls == 2 + reader.FRAME_RETRY_GIVE_UP  # the range, the first frames alone, one probe
    assert all("connection refused" in r for _, r in errors)
    assert sum("not retried" in r for _, r in errors) == n - reader.FRAME_RETRY_GIVE_UP


def digest_ending_in_zero() -> bytes:
    """A block whose SHA-256 ends in a zero byte (one in 256 does)."""
    return next(b for b in (b"block %d" % i for i in range(100000)) if sha(b)[-1] == 0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", ["S32", "V32"])
def test_a_digest_ending_in_zero_bytes_is_matched_whatever_its_dtype(kernel, dtype):
    """decode_into takes S32 digests: numpy's bytes scalars drop trailing zero bytes, so
    the reference compared 31 bytes with 32 and called a good block a mismatch."""
    data = digest_ending_in_zero()
    frame = zstandard.ZstdCompressor().compress(data)
    status = BlockDecoder(kernel).decode_into(frame, np.array([0]), np.array([len(frame)]), bytearray(len(data)),
                                              np.array([0]), np.array([len(data)]), np.frombuffer(sha(data), dtype))
    assert status.tolist() == [OK]


RACE = """
import threading
from pyvbak import native
n = 16
barrier = threading.Barrier(n)
out = []
def first_call():
    barrier.wait()
    out.append(native.selected_decode_kernel())
threads = [threading.Thread(target=first_call) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(",".join(sorted(set(out))), native.selected_decode_kernel())
"""


@needs_native
def test_threads_that_first_ask_at_once_all_get_the_kernel():
    """libzstd is loaded on the first call (csrc/decode.c pv_zstd_load) - without the GIL,
    as every cffi call: a thread asking while another was loading found it "unavailable",
    so a restore's readers ran the reference, or failed where the native kernel was forced."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYVBAK_DECODE"}
    for _ in range(6):  # each a fresh process: the load happens once per process
        r = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["native", "native"], r.stdout


# -- read_blocks returns only when no worker can touch the sink any more ---------------------


def test_read_blocks_returns_only_when_its_workers_are_done_even_if_interrupted_again(repo, tmp_path, monkeypatch):
    """A worker's error (here: a Ctrl-C in one) stops the reading; while read_blocks waits
    for the other workers, a second Ctrl-C arrives.  It returned at once, its workers still
    writing into the sink: restore then closed the target's descriptors under them (their
    pwrites hit a closed - or reused - descriptor) and dropped the writer queue they could
    be waiting on."""
    import signal
    import threading
    import time

    img = make_image(tmp_path / "d.img", 6 * BS, [(0, 6 * BS, "random")], seed=4)
    backup_file(repo, img)
    recs = repo.load_digest_index().records
    recs = recs[sort_for_reading(recs)].copy()
    monkeypatch.setattr("pyvbak.repo.reader.RANGE_BYTES", BS)  # a range per block: a task per block
    calls = []
    busy = threading.Event()
    main = threading.get_ident()

    class Sink(ScratchSink):
        def __init__(self):
            super().__init__(self.on_blocks, lambda k, r: None, block_size=BS)

        def on_blocks(self, k, buf, offsets, ulens, ok):
            if k == 0:
                assert busy.wait(10)
                raise KeyboardInterrupt  # the first Ctrl-C, while another worker is in the sink
            if busy.is_set():
                return
            busy.set()
            time.sleep(0.15)  # read_blocks is waiting for this worker by now
            signal.pthread_kill(main, signal.SIGINT)  # the second Ctrl-C
            time.sleep(0.3)  # still busy in the sink
            calls.append(time.monotonic())

    with pytest.raises(KeyboardInterrupt):
        read_blocks(repo, recs, Sink(), threads=2)
    returned = time.monotonic()
    time.sleep(0.6)
    assert calls and max(calls) <= returned


def test_another_copy_whose_record_misstates_its_length_still_saves_the_restore(repo, tmp_path):
    """The copy restore reads first is damaged; the other copy's frame is intact but its
    pack index record names a wrong length.  The block's length is known from where it goes
    (a full block, or the disk's partial tail) and its SHA-256 proves the bytes: the
    fallback decoded with the record's length and compared with the first record's, and
    gave up on an intact copy."""
    img = dedup_image(tmp_path / "d.img")
    sid = backup_file(repo, img).snapshot_id
    second_copies(repo)
    repo = Repository.open(repo.location)
    victim = sha(nonzero_blocks(img)[1])
    index = repo.load_digest_index()
    chosen = index.records_at([index.find(victim)])[0]
    where = lambda r: (bytes(r["pack"]), int(r["offset"]))  # noqa: E731
    names = sorted(repo.pack_index_names())
    first, other = names[0], names[1]  # the copy in the first-named index is read first
    recs = fmt.decode_pack_index(repo.backend.read(other), other)
    assert where(chosen) not in {where(r) for r in recs}
    damage_chosen_copy(repo, victim)  # the chosen copy's frame
    for bad_len in range(BS + 1, BS + 100):  # its record's length, in an index named after the first
        bad = recs.copy()
        bad["ulen"][bad["digest"] == np.frombuffer(victim, "V32")[0]] = bad_len
        if fmt.pack_index_name(fmt.pack_id_of([fmt.encode_pack_index(bad)])) > first:
            break
    repo.write_pack_index(bad)
    repo.backend.delete(other)
    repo = Repository.open(repo.location)
    index = repo.load_digest_index()
    assert where(index.records_at([index.find(victim)])[0]) == where(chosen)
    out = tmp_path / "out.img"
    report = restore_to(repo, sid, out)
    assert same_file(img, out) and report["blocks_from_other_copies"] == 1


@pytest.mark.parametrize("target", ["file", "device"])
def test_a_record_claiming_a_full_block_for_the_partial_tail_writes_nothing_past_the_end(repo, tmp_path, target, request):
    """Restore sized each block by its pack index record.  A record claiming a full block
    for the disk's partial last block was staged as one: the failed block's room - garbage -
    went to the target past the snapshot's end (a file grew, a device lost what followed),
    and the other copy then "restored" the tail.  The length is the place's."""
    make_dev = request.getfixturevalue("loopdev") if target == "device" else None
    img = dedup_image(tmp_path / "d.img")
    size = os.path.getsize(img)
    tail = sha(open(img, "rb").read()[size // BS * BS :])
    sid = backup_file(repo, img).snapshot_id
    second_copies(repo)
    for name in list(repo.pack_index_names()):  # every copy's record claims a full block
        recs = fmt.decode_pack_index(repo.backend.read(name), name).copy()
        recs["ulen"][recs["digest"] == np.frombuffer(tail, "V32")[0]] = BS
        repo.write_pack_index(recs)
        repo.backend.delete(name)
    repo = Repository.open(repo.location)
    if target == "file":
        out = tmp_path / "out.img"
        restore_to(repo, sid, out)
        assert same_file(img, out)
    else:
        dev_img = tmp_path / "dev.img"
        garbage = random_bytes(4 * MiB, 61)
        dev_img.write_bytes(garbage)
        dev = make_dev(dev_img)
        restore_to(repo, sid, dev, force=True)
        with open(dev, "rb") as f:
            got = f.read()
        assert got[:size] == open(img, "rb").read() and got[size:] == garbage[size:]


@pytest.mark.parametrize("direct", ["1", "0"])
def test_other_copies_overwrite_the_failed_blocks_on_a_block_device(repo, tmp_path, monkeypatch, loopdev, direct):
    """A failed block's staged room is written (garbage) with its run; the other copy must
    land over it after the run, also on a device, direct or through the page cache - and
    nothing past the snapshot's end changes."""
    monkeypatch.setenv("PYVBAK_RESTORE_DIRECT", direct)
    img = dedup_image(tmp_path / "d.img")
    size = os.path.getsize(img)
    sid = backup_file(repo, img).snapshot_id
    second_copies(repo)
    repo = Repository.open(repo.location)
    blocks = nonzero_blocks(img)
    for d in {sha(blocks[i]) for i in (0, 1, 5, 13, -1)} | {sha(random_bytes(BS, seed=9))}:
        damage_chosen_copy(repo, d)
    dev_img = tmp_path / "dev.img"
    garbage = random_bytes(4 * MiB, 62)
    dev_img.write_bytes(garbage)
    dev = loopdev(dev_img)
    report = restore_to(repo, sid, dev, force=True)
    assert report["write_mode"] == ("direct" if direct == "1" else "buffered") and report["blocks_from_other_copies"] == 6
    with open(dev, "rb") as f:
        got = f.read()
    assert got[:size] == open(img, "rb").read() and got[size:] == garbage[size:]
