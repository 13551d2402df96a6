"""Regressions found by a simulated month of nightly backups (backup, forget --keep-last,
prune, verify, restore) through the CLI."""

from __future__ import annotations

import pytest

from images import BS, MiB, backup_file, make_image, restore_to, same_file, write_at
from pyvbak.backends import FaultInjectingBackend, open_backend
from pyvbak.repo.prune import forget_snapshots, prune_repository
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository

SMALL_PACK = 1 * MiB


@pytest.fixture(autouse=True)
def small_packs(monkeypatch):
    monkeypatch.setattr("pyvbak.engine.backup.PACK_TARGET_BYTES", SMALL_PACK)
    monkeypatch.setattr("pyvbak.repo.prune.PACK_TARGET_BYTES", SMALL_PACK)


def test_prune_on_full_repository_still_deletes_unused_packs(tmp_path):
    """A nearly full repository: the repack's first new pack does not fit.  Prune used to
    fail with 'out of space' before deleting anything - even packs nothing uses, whose
    deletion needs no room - so 'forget --prune' could never free space there."""
    repo = Repository.init(str(tmp_path / "repo"))
    keep = make_image(tmp_path / "keep.img", 2 * MiB, [(0, 2 * MiB, "random")], seed=1)
    gone = make_image(tmp_path / "gone.img", 2 * MiB, [(0, 2 * MiB, "random")], seed=2)
    s1 = backup_file(repo, keep, vm="a", disk="keep")
    s2 = backup_file(repo, gone, vm="b", disk="gone")
    for k in range(0, 2 * MiB // BS, 2):  # every other block of 'keep' changes
        write_at(keep, k * BS, bytes([k + 1]) * 100)
    s3 = backup_file(repo, keep, vm="a", disk="keep")
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(s1.snapshot_id), repo.resolve(s2.snapshot_id)])
    packs_of_gone = {n for n in repo.pack_object_names()}

    full = Repository(FaultInjectingBackend(open_backend(repo.location), fail_on_write=1, prefix="packs/"), repo.config)
    with full.lock(exclusive=True):
        preview = prune_repository(full, dry_run=True)
        rep = prune_repository(full)
    assert preview["packs_deleted"] >= 1 and preview["packs_repacked"] >= 1
    assert full.backend.faults == 1
    assert rep["packs_deleted"] == preview["packs_deleted"]
    assert rep["packs_repacked"] == 0 and rep["packs_written"] == 0
    assert rep["bytes_freed"] > 0
    assert any("no room left to repack" in p for p in rep["problems"])

    fresh = Repository.open(repo.location)
    left = set(fresh.pack_object_names())
    assert len(left) == len(packs_of_gone) - rep["packs_deleted"]
    assert verify_repository(fresh, threads=2).report["ok"]
    restore_to(fresh, s3.snapshot_id, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", keep)

    # with room again, the next prune repacks what was left
    with fresh.lock(exclusive=True):
        again = prune_repository(fresh)
    assert again["packs_repacked"] >= 1 and not again["problems"]
    assert verify_repository(fresh, threads=2).report["ok"]
    restore_to(fresh, s3.snapshot_id, tmp_path / "out.img", force=True)
    assert same_file(tmp_path / "out.img", keep)
