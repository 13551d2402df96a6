"""Round trips through the repository: full and incremental backups restore byte-identical,
every snapshot restores alone, dedup across snapshots / disks / VMs, zero blocks never stored."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository

from images import (
    BS,
    KiB,
    MiB,
    PAGE,
    allocated_bytes,
    backup_file,
    make_image,
    punch_hole,
    random_bytes,
    resize,
    restore_to,
    rewrite_pages,
    same_file,
    vm_image,
    write_at,
)


def stored_digests(repo) -> set[bytes]:
    idx = repo.load_digest_index()
    return {bytes(d) for d in idx.records["digest"]}


@pytest.mark.parametrize("windows", ["default", "tiny"])
def test_full_incremental_grow_shrink_zero_changes_restore_identical(repo, tmp_path, monkeypatch, windows):
    if windows == "tiny":
        # Incrementals scan the file in mapped windows; 3-block windows and 2-block read
        # chunks put window and chunk edges inside every run of changed blocks.
        from pyvbak.engine import backup as engine

        monkeypatch.setattr(engine, "SCAN_WINDOW_BYTES", 3 * BS)
        monkeypatch.setattr(engine, "CHUNK_BYTES", 2 * BS)
    img = tmp_path / "disk.img"
    vm_image(img, 8 * MiB + 12345, seed=1)  # partial last block
    states = []  # (snapshot id, frozen copy of the image at that time)

    def snap(expect_parent: bool):
        res = backup_file(repo, img)
        assert (res.parent is not None) == expect_parent
        copy = tmp_path / f"state{len(states)}.img"
        shutil.copyfile(img, copy)
        states.append((res.snapshot_id, copy))
        return res

    full = snap(False)
    assert full.changed_blocks == -(-(8 * MiB + 12345) // BS)

    # 1: clustered page rewrites; exactly the blocks holding rewritten pages change
    pages = rewrite_pages(img, fraction=0.01, seed=2)
    res = snap(True)
    touched = {p * PAGE // BS for p in pages}
    assert res.changed_blocks == len(touched)
    assert res.new_blocks == len(touched)
    assert res.new_bytes <= 4 * len(set(pages)) * PAGE  # "<= 4x the changed bytes" at 64 KiB

    # 2: unchanged disk stores nothing
    res = snap(True)
    assert (res.changed_blocks, res.new_blocks, res.new_bytes, res.packs_written) == (0, 0, 0, 0)

    # 3: grow to a size that is not a block multiple, data in the new tail
    old = os.path.getsize(img)
    resize(img, 11 * MiB + 777)
    write_at(img, old - 10, random_bytes(3 * BS, 3))
    res = snap(True)
    assert res.size == 11 * MiB + 777
    assert res.new_blocks >= 3

    # 4: zero -> nonzero (into the hole) and nonzero -> zero (over random data)
    write_at(img, 6 * MiB + 5 * KiB, random_bytes(2 * BS, 4))
    write_at(img, 3 * MiB, bytes(3 * BS))
    res = snap(True)
    assert res.changed_blocks >= 5

    # 5: shrink to a size that is not a block multiple (old tail block now partial)
    write_at(img, 5 * MiB - 10, random_bytes(20, 5))
    resize(img, 5 * MiB + 3)
    res = snap(True)
    assert res.size == 5 * MiB + 3
    assert res.new_blocks == 2  # the block before the cut and the new 3-byte tail block

    # 6: grow back with zeros only: the new blocks are zero and not stored; only the old
    # 3-byte tail block, now a full-length block, is new
    resize(img, 9 * MiB + 1)
    res = snap(True)
    assert (res.new_blocks, res.new_bytes) == (1, BS)

    for k, (sid, copy) in enumerate(states):
        out = tmp_path / f"restored{k}.img"
        report = restore_to(repo, sid, out)
        assert report["size"] == os.path.getsize(copy)
        assert same_file(out, copy), f"snapshot {k} ({sid}) did not restore identical"
    assert not [n for n in os.listdir(tmp_path) if ".pyvbak-restore-" in n]


def test_every_snapshot_restores_alone(repo, tmp_path):
    """Forever incremental: no chain; each snapshot needs only its own index and the packs."""
    img = tmp_path / "disk.img"
    vm_image(img, 4 * MiB + 999, seed=5)
    states = []
    for k in range(4):
        if k:
            rewrite_pages(img, fraction=0.05, seed=10 + k)
        if k == 2:
            resize(img, 6 * MiB + 1)
            write_at(img, 5 * MiB, random_bytes(BS, 77))
        states.append((backup_file(repo, img).snapshot_id, shutil.copyfile(img, tmp_path / f"s{k}.img")))

    for k, (sid, copy) in enumerate(states):
        alone = tmp_path / f"alone{k}"
        shutil.copytree(repo.location, alone)
        for other, _ in states:
            if other != sid:
                os.unlink(alone / "snapshots" / f"{other}.json")
                os.unlink(alone / "snapshots" / f"{other}.index")
        r = Repository.open(str(alone))
        assert [s.id for s in r.snapshots()] == [sid]
        out = tmp_path / f"out{k}.img"
        restore_to(r, sid, out)
        assert same_file(out, copy)


def test_dedup_across_snapshots_disks_and_vms(repo, tmp_path):
    img = tmp_path / "a.img"
    vm_image(img, 6 * MiB, seed=9)
    first = backup_file(repo, img, vm="web", disk="sda")
    assert first.new_blocks > 0
    n_digests = len(stored_digests(repo))
    packs_before = sorted(os.listdir(os.path.join(repo.location, "packs")))

    # same image as another disk of the same VM, and as the disk of another VM
    again = backup_file(repo, img, vm="web", disk="sdb")
    assert (again.new_blocks, again.new_bytes, again.stored_bytes, again.packs_written) == (0, 0, 0, 0)
    assert again.parent is None  # a different disk: full scan, but every block already stored
    clone = tmp_path / "b.img"
    shutil.copyfile(img, clone)
    other_vm = backup_file(repo, clone, vm="db", disk="sda")
    assert other_vm.new_bytes == 0 and other_vm.new_blocks == 0
    assert len(stored_digests(repo)) == n_digests
    assert sorted(os.listdir(os.path.join(repo.location, "packs"))) == packs_before

    # dedup within one image: the same block 20 times is stored once
    block = random_bytes(BS, 123)
    rep = tmp_path / "rep.img"
    make_image(rep, 20 * BS, [(k * BS, BS, block) for k in range(20)])
    res = backup_file(repo, rep, vm="rep", disk="d")
    assert res.new_blocks == 1 and res.new_bytes == BS

    for sid, src in [(again.snapshot_id, img), (other_vm.snapshot_id, img), (res.snapshot_id, rep)]:
        out = tmp_path / f"o-{sid}.img"
        restore_to(repo, sid, out)
        assert same_file(out, src)


def test_zero_blocks_never_stored_and_restore_sparse(repo, tmp_path):
    img = tmp_path / "sparse.img"
    size = 16 * MiB + 100  # zero partial tail block
    make_image(img, size, [(2 * MiB, 4 * MiB, "zero"), (9 * MiB + 7, 10, b"0123456789"), (10 * MiB, BS, "random")])
    assert allocated_bytes(img) < 6 * MiB  # the rest is holes
    res = backup_file(repo, img)
    # only the block holding the 10 bytes and the random block (straddles nothing: aligned)
    assert res.new_blocks == 2
    digests = stored_digests(repo)
    assert fmt.ZERO_DIGEST not in digests
    assert hashlib.sha256(bytes(BS)).digest() not in digests
    assert hashlib.sha256(bytes(100)).digest() not in digests

    _, disk_size, records = repo.load_snapshot_index(repo.resolve(res.snapshot_id))
    assert disk_size == size and len(records) == -(-size // BS)
    is_zero = records["digest"].view("S32") == b""
    assert int((~is_zero).sum()) == 2
    assert not is_zero[(9 * MiB + 7) // BS] and not is_zero[10 * MiB // BS]

    out = tmp_path / "out.img"
    restore_to(repo, res.snapshot_id, out)
    assert same_file(out, img)
    assert allocated_bytes(out) <= 4 * BS  # zero blocks stay holes in the restored file

    # an all-zero disk stores nothing at all
    z = tmp_path / "zero.img"
    make_image(z, 3 * BS + 5, [(0, 3 * BS + 5, "zero")])
    res = backup_file(repo, z, vm="z")
    assert (res.new_blocks, res.packs_written) == (0, 0)
    restore_to(repo, res.snapshot_id, tmp_path / "zout.img")
    assert same_file(tmp_path / "zout.img", z)


def test_memory_backend_roundtrip(tmp_path):
    """The repository works on any Backend: memory://NAME reopened by name."""
    import uuid

    loc = f"memory://rt-{uuid.uuid4().hex[:8]}"
    r = Repository.init(loc)
    img = vm_image(tmp_path / "m.img", 3 * MiB + 5, seed=3)
    sid = backup_file(r, img).snapshot_id
    r2 = Repository.open(loc)
    assert r2.config == r.config
    restore_to(r2, sid, tmp_path / "m.out")
    assert same_file(tmp_path / "m.out", img)


def test_snapshot_index_records_match_blocks(repo, tmp_path):
    """Each record's digest is the SHA-256 of its block (the partial tail block unpadded)."""
    img = vm_image(tmp_path / "d.img", 2 * MiB + 4097, seed=11)
    res = backup_file(repo, img)
    _, _, records = repo.load_snapshot_index(repo.resolve(res.snapshot_id))
    data = open(img, "rb").read()
    for i, rec in enumerate(records):
        block = data[i * BS : (i + 1) * BS]
        want = fmt.ZERO_DIGEST if block.count(0) == len(block) else hashlib.sha256(block).digest()
        assert bytes(rec["digest"]) == want, i
    assert np.all(records["digest"].view("S32")[-1:] != b"")


def test_thin_image_hole_windows_need_no_scan(repo, tmp_path, monkeypatch):
    """A full backup of a sparse image reads only its data blocks; an incremental maps only
    windows holding data; windows wholly in holes are zero without a job, and count as
    changed where the parent had data there (a punched hole) or had no block (the disk
    grew)."""
    from pyvbak import native
    from pyvbak.engine import backup as engine

    monkeypatch.setattr(engine, "SCAN_WINDOW_BYTES", 4 * BS)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * BS)
    img = tmp_path / "thin.img"
    with open(img, "wb") as f:
        f.truncate(64 * BS)
        for blk in (1, 2, 9, 30, 31):  # data in windows 0, 2 and 7; the rest holes
            f.seek(blk * BS)
            f.write(random_bytes(BS, blk))
    first = backup_file(repo, img)
    # the full backup reads only the data blocks (holes are zero without a read or a job)
    assert (first.bytes_read, first.changed_blocks, first.new_blocks) == (5 * BS, 64, 5)
    assert first.bytes_scanned == 5 * BS  # holes are not scanned either
    first_copy = shutil.copyfile(img, tmp_path / "first-copy.img")
    mapped = []
    real = native.scan_fd_range

    def counting(fd, offset, length, *a, **kw):
        mapped.append(offset // BS)
        return real(fd, offset, length, *a, **kw)

    monkeypatch.setattr(native, "scan_fd_range", counting)
    punch_hole(img, 28 * BS, 4 * BS)  # window 7's data (blocks 30, 31) becomes a hole
    resize(img, 72 * BS)  # and the disk grows by 8 blocks of holes
    res = backup_file(repo, img)
    assert sorted(mapped) == [0, 8]  # only the windows still holding data were mapped
    # what the scan read (the 3 data blocks left) and nothing for holes: it once said the
    # whole 72-block disk was read
    assert res.bytes_scanned == 3 * BS and res.bytes_read == 3 * BS
    assert res.changed_blocks == 2 + 8
    assert res.new_blocks == 0
    restore_to(repo, res.snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)
    restore_to(repo, first.snapshot_id, tmp_path / "first.img")
    assert same_file(tmp_path / "first.img", first_copy)


def test_a_first_backups_index_spans_without_data_are_fed_as_zeros_and_the_frame_is_the_same(repo, tmp_path, monkeypatch):
    """A first backup hands the index encoder the record spans holding no data block, so
    it never reads them (never-written memory); the stored index must be exactly the
    frame of the whole records array, and the snapshot restore exactly."""
    from pyvbak.engine import backup as engine

    monkeypatch.setattr(engine, "ZERO_SPAN_RECORDS", 4)
    seen = []
    real = fmt.encode_snapshot_index

    def spy(block_size, disk_size, records, known_zero=None):
        seen.append(known_zero)
        framed = real(block_size, disk_size, records, known_zero=known_zero)
        assert framed == real(block_size, disk_size, records)
        return framed

    monkeypatch.setattr(fmt, "encode_snapshot_index", spy)
    img = tmp_path / "thin.img"
    with open(img, "wb") as f:
        f.truncate(61 * BS + 700)  # a short last block, in a span of its own
        for blk in (1, 2, 9, 31, 61):
            f.seek(blk * BS)
            f.write(random_bytes(BS if blk < 61 else 700, blk))
        f.seek(20 * BS)
        f.write(bytes(BS))  # a zero block that is data on disk: its record is zero too
    first = backup_file(repo, img)
    # spans of 4 records: data in spans 0, 2, 7 and 15
    assert seen[-1] == [(4, 8), (12, 28), (32, 60)]
    restore_to(repo, first.snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)
    write_at(img, 40 * BS, random_bytes(BS, 99))
    second = backup_file(repo, img)
    assert seen[-1] is None  # a backup with a parent reuses the parent's index instead
    restore_to(repo, second.snapshot_id, tmp_path / "out2.img")
    assert same_file(tmp_path / "out2.img", img)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "garbage"])
def test_a_damaged_latest_snapshot_does_not_stop_the_next_backup(repo, tmp_path, damage):
    """The next backup of the disk is made without the unreadable parent (a full scan,
    with a warning naming it); it restores alone, and the one after is incremental again."""
    img = tmp_path / "disk.img"
    vm_image(img, 2 * MiB + 100, seed=61)
    first = backup_file(repo, img)
    index = os.path.join(repo.location, fmt.snapshot_index_name(first.snapshot_id))
    if damage == "missing":
        os.unlink(index)
    elif damage == "garbage":  # not a zstd frame at all (random bytes from the first one)
        os.chmod(index, 0o644)
        with open(index, "wb") as f:
            f.write(random_bytes(500, 64))
    else:
        os.chmod(index, 0o644)
        with open(index, "r+b") as f:
            f.seek(10)
            f.write(b"\xff" * 16)
    rewrite_pages(img, fraction=0.05, seed=62)
    res = backup_file(repo, img)
    assert res.parent is None and res.changed_blocks == -(-(2 * MiB + 100) // BS)
    assert any(f"previous snapshot {first.snapshot_id} cannot be read" in w for w in res.warnings)
    restore_to(repo, res.snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)
    rewrite_pages(img, fraction=0.01, seed=63)
    nxt = backup_file(repo, img)
    assert nxt.parent == res.snapshot_id and nxt.changed_blocks < res.changed_blocks


class TrackedImage:
    """An image file as a change-tracking source (the QEMU session's shape: no fileno, so
    the dirty extents are read as streams) reporting the given dirty byte extents."""

    def __init__(self, path, extents):
        from pyvbak.sources.file import FileSource

        self.file = FileSource(os.fspath(path))
        self.dirty = list(extents)

    def __enter__(self):
        self.file.__enter__()
        self.size, self.description = self.file.size, self.file.description
        return self

    def __exit__(self, *exc):
        self.file.__exit__(*exc)

    def read(self, offset, length):
        return self.file.read(offset, length)

    def read_ranges_into(self, ranges, buffer):
        return self.file.read_ranges_into(ranges, buffer)

    def extents(self):
        return self.file.extents()

    def change_tracking(self, previous_state):
        from pyvbak.sources.base import ChangeTracking

        return ChangeTracking(self.dirty, {"kind": "test"}, None)


def test_a_change_tracking_incremental_holds_only_its_dirty_blocks_records_and_writes_the_same_index(tmp_path, monkeypatch, parents_streamed):
    """The parent's index is read in chunks, its dirty blocks' records kept, the rest read
    again at commit and patched into the new index on the way to the compressor: the
    index must be exactly what the whole parent index in memory gives."""
    from pyvbak.engine import backup as engine

    monkeypatch.setattr(fmt, "SNAPSHOT_INDEX_CHUNK", 7, raising=False)
    real_iter = fmt.iter_snapshot_index
    monkeypatch.setattr(fmt, "iter_snapshot_index", lambda data, what, chunk_records=1 << 20, **kw:
                        real_iter(data, what, 7, **kw))  # many chunks, a short last one
    img = vm_image(tmp_path / "d.img", 4 * MiB + 3 * BS + 4097, seed=5)
    first = Repository.init(str(tmp_path / "streamed"))
    backup_file(first, img)
    shutil.copytree(tmp_path / "streamed", tmp_path / "whole")  # the same key: the same fast hashes
    repos = [first, Repository.open(str(tmp_path / "whole"))]
    dirty = [(0, BS), (5 * BS + 100, 3 * BS), (40 * BS, 2 * BS), (67 * BS, 4097)]  # the last: the short tail
    write_at(img, 0, random_bytes(BS, 1))
    write_at(img, 5 * BS + 100, random_bytes(2 * BS, 2))  # the third block stays as it was
    punch_hole(img, 40 * BS, 2 * BS)  # dirty and now zero
    write_at(img, 67 * BS + 10, random_bytes(4000, 3))
    parents_streamed.clear()  # the full backups above were made whole
    results = []
    for repo, stream in zip(repos, (True, False)):
        monkeypatch.setattr(engine, "STREAM_PARENT_MIN_BYTES", 0 if stream else 1 << 62)
        with repo.lock(), TrackedImage(img, dirty) as src:
            results.append(engine.run_backup(repo, src, vm="vm1", disk="disk0"))
    assert parents_streamed == [True, False], results[0].warnings
    assert all(r.cbt for r in results) and results[0].changed_blocks == results[1].changed_blocks
    indexes = [repo.load_snapshot_index(repo.resolve(r.snapshot_id))[2] for repo, r in zip(repos, results)]
    differ = np.flatnonzero(indexes[0] != indexes[1])
    assert not len(differ), (differ, indexes[0][differ[:3]], indexes[1][differ[:3]])
    frames = [repo.backend.read(fmt.snapshot_index_name(r.snapshot_id)) for repo, r in zip(repos, results)]
    assert frames[0] == frames[1]
    for repo, r in zip(repos, results):
        restore_to(repo, r.snapshot_id, tmp_path / f"out-{r.snapshot_id}.img")
        assert same_file(tmp_path / f"out-{r.snapshot_id}.img", img)


def test_a_scanning_incremental_keeps_hashes_and_changed_records_and_writes_the_same_index(tmp_path, monkeypatch, parents_streamed):
    """An incremental that scans an image keeps the parent's hashes and zero marks, and
    records for the blocks it finds changed; the rest of the new index is the parent's,
    streamed at commit: the same frame as with the whole parent index in memory."""
    from pyvbak.engine import backup as engine

    real_iter = fmt.iter_snapshot_index
    monkeypatch.setattr(fmt, "iter_snapshot_index", lambda data, what, chunk_records=1 << 20, **kw:
                        real_iter(data, what, 5, **kw))
    monkeypatch.setattr(engine, "SCAN_WINDOW_BYTES", 4 * BS)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * BS)
    img = vm_image(tmp_path / "d.img", 2 * MiB + 7 * BS + 999, seed=8)
    punch_hole(img, 10 * BS, 6 * BS)  # holes in the parent
    first = Repository.init(str(tmp_path / "streamed"))
    backup_file(first, img)
    shutil.copytree(tmp_path / "streamed", tmp_path / "whole")
    repos = [first, Repository.open(str(tmp_path / "whole"))]
    write_at(img, 0, random_bytes(BS, 1))                   # changed data
    write_at(img, 10 * BS, bytes(2 * BS))                   # a hole becomes real zeros: unchanged
    write_at(img, 12 * BS, random_bytes(BS, 2))             # a hole gets data
    punch_hole(img, 20 * BS, 8 * BS)                        # data becomes a hole (a whole window)
    write_at(img, 38 * BS + 7, bytes(100))                  # zeros inside data: changed
    write_at(img, os.path.getsize(img) - 50, random_bytes(50, 3))  # the short tail
    parents_streamed.clear()
    results = []
    for repo, stream in zip(repos, (True, False)):
        monkeypatch.setattr(engine, "STREAM_PARENT_MIN_BYTES", 0 if stream else 1 << 62)
        results.append(backup_file(repo, img))
    assert parents_streamed == [True, False]
    assert results[0].changed_blocks == results[1].changed_blocks > 0
    indexes = [repo.load_snapshot_index(repo.resolve(r.snapshot_id))[2] for repo, r in zip(repos, results)]
    assert np.array_equal(indexes[0], indexes[1])
    frames = [repo.backend.read(fmt.snapshot_index_name(r.snapshot_id)) for repo, r in zip(repos, results)]
    assert frames[0] == frames[1]
    restore_to(repos[0], results[0].snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)


def test_a_parent_forgotten_during_a_streamed_incremental_is_a_clear_error(repo, tmp_path, monkeypatch):
    """A large disk's incremental reads its parent's index again at commit; forget (which
    runs beside backups) may have taken it by then: one clear error, nothing committed,
    and the next backup works."""
    from pyvbak.engine import backup as engine
    from pyvbak.errors import RepositoryError

    monkeypatch.setattr(engine, "STREAM_PARENT_MIN_BYTES", 0)
    img = tmp_path / "disk.img"
    vm_image(img, 2 * MiB + 100, seed=65)
    first = backup_file(repo, img)
    rewrite_pages(img, fraction=0.05, seed=66)
    real_commit = Repository.commit_snapshot

    def forget_then_commit(self, *args, **kwargs):
        self.backend.delete(fmt.snapshot_meta_name(first.snapshot_id))  # what forget does
        self.backend.delete(fmt.snapshot_index_name(first.snapshot_id))
        return real_commit(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Repository, "commit_snapshot", forget_then_commit)
        with pytest.raises(RepositoryError, match="parent, was forgotten while the backup ran"):
            backup_file(repo, img)
    assert repo.snapshots() == [] and list(repo.backend.list("snapshots/")) == []
    again = backup_file(repo, img)
    restore_to(repo, again.snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)


def test_a_description_copied_over_anothers_is_damaged(repo, tmp_path):
    """It used to be read as the snapshot whose name it has, with the other one's VM, time
    and index: listings, VM@latest and --keep-last then acted on the wrong VM."""
    img = tmp_path / "disk.img"
    vm_image(img, 1 * MiB, seed=67)
    a = backup_file(repo, img, vm="a").snapshot_id
    b = backup_file(repo, img, vm="b").snapshot_id
    dst = os.path.join(repo.location, fmt.snapshot_meta_name(a))
    os.chmod(dst, 0o644)
    shutil.copyfile(os.path.join(repo.location, fmt.snapshot_meta_name(b)), dst)
    fresh = Repository.open(repo.location)
    ids = [s.id for s in fresh.snapshots(cached=False)]
    assert ids == [b] and fresh.damaged_snapshots == [fmt.snapshot_meta_name(a)]
    assert fresh.latest("a", "disk0") is None


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("becomes", ["other data", "zeros"])
def test_a_block_written_between_the_scan_and_its_second_read_is_kept_as_one_read_saw_it(tmp_path, monkeypatch,
                                                                                          streamed, becomes):
    """An incremental of a file maps a window, scans it, then reads its changed blocks
    again.  A block written between the two reads was stored as the second read saw it
    (B) under the fast hash of the first (A): once the disk held A again, every later
    backup took the block for unchanged and restored B, and verify passed (session 26's
    audit).  Now its data, digest and fast hash come from one read."""
    from pyvbak import native
    from pyvbak.engine import backup as engine

    monkeypatch.setattr(engine, "STREAM_PARENT_MIN_BYTES", 0 if streamed else 1 << 62)
    img = make_image(tmp_path / "d.img", 16 * BS, [(0, 16 * BS, "random")], seed=11)
    repo = Repository.init(str(tmp_path / "repo"))
    backup_file(repo, img)
    a = random_bytes(BS, 12)
    b = random_bytes(BS, 13) if becomes == "other data" else bytes(BS)
    write_at(img, 3 * BS, a)
    real, written = native.scan_fd_range, []

    def scan_then_a_write(fd, offset, length, *args, **kw):
        out = real(fd, offset, length, *args, **kw)
        if not written:  # the guest writes B right after the scan saw A
            written.append(1)
            write_at(img, 3 * BS, b)
        return out

    monkeypatch.setattr(native, "scan_fd_range", scan_then_a_write)
    raced = backup_file(repo, img)
    monkeypatch.setattr(native, "scan_fd_range", real)
    assert written
    restore_to(repo, raced.snapshot_id, tmp_path / "raced.img")
    assert (tmp_path / "raced.img").read_bytes()[3 * BS : 4 * BS] == b  # as the second read saw it
    write_at(img, 3 * BS, a)  # the disk holds A again, and stays idle
    idle = backup_file(repo, img)
    assert idle.changed_blocks == 1
    restore_to(repo, idle.snapshot_id, tmp_path / "idle.img")
    assert same_file(tmp_path / "idle.img", img)


def test_a_file_written_while_it_is_read_gets_a_warning(tmp_path, monkeypatch):
    """A file is read as it is, not frozen: a backup of one being written (a running VM's
    raw disk, a file copied into place) said nothing (session 26's audit)."""
    from pyvbak.sources.file import FileSource

    img = make_image(tmp_path / "d.img", 16 * BS, [(0, 16 * BS, "random")], seed=21)
    repo = Repository.init(str(tmp_path / "repo"))
    quiet = backup_file(repo, img)
    assert quiet.warnings == []
    real, written = FileSource.read_ranges_into, []

    def read_then_a_write(self, ranges, buffer):
        n = real(self, ranges, buffer)
        if not written:
            written.append(1)
            write_at(img, 9 * BS, random_bytes(BS, 22))
        return n

    monkeypatch.setattr(FileSource, "read_ranges_into", read_then_a_write)
    write_at(img, 0, random_bytes(BS, 23))
    os.utime(img, ns=(0, 0))  # (so the write during the backup moves the time: two writes can share a clock tick)
    res = backup_file(repo, img)
    assert written
    [warning] = res.warnings
    assert warning.startswith(f"{img} was written while it was read") and "qemu:///" in warning
