"""Disk full during a backup: the backup fails with OutOfSpace, nothing is visible, the
repository verifies clean, and the next backup adopts the packs the failed one left."""

from __future__ import annotations

import os
import shutil


import pytest

from images import MiB, assert_one_error_line, backup_file, make_image, restore_to, same_file
from pyvbak.backends import FaultInjectingBackend, open_backend
from pyvbak.errors import OutOfSpace, SourceError
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository

SMALL_PACK = 1 * MiB


@pytest.fixture(autouse=True)
def small_packs(monkeypatch):
    # many packs from a small image, so "the Nth pack write" has meaning
    monkeypatch.setattr("pyvbak.engine.backup.PACK_TARGET_BYTES", SMALL_PACK)


@pytest.fixture
def setup(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 8 * MiB + 5, [(0, 8 * MiB + 5, "random")], seed=51)
    return repo, img


def faulty(repo, **kw):
    return Repository(FaultInjectingBackend(open_backend(repo.location), **kw), repo.config)


def packs(repo):
    return sorted(repo.pack_object_names())


def test_out_of_space_on_third_pack_then_heal(setup, tmp_path):
    repo, img = setup
    bad = faulty(repo, fail_on_write=3, prefix="packs/")
    with pytest.raises(OutOfSpace, match="out of space") as failed:
        backup_file(bad, img)
    assert bad.backend.faults >= 1
    written = bad.backend.writes
    assert written >= 2  # packs 1 and 2 were stored (and maybe one more in flight)

    fresh = Repository.open(repo.location)
    assert fresh.snapshots() == []
    assert list(fresh.backend.list("snapshots/")) == []
    assert len(packs(fresh)) == written
    # The failed backup indexed the packs it had stored: they were dead weight until a
    # prune, and the retry, which finds no stale lock, stored them all over again.
    assert len(fresh.pack_index_names()) == 1
    assert failed.value.kept_packs[0] == written
    assert fresh.load_digest_index().records["pack"].shape[0] > 0
    report = verify_repository(fresh, threads=2).report
    assert report["ok"] and report["problem_count"] == 0

    # space is freed; nothing is left for the next run's recovery to adopt
    bad.backend.heal()
    assert not [line for line in bad.recover_leftovers() if line.startswith("adopted")]
    res = backup_file(bad, img)
    # the adopted blocks are not stored again
    assert res.new_bytes < 8 * MiB + 5
    assert res.new_bytes <= (8 * MiB + 5) - written * (SMALL_PACK - 64 * 1024)
    assert [s.id for s in fresh.snapshots()] == [res.snapshot_id]
    assert verify_repository(fresh, threads=2).report["ok"]
    restore_to(fresh, res.snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)
    # a second recovery finds nothing left to adopt
    assert not [line for line in fresh.recover_leftovers() if "adopted" in line]


@pytest.mark.parametrize("prefix", ["index/", "snapshots/"])
def test_out_of_space_at_commit_leaves_no_snapshot(setup, tmp_path, prefix):
    """Space runs out after the packs, when writing the pack index or the snapshot."""
    repo, img = setup
    bad = faulty(repo, fail_on_write=1 if prefix == "index/" else 2, prefix=prefix)
    with pytest.raises(OutOfSpace):
        backup_file(bad, img)
    fresh = Repository.open(repo.location)
    assert fresh.snapshots() == []
    assert not [n for n in fresh.backend.list("snapshots/") if n.endswith(".json")]
    assert verify_repository(fresh, threads=2).report["ok"]
    bad.backend.heal()
    bad.recover_leftovers()
    res = backup_file(bad, img)
    assert fresh.snapshots()[0].id == res.snapshot_id
    if prefix == "index/":  # the packs were adopted, so nothing was stored twice
        assert res.new_bytes == 0
    restore_to(fresh, res.snapshot_id, tmp_path / "o.img")
    assert same_file(tmp_path / "o.img", img)


def test_out_of_space_after_bytes_incremental_keeps_parent(setup, tmp_path):
    repo, img = setup
    first = backup_file(repo, img)
    from images import rewrite_pages

    rewrite_pages(img, fraction=0.3, seed=52)
    bad = faulty(repo, fail_after_bytes=2 * MiB, prefix="packs/")
    with pytest.raises(OutOfSpace):
        backup_file(bad, img)
    fresh = Repository.open(repo.location)
    assert [s.id for s in fresh.snapshots()] == [first.snapshot_id]
    assert verify_repository(fresh, threads=2).report["ok"]
    # the parent still restores; the next backup is still an incremental of it
    bad.backend.heal()
    bad.recover_leftovers()
    res = backup_file(bad, img)
    assert res.parent == first.snapshot_id
    restore_to(fresh, res.snapshot_id, tmp_path / "o.img")
    assert same_file(tmp_path / "o.img", img)


def test_cli_out_of_space_exit_code(setup, capsys, monkeypatch):
    repo, img = setup
    from pyvbak.cli import backup_cmd
    from pyvbak.cli.main import main

    bad = faulty(repo, fail_on_write=1, prefix="packs/")
    monkeypatch.setattr(backup_cmd, "open_repository", lambda location, **kw: bad)
    capsys.readouterr()
    code = main(["backup", str(img), "--repo", repo.location, "--vm", "full", "--json"])
    out = capsys.readouterr()
    assert code == 9
    assert out.out == ""
    assert_one_error_line(out.err, "out of space", "packs/")
    assert Repository.open(repo.location).snapshots() == []
    assert list(repo.backend.list("locks/")) == []  # the lock was released on the error


def test_image_shrinking_during_incremental_scan(setup, tmp_path, capsys, monkeypatch):
    """The image loses its tail while an incremental maps it window by window: one clear
    error line naming the image, no snapshot, the parent still restores, no lock left."""
    repo, img = setup
    first = backup_file(repo, img)
    parent_copy = tmp_path / "parent.img"
    shutil.copyfile(img, parent_copy)
    from pyvbak import native
    from pyvbak.cli.main import main
    from pyvbak.engine import backup as engine

    monkeypatch.setattr(engine, "SCAN_WINDOW_BYTES", 1 * MiB)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1 * MiB)
    real = native.scan_fd_range
    calls = []

    def shrink_then_scan(fd, offset, length, *a, **kw):
        calls.append(offset)
        if len(calls) == 3:  # mid-backup: the file is cut to 2 MiB
            os.truncate(img, 2 * MiB)
        return real(fd, offset, length, *a, **kw)

    monkeypatch.setattr(native, "scan_fd_range", shrink_then_scan)
    capsys.readouterr()
    code = main(["backup", str(img), "--repo", repo.location, "--vm", "vm1", "--disk", "disk0", "--json"])
    out = capsys.readouterr()
    assert len(calls) >= 3
    assert code == SourceError.exit_code
    assert out.out == ""
    assert_one_error_line(out.err, str(img), "shorter than")
    fresh = Repository.open(repo.location)
    assert [s.id for s in fresh.snapshots()] == [first.snapshot_id]
    assert list(fresh.backend.list("locks/")) == []
    assert verify_repository(fresh, threads=2).report["ok"]
    restore_to(fresh, first.snapshot_id, tmp_path / "o.img")
    assert same_file(tmp_path / "o.img", parent_copy)


def test_an_interrupt_in_the_pack_index_write_still_indexes_the_packs(setup, monkeypatch):
    """Ctrl-C or SIGTERM while the commit writes the pack index: the packs are stored
    whole, and the backup indexes them before it gives up (as after a failed data phase),
    so its retry does not store them again; without it they waited for a prune."""
    repo, img = setup
    real, calls = Repository.write_pack_index, {"n": 0}

    def interrupted_once(self, records):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(self, records)

    monkeypatch.setattr(Repository, "write_pack_index", interrupted_once)
    with pytest.raises(KeyboardInterrupt) as failed:
        backup_file(repo, img)
    fresh = Repository.open(repo.location)
    assert fresh.snapshots() == [] and len(fresh.pack_index_names()) == 1
    assert failed.value.kept_packs[0] == len(packs(fresh))
    monkeypatch.undo()
    res = backup_file(fresh, img)
    assert res.new_bytes == 0  # everything was stored and indexed by the interrupted run
