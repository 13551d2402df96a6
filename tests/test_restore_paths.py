"""Restore's write paths: O_DIRECT for full blocks (staged runs), the buffered fallback when
O_DIRECT is refused, sparse holes, atomic replacement with --force, and the reused read
buffers (``Backend.read_range_into``) shared with verify."""

from __future__ import annotations

import errno
import stat
import os
import shutil

import pytest

from images import BS, KiB, MiB, allocated_bytes, backup_file, make_image, random_bytes, restore_to, same_file, vm_image
from pyvbak.errors import IntegrityError, OutOfSpace, UsageError
from pyvbak.repo import restore as restore_mod
from pyvbak.repo.repository import Repository
from pyvbak.repo.restore import TEMP_MARK
from pyvbak.repo.verify import verify_repository


def direct_io_works(directory) -> bool:
    """Whether this filesystem takes an aligned O_DIRECT write (ext4, xfs: yes)."""
    probe = os.path.join(os.fspath(directory), ".direct-probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        dfd = os.open(probe, os.O_WRONLY | os.O_DIRECT)
        try:
            import mmap

            os.pwrite(dfd, mmap.mmap(-1, BS), 0)
            return True
        finally:
            os.close(dfd)
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


@pytest.fixture
def direct_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    if not direct_io_works(out):
        pytest.skip(f"{out} does not take O_DIRECT writes; the direct path cannot be observed here")
    return out


def no_temps(directory) -> bool:
    return not [n for n in os.listdir(directory) if TEMP_MARK in n]


def dedup_image(path, size: int) -> str:
    """Runs longer than one staged O_DIRECT write, gaps (holes and written zeros between
    runs), a block repeated at several places, and text."""
    same = random_bytes(BS, 99)
    return make_image(
        path,
        size,
        [
            (0, 6 * MiB + 3 * BS, "random"),  # one run longer than DIRECT_WRITE_BYTES
            (7 * MiB, 2 * BS, "zero"),
            (7 * MiB + 5 * BS, BS, same),
            (8 * MiB, 1 * MiB, "text"),
            (9 * MiB + 2 * BS, BS, same),  # the same block again, elsewhere
            (10 * MiB, BS, same),
            (size - 3 * BS - 777, 3 * BS + 777, "random"),  # ends in the partial last block, if any
        ],
        seed=5,
    )


@pytest.mark.parametrize("size", [12 * MiB, 12 * MiB + 12345, 12 * MiB - BS + 1])
def test_direct_restore_identical_block_multiple_or_not(repo, tmp_path, direct_dir, size):
    img = dedup_image(tmp_path / "disk.img", size)
    sid = backup_file(repo, img).snapshot_id
    out = direct_dir / "restored.img"
    report = restore_to(repo, sid, out)
    assert report["write_mode"] == "direct"
    assert os.path.getsize(out) == size
    assert same_file(out, img)
    assert no_temps(direct_dir)


def test_direct_restore_small_staging_buffer(repo, tmp_path, direct_dir, monkeypatch):
    """Every run split at the staging limit (one block per write) still lands right."""
    monkeypatch.setattr(restore_mod, "DIRECT_WRITE_BYTES", BS)
    img = dedup_image(tmp_path / "disk.img", 12 * MiB + 4321)
    sid = backup_file(repo, img).snapshot_id
    out = direct_dir / "restored.img"
    assert restore_to(repo, sid, out)["write_mode"] == "direct"
    assert same_file(out, img)


@pytest.mark.parametrize("direct", ["1", "0"])
def test_zero_blocks_stay_holes(repo, tmp_path, direct_dir, monkeypatch, direct):
    monkeypatch.setenv(restore_mod.DIRECT_ENV, direct)
    size = 64 * MiB + 1000
    img = make_image(
        tmp_path / "sparse.img",
        size,
        [(0, BS, "random"), (20 * MiB, 2 * MiB, "zero"), (33 * MiB, 3 * BS, "text"), (size - 1000, 1000, "random")],
        seed=3,
    )
    sid = backup_file(repo, img).snapshot_id
    out = direct_dir / "restored.img"
    report = restore_to(repo, sid, out)
    assert report["write_mode"] == ("direct" if direct == "1" else "buffered")
    assert same_file(out, img)
    # 5 data blocks (+ filesystem slack); the 2 MiB of written zeros and the rest are holes
    assert allocated_bytes(out) <= 5 * BS + 256 * KiB, allocated_bytes(out)


def test_buffered_when_env_says_so(repo, tmp_path, monkeypatch):
    monkeypatch.setenv(restore_mod.DIRECT_ENV, "0")
    img = vm_image(tmp_path / "disk.img", 4 * MiB + 100, seed=2)
    sid = backup_file(repo, img).snapshot_id
    report = restore_to(repo, sid, tmp_path / "restored.img")
    assert report["write_mode"] == "buffered"
    assert same_file(tmp_path / "restored.img", img)


def refuse_direct_open(monkeypatch):
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(restore_mod.os, "open", fake_open)


def direct_fds(monkeypatch) -> set[int]:
    """Record the descriptors restore opens with O_DIRECT."""
    real_open = os.open
    fds: set[int] = set()

    def spy_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if flags & os.O_DIRECT:
            fds.add(fd)
        return fd

    monkeypatch.setattr(restore_mod.os, "open", spy_open)
    return fds


def test_fallback_when_direct_open_fails(repo, tmp_path, monkeypatch):
    refuse_direct_open(monkeypatch)
    img = dedup_image(tmp_path / "disk.img", 12 * MiB + 12345)
    sid = backup_file(repo, img).snapshot_id
    out = tmp_path / "restored.img"
    report = restore_to(repo, sid, out)
    assert report["write_mode"] == "buffered"
    assert same_file(out, img)
    assert no_temps(tmp_path)


def test_fallback_when_direct_write_fails(repo, tmp_path, direct_dir, monkeypatch):
    """open(O_DIRECT) accepted but the writes refused (EINVAL): buffered, still identical."""
    fds = direct_fds(monkeypatch)
    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fd in fds:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(restore_mod.os, "pwrite", pwrite)
    img = dedup_image(tmp_path / "disk.img", 12 * MiB + 12345)
    sid = backup_file(repo, img).snapshot_id
    out = direct_dir / "restored.img"
    report = restore_to(repo, sid, out)
    assert refused and report["write_mode"] == "buffered"
    assert same_file(out, img)
    assert no_temps(direct_dir)


def test_short_direct_write_finished_buffered(repo, tmp_path, direct_dir, monkeypatch):
    fds = direct_fds(monkeypatch)
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if fd in fds and len(data) > 4 * KiB:
            return real_pwrite(fd, memoryview(data)[: 4 * KiB], offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(restore_mod.os, "pwrite", pwrite)
    img = dedup_image(tmp_path / "disk.img", 12 * MiB + 12345)
    sid = backup_file(repo, img).snapshot_id
    out = direct_dir / "restored.img"
    assert restore_to(repo, sid, out)["write_mode"] == "direct"
    assert same_file(out, img)


def test_out_of_space_on_direct_write_leaves_no_temp(repo, tmp_path, direct_dir, monkeypatch):
    img = vm_image(tmp_path / "disk.img", 4 * MiB, seed=4)
    sid = backup_file(repo, img).snapshot_id  # before the hook: the backup's own O_DIRECT writes go through
    fds = direct_fds(monkeypatch)
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if fd in fds:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(restore_mod.os, "pwrite", pwrite)
    with pytest.raises(OutOfSpace, match="no space left"):
        restore_to(repo, sid, direct_dir / "restored.img")
    assert os.listdir(direct_dir) == []


def test_a_failing_close_after_a_failure_does_not_hide_it(repo, tmp_path, monkeypatch):
    """The clean-up after a failed restore reports the failure, not an EIO of its own
    close (network file systems report write-back errors there), and still removes the
    temp file."""
    img = vm_image(tmp_path / "disk.img", 2 * MiB, seed=6)
    sid = backup_file(repo, img).snapshot_id
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_close = os.close
    failing = {"on": False}

    def take_over(fd, st, old_path=None):
        failing["on"] = True
        raise RuntimeError("the failure to report")

    def close(fd):
        real_close(fd)
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(restore_mod, "_take_over_file_attributes", take_over)
    monkeypatch.setattr(restore_mod.os, "close", close)
    with pytest.raises(RuntimeError, match="the failure to report"):
        restore_to(repo, sid, out_dir / "restored.img")
    monkeypatch.setattr(restore_mod.os, "close", real_close)
    assert os.listdir(out_dir) == []


def test_force_replaces_existing_file_atomically(repo, tmp_path, direct_dir):
    img = dedup_image(tmp_path / "disk.img", 12 * MiB + 12345)
    sid = backup_file(repo, img).snapshot_id
    out = direct_dir / "restored.img"
    old = make_image(out, 20 * MiB, [(0, 20 * MiB, "random")], seed=8)  # bigger than the snapshot
    old_copy = shutil.copyfile(old, tmp_path / "old-copy.img")
    old_ino = os.stat(out).st_ino

    # a corrupt block: the restore fails, the existing file is untouched, no temp is left
    packs = [n for n in repo.pack_object_names()]
    victim = os.path.join(repo.location, packs[0])
    original = open(victim, "rb").read()
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(bytes(b ^ 0xFF for b in original[100:140]))
    with pytest.raises(IntegrityError):
        restore_to(repo, sid, out, force=True)
    assert same_file(out, old_copy) and os.stat(out).st_ino == old_ino
    assert no_temps(direct_dir)

    # repaired: the restore replaces the file by rename (a new inode), complete
    with open(victim, "r+b") as f:
        f.write(original)
    report = restore_to(repo, sid, out, force=True)
    assert report["write_mode"] == "direct"
    assert same_file(out, img)
    assert os.stat(out).st_ino != old_ino
    assert no_temps(direct_dir)


class CountingBackend:
    """Wraps a backend; counts the reader's read_range and read_range_into calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = {"read_range": 0, "read_range_into": 0}
        self.buffers: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_range(self, name, offset, length):
        self.calls["read_range"] += 1
        return self.inner.read_range(name, offset, length)

    def read_range_into(self, name, offset, buf):
        self.calls["read_range_into"] += 1
        self.buffers.add(id(buf.obj) if isinstance(buf, memoryview) else id(buf))
        view = memoryview(buf).cast("B")
        view[:] = self.inner.read_range(name, offset, len(view))


def test_restore_and_verify_read_into_reused_buffers(repo, tmp_path, monkeypatch):
    monkeypatch.setattr("pyvbak.repo.reader.RANGE_BYTES", 256 * KiB)  # many ranges per pack
    img = vm_image(tmp_path / "disk.img", 8 * MiB, seed=6)
    sid = backup_file(repo, img).snapshot_id
    counting = CountingBackend(repo.backend)
    monkeypatch.setattr(repo, "backend", counting)
    restore_to(repo, sid, tmp_path / "restored.img")
    assert same_file(tmp_path / "restored.img", img)
    assert counting.calls["read_range"] == 0 and counting.calls["read_range_into"] > 4
    assert len(counting.buffers) <= 2  # one per worker thread, reused for every range

    counting.calls = {"read_range": 0, "read_range_into": 0}
    report = verify_repository(repo, threads=2).report
    assert report["ok"] and report["blocks_checked"] > 0
    assert counting.calls["read_range_into"] > 4


def test_verify_still_finds_corruption(repo, tmp_path):
    img = vm_image(tmp_path / "disk.img", 4 * MiB, seed=7)
    backup_file(repo, img)
    pack = next(iter(repo.pack_object_names()))
    path = os.path.join(repo.location, pack)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    report = verify_repository(repo, threads=2).report
    assert not report["ok"] and report["problem_count"] >= 1


@pytest.mark.parametrize("zeroout", ["device", "written"])
@pytest.mark.parametrize("direct", ["1", "0"])
def test_block_device_in_place_zero_runs_and_partial_tail(repo, tmp_path, loopdev, monkeypatch, direct, zeroout):
    """Onto a bigger device full of garbage: data blocks (O_DIRECT when direct=1), zero
    runs zeroed by the device (BLKZEROOUT) or written as zeros where it refuses, the
    partial last block through the page cache, the rest of the device untouched."""
    monkeypatch.setenv(restore_mod.DIRECT_ENV, direct)
    real_zeroout, zeroed = restore_mod._block_zeroout, []

    def block_zeroout(fd, start, end):
        if zeroout == "written":
            return False
        done = real_zeroout(fd, start, end)
        zeroed.append((start, end, done))
        return done

    monkeypatch.setattr(restore_mod, "_block_zeroout", block_zeroout)
    size = 12 * MiB + 12345
    img = dedup_image(tmp_path / "disk.img", size)
    sid = backup_file(repo, img).snapshot_id
    dev_img = tmp_path / "dev.img"
    garbage = random_bytes(16 * MiB, 77)
    dev_img.write_bytes(garbage)
    dev = loopdev(dev_img)
    report = restore_to(repo, sid, dev, force=True)
    assert report["write_mode"] == ("direct" if direct == "1" else "buffered")
    with open(dev, "rb") as f:
        got = f.read()
    assert got[:size] == open(img, "rb").read()
    assert got[size:] == garbage[size:]
    if zeroout == "device":  # a loop device takes BLKZEROOUT (it punches its backing file)
        assert zeroed and all(done for _, _, done in zeroed), zeroed


# -- raw zstd frames taken in place (reader.raw_frame_content) -------------------------

@pytest.mark.parametrize("size", [1, 4096, 64 * KiB, 128 * KiB, 128 * KiB + 1, 256 * KiB])
@pytest.mark.parametrize("level", [-5, 1, 3, 19])
@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("content_size", [True, False])
def test_raw_frame_content_is_exactly_the_block_or_none(size, level, checksum, content_size):
    import zstandard

    from pyvbak.repo.reader import raw_frame_content

    cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=content_size)
    for data in (random_bytes(size, seed=size), b"text " * (size // 5) + b"x" * (size % 5)):
        frame = memoryview(cctx.compress(data))
        got = raw_frame_content(frame, len(data))
        if got is not None:
            assert bytes(got) == data
            assert len(data) <= 128 * KiB  # zstd's largest block: bigger blocks span several
        else:
            assert zstandard.ZstdDecompressor().decompress(frame, max_output_size=len(data)) == data
        # a wrong expected length never yields content
        assert raw_frame_content(frame, len(data) + 1) is None
    # incompressible blocks up to zstd's block limit are the ones taken in place
    if size <= 128 * KiB and size >= 4096:
        assert raw_frame_content(memoryview(cctx.compress(random_bytes(size, seed=1))), size) is not None


def test_raw_frame_content_rejects_other_bytes():
    from pyvbak.repo.reader import raw_frame_content

    assert raw_frame_content(memoryview(b""), 0) is None
    assert raw_frame_content(memoryview(random_bytes(70000, seed=3)), 65536) is None
    # a skippable frame (the pack trailer's kind) is not content
    assert raw_frame_content(memoryview(b"\x5e\x2a\x4d\x18" + (65536).to_bytes(4, "little") + bytes(65536)), 65536) is None


def test_corrupt_raw_block_is_caught_by_its_digest(repo, tmp_path):
    """A flipped byte inside a raw (incompressible) block: restore refuses, verify names it."""
    img = tmp_path / "disk.img"
    img.write_bytes(random_bytes(4 * BS, seed=11))
    sid = backup_file(repo, img).snapshot_id
    pack = next(iter(repo.pack_object_names()))
    path = os.path.join(repo.location, pack)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(BS // 2)  # inside the first frame's raw payload
        b = f.read(1)
        f.seek(BS // 2)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        restore_to(repo, sid, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    report = verify_repository(repo, threads=2).report
    assert not report["ok"] and report["problem_count"] == 1


def test_restore_reads_packs_in_the_order_of_the_disk_regions_they_fill():
    import numpy as np

    from pyvbak.repo import format as fmt
    from pyvbak.repo.reader import _groups, sort_for_reading

    rng = np.random.default_rng(3)
    n = 300
    recs = np.zeros(n, fmt.PACK_INDEX_RECORD)
    packs = [bytes([p]) * 32 for p in rng.permutation(6)]
    pack_of = rng.integers(0, 6, size=n)
    recs["pack"] = np.frombuffer(b"".join(packs[i] for i in pack_of), "V32")
    recs["offset"] = rng.permutation(n) * 100
    recs["clen"] = 50
    disk_pos = rng.permutation(n)
    order = sort_for_reading(recs, disk_pos=disk_pos)
    assert sorted(order.tolist()) == list(range(n))
    got = recs[order]
    # each pack's records together, by offset; packs by the first disk block they fill
    seen, firsts = [], []
    for pack_hex, start, end, k0, k1 in _groups(got):
        if not seen or seen[-1] != pack_hex:
            seen.append(pack_hex)
            firsts.append(min(disk_pos[order[k]] for k in range(len(order)) if bytes(got["pack"][k]).hex() == pack_hex))
        assert (np.diff(got["offset"][k0:k1].astype(np.int64)) > 0).all()
    assert len(seen) == len(set(seen)) == 6
    assert firsts == sorted(firsts)
    # without disk positions: by pack id
    plain = recs[sort_for_reading(recs)]
    assert [bytes(p) for p in plain["pack"][np.r_[True, plain["pack"][1:] != plain["pack"][:-1]]]] == sorted(packs)


def test_special_file_targets_are_refused_and_left_alone(repo, tmp_path):
    """A file restore renames its result over the target: over a FIFO (or /dev/null, a
    character device) that would replace the node itself.  Refused, node untouched."""
    from pyvbak.errors import UsageError

    img = make_image(tmp_path / "d.img", 3 * BS, [(0, 3 * BS, "random")], seed=21)
    sid = backup_file(repo, img).snapshot_id
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"restore target .*pipe is a FIFO: give a regular file path or a block device"):
        restore_to(repo, sid, fifo, force=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert no_temps(tmp_path)


def test_restore_through_a_symlink_writes_the_file_it_names(repo, tmp_path):
    img = make_image(tmp_path / "d.img", 3 * BS + 7, [(0, 3 * BS + 7, "random")], seed=22)
    sid = backup_file(repo, img).snapshot_id
    (tmp_path / "vms").mkdir()
    real = make_image(tmp_path / "vms" / "disk.img", BS, [(0, BS, "random")], seed=23)
    link = tmp_path / "current.img"
    link.symlink_to(real)
    restore_to(repo, sid, link, force=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert same_file(real, img)


def test_block_device_in_use_is_refused(repo, tmp_path, loopdev):
    """A mounted device (here: held by an exclusive opener, which is what a mount is to the
    kernel) is not written: one clear error, the device unchanged."""
    from pyvbak.errors import UsageError

    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=31)
    sid = backup_file(repo, img).snapshot_id
    dev_img = tmp_path / "dev.img"
    garbage = random_bytes(MiB, 32)
    dev_img.write_bytes(garbage)
    dev = loopdev(dev_img)
    holder = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(UsageError, match=r"block device .* is in use .*: unmount or release it first"):
            restore_to(repo, sid, dev, force=True)
    finally:
        os.close(holder)
    with open(dev, "rb") as f:
        assert f.read() == garbage
    restore_to(repo, sid, dev, force=True)  # released: the restore goes through
    with open(dev, "rb") as f:
        assert f.read(4 * BS) == open(img, "rb").read()


@pytest.mark.parametrize("failure", ["ctrl-c", "sigterm", "bad block"])
def test_failed_device_restore_says_the_device_was_partly_overwritten(repo, tmp_path, loopdev, monkeypatch, failure):
    """A file target is left as it was; a device is not, and the error must say so instead
    of the generic "nothing was committed"."""
    from pyvbak.errors import Interrupted

    img = make_image(tmp_path / "d.img", 8 * BS, [(0, 8 * BS, "random")], seed=41)
    sid = backup_file(repo, img).snapshot_id
    dev_img = tmp_path / "dev.img"
    dev_img.write_bytes(random_bytes(MiB, 42))
    dev = loopdev(dev_img)
    real = restore_mod.read_blocks

    def fail_midway(repo_, recs, sink, *, threads):
        class FirstBlocksThenFail(restore_mod.BlockSink):
            def reserve(self, k, ulens):
                return sink.reserve(k, ulens[:1])  # one record at a time

            def filled(self, k, buffer, offsets, ulens, ok):
                if k == 3:
                    if failure == "ctrl-c":
                        raise KeyboardInterrupt
                    if failure == "sigterm":
                        raise Interrupted("interrupted by SIGTERM: stopped cleanly, nothing was committed")
                    sink.error(k, "block does not match its digest")
                    ok = ok & False
                sink.filled(k, buffer, offsets, ulens, ok)

            def error(self, k, reason):
                sink.error(k, reason)

        real(repo_, recs, FirstBlocksThenFail(), threads=1)

    monkeypatch.setattr(restore_mod, "read_blocks", fail_midway)
    if failure == "bad block":  # (and bad when read again: a passing failure is read past now)
        from pyvbak.repo.repository import Repository

        monkeypatch.setattr(Repository, "check_block_copy", lambda self, record, ulen: (None, "bad"))
    want = Interrupted if failure != "bad block" else IntegrityError
    with pytest.raises(want, match=r"block device .* was partly overwritten: restore it again before using it") as info:
        restore_to(repo, sid, dev, force=True)
    # a device's message does not say the CLI's "stopped cleanly ... nothing was left" of
    # a file target (both were said, one after the other)
    assert "stopped cleanly" not in str(info.value)
    # the same failure onto a file leaves no file and no temp
    out = tmp_path / "out.img"
    with pytest.raises(KeyboardInterrupt if failure == "ctrl-c" else want) as info:
        restore_to(repo, sid, out, force=True)
    assert "partly overwritten" not in str(info.value)
    assert not out.exists() and no_temps(tmp_path)


def test_ctrl_c_while_waiting_for_the_writers_cleans_up_after_them(repo, tmp_path, direct_dir, monkeypatch):
    """A Ctrl-C while flush() waits for the O_DIRECT writers, and another while close()
    waits for them in the clean-up.  close() closed the descriptors with a write still in
    flight (an interrupted Thread.join() lets the next one return at once), which then
    went to a closed - or reused - descriptor after restore had returned; or, interrupted
    in close(), the clean-up stopped there and left the temp file.  Now restore waits for
    the writes in flight, closes, removes the temp file, and raises the interruption."""
    import signal
    import threading
    import time

    monkeypatch.setattr(restore_mod, "DIRECT_WRITERS", 1)
    img = make_image(tmp_path / "d.img", 8 * MiB, [(0, 8 * MiB, "random")], seed=12)
    sid = backup_file(repo, img).snapshot_id
    main = threading.get_ident()
    flushing, closing, closed = threading.Event(), threading.Event(), threading.Event()
    ends, sent = [], []
    real_write, real_flush, real_close = restore_mod._Target._write_direct, restore_mod._Target.flush, restore_mod._Target.close

    def write(self, buf, offset):
        try:
            if flushing.is_set() and not sent:
                sent.append(1)
                signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C: restore is waiting in flush()
                assert closing.wait(5)
                time.sleep(0.1)
                if not closed.is_set():
                    signal.pthread_kill(main, signal.SIGINT)  # again: restore is waiting in close()
                time.sleep(0.2)
            real_write(self, buf, offset)
        finally:
            ends.append(time.monotonic())

    def flush(self):
        flushing.set()
        return real_flush(self)

    def close(self):
        closing.set()
        try:
            return real_close(self)
        finally:
            closed.set()

    monkeypatch.setattr(restore_mod._Target, "_write_direct", write)
    monkeypatch.setattr(restore_mod._Target, "flush", flush)
    monkeypatch.setattr(restore_mod._Target, "close", close)
    with pytest.raises(KeyboardInterrupt):
        restore_to(repo, sid, direct_dir / "out.img")
    returned = time.monotonic()
    time.sleep(0.6)
    assert sent and max(ends) <= returned
    assert os.listdir(direct_dir) == []


def test_ctrl_c_just_after_the_temp_file_is_created_removes_it(repo, tmp_path, monkeypatch):
    """Between creating the temp file and the clean-up's try, restore computed per-record
    arrays (~0.1 s for 16 M blocks) and set up its sink: a Ctrl-C there left the temp file
    and its descriptor.  Simulated by a Ctrl-C while the sink is made."""

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=13)
    sid = backup_file(repo, img).snapshot_id
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(restore_mod._RestoreSink, "__init__", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        restore_to(repo, sid, tmp_path / "out" / "o.img")
    assert os.listdir(tmp_path / "out") == []


def test_a_restored_file_keeps_the_mode_and_owner_of_the_file_it_replaces(repo, tmp_path):
    """restore --force over a libvirt image (libvirt-qemu:kvm 0660) left root 0600: the
    VM could no longer open its disk.  A new file gets 0666 less the umask, as cp gives."""
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=3)
    sid = backup_file(repo, img).snapshot_id
    old = os.umask(0o027)
    try:
        fresh = tmp_path / "fresh.img"
        restore_to(repo, sid, fresh)
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o640
        target = tmp_path / "vm.img"
        target.write_bytes(b"old disk")
        os.chmod(target, 0o660)
        if os.geteuid() == 0:
            os.chown(target, 4321, 4322)
        try:  # an SELinux label, an ACL: carried the same way
            os.setxattr(target, "user.pyvbak-test", b"label")
            xattrs = True
        except OSError as exc:  # a filesystem without user xattrs: the rest still holds
            assert exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
            xattrs = False
        restore_to(repo, sid, target, force=True)
        st = os.stat(target)
        assert same_file(target, img) and stat.S_IMODE(st.st_mode) == 0o660
        assert not xattrs or os.getxattr(target, "user.pyvbak-test") == b"label"
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (4321, 4322)
    finally:
        os.umask(old)
    assert no_temps(tmp_path)


def test_a_killed_restores_temp_file_goes_even_if_its_pid_now_runs_python(tmp_path):
    """Leftover temp files were judged by the pid in their name alone: a later Python
    process that got the pid kept a killed restore's file (a disk's size) forever."""
    from pyvbak.processes import start_time
    from pyvbak.repo.restore import cleanup_restore_leftovers, temp_name

    me, mine = os.getpid(), start_time(os.getpid())
    reused = tmp_path / f".a.img{TEMP_MARK}{me}-0123abcd-{mine + 1}"  # this pid, another process's start
    live = tmp_path / temp_name(str(tmp_path / "b.img"))  # this very process's, running
    old_style = tmp_path / f".c.img{TEMP_MARK}{me}-0123abcd"  # an older pyvbak's: pid alone
    dead = tmp_path / f".d.img{TEMP_MARK}999999999-0123abcd-5"
    for p in (reused, live, old_style, dead):
        p.write_bytes(b"partial")
    removed = cleanup_restore_leftovers(str(tmp_path))
    assert sorted(removed) == sorted([reused.name, dead.name])
    assert live.exists() and old_style.exists()
    from pyvbak.processes import scope_token

    assert live.name.startswith(f".b.img{TEMP_MARK}{me}-") and live.name.endswith(f"-{mine}-{scope_token()}")


def test_a_restore_of_another_container_keeps_its_temp_file(tmp_path):
    """A restore in another container (or on another host) sharing the directory: its
    pid means nothing here, and a restore here deleted its temp file - it failed after
    writing the whole disk.  Another scope's temp file stays until it is a day old."""
    from pyvbak.processes import FOREIGN_TEMP_MAX_AGE_S, scope_token
    from pyvbak.repo.restore import cleanup_restore_leftovers

    other = "0123abcd" if scope_token() != "0123abcd" else "4567ef01"
    theirs = tmp_path / f".a.img{TEMP_MARK}999999999-0123abcd-5-{other}"
    old = tmp_path / f".b.img{TEMP_MARK}999999999-0123abcd-5-{other}"
    ours = tmp_path / f".c.img{TEMP_MARK}999999999-0123abcd-5-{scope_token()}"
    for p in (theirs, old, ours):
        p.write_bytes(b"partial")
    t = os.path.getmtime(old) - FOREIGN_TEMP_MAX_AGE_S - 60
    os.utime(old, (t, t))
    assert sorted(cleanup_restore_leftovers(str(tmp_path))) == sorted([old.name, ours.name])
    assert theirs.exists()


def test_an_output_name_of_255_bytes_restores(tmp_path):
    """The temp name adds ~50 bytes to the output's: a valid name of 216-255 bytes failed
    with "File name too long" (and advice to pick a writable directory)."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = vm_image(tmp_path / "d.img", 2 * MiB, seed=9)
    sid = backup_file(repo, img).snapshot_id
    out = tmp_path / ("é" * 100 + "x" * 51 + ".img")  # 255 bytes of UTF-8
    assert len(out.name.encode()) == 255
    restore_to(repo, sid, out)
    assert same_file(out, img) and no_temps(tmp_path)


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_without_force_a_file_created_during_the_restore_is_left_alone(tmp_path, monkeypatch, links):
    """The target was checked at the start only, then renamed over: a file a VM manager
    (or another restore) created at OUTPUT while a long restore ran was replaced without
    --force.  Now the commit links (no replace) and fails: the file stays, no temp file."""
    from pyvbak.errors import TargetExists

    repo = Repository.init(str(tmp_path / "repo"))
    img = vm_image(tmp_path / "d.img", 2 * MiB, seed=4)
    sid = backup_file(repo, img).snapshot_id
    out = tmp_path / "out" / "r.img"
    out.parent.mkdir()
    real_commit = restore_mod.commit_restored

    def commit(pending, **kw):
        out.write_text("made meanwhile")
        return real_commit(pending, **kw)

    monkeypatch.setattr(restore_mod, "commit_restored", commit)
    if not links:
        def no_link(*a, **k):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(TargetExists, match="created by something else while the restore ran"):
        restore_mod.restore_snapshot(repo, repo.resolve(sid), str(out))
    assert out.read_text() == "made meanwhile"
    assert os.listdir(out.parent) == ["r.img"]
    monkeypatch.setattr(restore_mod, "commit_restored", real_commit)
    monkeypatch.undo()
    out.unlink()
    restore_mod.restore_snapshot(repo, repo.resolve(sid), str(out))  # nothing there: linked in place
    assert same_file(out, img) and os.listdir(out.parent) == ["r.img"]


def test_restore_into_a_directory_it_may_write_but_not_list(repo, tmp_path, monkeypatch):
    """A drop directory (mode 0733): the temp-file cleanup's listing and the directory
    fsync are refused, the restore itself is not (it
    failed with "cannot create the restored file ... restore into a directory you can
    write").  Root is never refused, so the refusals are the kernel's, played here."""
    img = tmp_path / "d.img"
    make_image(img, 2 * MiB, [(0, 2 * MiB, "random")], seed=4)
    sid = backup_file(repo, img).snapshot_id
    drop = tmp_path / "drop"
    drop.mkdir()
    real_listdir, real_open = os.listdir, os.open

    def listdir(path="."):
        if os.path.abspath(path) == str(drop):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_listdir(path)

    def opener(path, flags, *a, **kw):
        if os.path.abspath(path) == str(drop) and flags & getattr(os, "O_DIRECTORY", 0):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    synced = []
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "open", opener)
    monkeypatch.setattr(os, "sync", lambda: synced.append(True))
    restore_to(repo, sid, drop / "out.img")
    assert same_file(drop / "out.img", img) and synced


def test_a_restore_path_longer_than_the_system_takes_is_named_so(repo, tmp_path, monkeypatch):
    img = tmp_path / "d.img"
    make_image(img, MiB, [(0, MiB, "random")], seed=5)
    sid = backup_file(repo, img).snapshot_id
    monkeypatch.chdir(tmp_path)
    while len(os.fsencode(os.getcwd())) <= 4200:  # past PATH_MAX (4096), one step at a time
        os.mkdir("d" * 200)
        os.chdir("d" * 200)
    with pytest.raises(UsageError) as e:
        restore_to(repo, sid, "out.img")
    assert "too long" in str(e.value) and "does not exist" not in str(e.value)


def test_a_restore_says_which_killed_restores_temp_files_it_removed(tmp_path, capsys):
    """A restore killed with SIGKILL leaves its temp file (a disk's size) beside the
    target; the next restore into that directory removed it without a word, where a
    backup reports what it cleaned up after a killed run (session 26's audit)."""
    import json

    from conftest import run_cli

    img = make_image(tmp_path / "d.img", 8 * BS, [(0, 8 * BS, "random")], seed=4)
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    assert run_cli(capsys, "backup", str(img), "--repo", repo, "--vm", "v")[0] == 0
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".old.img{TEMP_MARK}999999999-0123abcd-5"
    dead.write_bytes(b"half a disk")
    code, stdout, err = run_cli(capsys, "restore", "v@latest", str(out / "new.img"), "--repo", repo, "--json")
    assert code == 0 and not dead.exists()
    line = f"removed {dead}, the temp file of a restore that was killed"
    assert json.loads(stdout)["cleaned_leftovers"] == [line]
    assert err.splitlines() == [f"cleanup: {line}"]
    code, stdout, err = run_cli(capsys, "restore", "v@latest", str(out / "new.img"), "--repo", repo, "--force")
    assert code == 0 and err == "" and sorted(os.listdir(out)) == ["new.img"]
