"""Review of the late changes: read failures versus damage, and their neighbours."""

from __future__ import annotations

import os

from images import BS, backup_file, make_image
from pyvbak.cli.main import main
from pyvbak.errors import IntegrityError
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository


def test_a_pack_cut_short_before_its_first_frames_is_all_damage(tmp_path):
    """Frames of a range wholly past a pack's end, after the frame-by-frame retry gives up,
    were reported as read failures (ReadFailure): --repair kept their records and backups
    kept deduplicating against a pack that no longer holds them."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 30 * BS, [(0, 30 * BS, "random")], seed=7)
    backup_file(repo, img)
    (pack,) = list(repo.backend.list("packs/"))
    path = repo.location + "/" + pack
    os.chmod(path, 0o644)
    os.truncate(path, 100)
    report = verify_repository(repo, threads=2)
    assert report["unreadable_copy_count"] == 0
    assert report["problem_count"] == 30 and len(report["_bad_records"]) == 30
    assert all("cut short" in p["reason"] for p in report["problems"])
    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    pid = bytes.fromhex(pack.rsplit("/", 1)[-1])
    assert not any(bytes(r["pack"]) == pid for r in Repository.open(repo.location).load_digest_index().records)
