"""Read failures versus damage, and their neighbours."""

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
    (pack,) = list(repo.pack_object_names())
    path = repo.location + "/" + pack
    os.chmod(path, 0o644)
    os.truncate(path, 100)
    verified = verify_repository(repo, threads=2)
    report = verified.report
    assert report["unreadable_copy_count"] == 0
    assert report["problem_count"] == 30 and len(verified.findings.bad_copies) == 30
    assert all("cut short" in p["reason"] for p in report["problems"])
    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    pid = bytes.fromhex(pack.rsplit("/", 1)[-1])
    assert not any(bytes(r["pack"]) == pid for r in Repository.open(repo.location).load_digest_index().records)


def test_an_unreadable_copy_beside_a_good_one_is_not_called_damaged(tmp_path, monkeypatch, capsys):
    """A redundant copy that cannot be read was listed among the damaged copies: the CLI
    said "8 damaged copy(ies) ... removed below" while --repair kept them, and the exit
    line counted them as damaged."""
    import json

    from repo_faults import Copies, failing_reads
    from pyvbak.repo import format as fmt

    copies = Copies(tmp_path)
    failing_reads(monkeypatch, fmt.pack_name(copies.pa.hex()), times=None)
    capsys.readouterr()
    assert main(["verify", "--repo", copies.path, "--repair"]) == IntegrityError.exit_code
    err = capsys.readouterr().err
    assert "damaged" not in err and "removed below" not in err
    assert "8 redundant block copy(ies) that could not be read" in err
    assert copies.copy_packs(copies.shared[0]) == sorted([copies.pa, copies.pb])  # kept

    assert main(["verify", "--repo", copies.path, "--json"]) == IntegrityError.exit_code
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problem_count"] == 0
    assert report["damaged_copy_count"] == 0 and report["damaged_copies"] == []
    assert report["unreadable_copy_count"] == 8 and report["unreadable_redundant_copy_count"] == 8
    assert {c["pack"] for c in report["unreadable_redundant_copies"]} == {copies.pa.hex()}

    monkeypatch.undo()
    assert verify_repository(copies.repo(), threads=2).report["ok"]
    copies.assert_all_restore()


def test_repair_does_not_drop_a_put_back_pack_over_a_read_error_in_its_recheck(tmp_path, monkeypatch, capsys):
    """verify --repair read a lost/-marked pack once more before adopting it and dropped
    what that read could not read: a read error there (an NFS blip) had the intact pack
    adopted and its records removed again at once, under a new lost/ marker."""
    import json
    import shutil

    from repo_faults import records_of
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 12 * BS, [(0, 12 * BS, "random")], seed=7)
    backup_file(repo, img)
    (pack,) = list(repo.pack_object_names())
    path = repo.location + "/" + pack
    shutil.move(path, path + ".away")  # gone: --repair drops its records, a lost/ marker names it
    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    assert records_of(repo.location, pack) == 0
    shutil.move(path + ".away", path)  # put back, intact
    markers = len(Repository.open(repo.location).lost_markers())

    real, calls = LocalBackend.read_range_into, []

    def read_range_into(self, name, offset, buf):
        if name == pack:
            calls.append(offset)
            if 2 <= len(calls) <= 11:  # verify's own read passes; the next ones fail
                raise BackendError(f"reading {name}: Input/output error")
        return real(self, name, offset, buf)

    monkeypatch.setattr(LocalBackend, "read_range_into", read_range_into)
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location, "--repair", "--json"]) == IntegrityError.exit_code
    report = json.loads(capsys.readouterr().out)
    assert report["repair"]["records_removed"] == 0
    assert len(Repository.open(repo.location).lost_markers()) == markers

    monkeypatch.undo()  # the blip is over: the next repair adopts the pack whole
    main(["verify", "--repo", repo.location, "--repair"])
    assert records_of(repo.location, pack) == 12
    assert verify_repository(Repository.open(repo.location), threads=2).report["ok"]
