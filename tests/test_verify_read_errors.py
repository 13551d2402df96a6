"""verify and --repair with copies that cannot be read (I/O errors) - unlike copies that
are missing, cut short or damaged, a read error says nothing about the stored data and may
pass (a network file system's blip, an outage): --repair must not drop the records of
intact copies over it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from images import BS, backup_file, make_image, restore_to, same_file
from pyvbak.cli.main import main
from pyvbak.errors import IntegrityError
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository
from repo_faults import failing_reads, records_of


@pytest.fixture
def one_pack(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 12 * BS, [(0, 12 * BS, "random")], seed=7)
    sid = backup_file(repo, img).snapshot_id
    (pack,) = list(repo.pack_object_names())
    return repo, img, sid, pack


def test_a_passing_read_error_is_read_again_and_is_no_problem(one_pack, monkeypatch):
    repo, _, _, pack = one_pack
    # the range read, then each frame alone until 8 fail in a row and one probe read fails
    # too: the whole first pass fails; the second, at the end, finds the storage back
    from pyvbak.repo import reader

    first_pass = 1 + reader.FRAME_RETRY_GIVE_UP + 1
    calls = failing_reads(monkeypatch, pack, times=first_pass)
    report = verify_repository(repo, threads=2).report
    assert calls["n"] == first_pass
    assert report["ok"] and report["problem_count"] == 0 and report["unreadable_copy_count"] == 0
    assert report["blocks_checked"] == 12


def test_repair_keeps_the_records_of_copies_it_cannot_read_unless_told(one_pack, monkeypatch, capsys):
    repo, img, sid, pack = one_pack
    failing_reads(monkeypatch, pack, times=None)
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location, "--repair", "--json"]) == IntegrityError.exit_code
    report = json.loads(capsys.readouterr().out)
    assert report["unreadable_copy_count"] == 12 and report["problem_count"] == 12
    assert [a["id"] for a in report["affected_snapshots"]] == [sid]
    assert report["repair"]["records_removed"] == 0
    assert records_of(repo.location, pack) == 12  # kept: the read error may pass

    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    err = capsys.readouterr().err
    assert "could not be read (I/O errors, twice)" in err and "--drop-unreadable" in err

    monkeypatch.undo()  # the storage is back: nothing was lost
    assert verify_repository(Repository.open(repo.location), threads=2).report["ok"]
    out = Path(img).parent / "out.img"
    restore_to(Repository.open(repo.location), sid, out)
    assert same_file(out, img)

    failing_reads(monkeypatch, pack, times=None)  # a bad stretch that stays: the user decides
    assert main(["verify", "--repo", repo.location, "--repair", "--drop-unreadable"]) == IntegrityError.exit_code
    assert records_of(repo.location, pack) == 0


def test_a_pack_cut_short_is_damage_not_a_read_error(one_pack, capsys):
    """A pack shorter than its index says (RangeBeyondEnd) is a fact about the stored data:
    plain --repair drops the frames past its end."""
    repo, _, _, pack = one_pack
    path = repo.location + "/" + pack
    os.chmod(path, 0o644)
    os.truncate(path, os.path.getsize(path) // 2)
    verified = verify_repository(repo, threads=2)
    report = verified.report
    assert report["unreadable_copy_count"] == 0 and report["problem_count"] > 0
    assert len(verified.findings.bad_copies) == report["problem_count"]


def test_drop_unreadable_needs_repair(one_pack, capsys):
    repo, *_ = one_pack
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location, "--drop-unreadable"]) == 2
    assert "--drop-unreadable is a choice of --repair" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "append"])
def test_verify_checks_pack_tables_of_contents_and_repair_rebuilds_them(tmp_path, capsys, damage):
    """verify read frames through the pack index only: a pack whose own table of contents
    (trailer) had a flipped bit or bytes after it passed as clean, and once its pack index
    was lost too, every block in it was lost - though every frame was intact.  Now verify
    reports it (exit 6) and --repair rebuilds it from the pack index, written only when it
    hashes to the pack's name; adoption then works again."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 40 * BS, [(0, 40 * BS, "random")], seed=21)
    sid = backup_file(repo, img).snapshot_id
    (pack,) = list(repo.pack_object_names())
    path = repo.location + "/" + pack
    os.chmod(path, 0o644)
    original = open(path, "rb").read()
    with open(path, "r+b") as f:
        if damage == "flip":
            f.seek(len(original) - 100)
            b = f.read(1)
            f.seek(len(original) - 100)
            f.write(bytes([b[0] ^ 1]))
        else:
            f.seek(0, 2)
            f.write(b"junk")
    report = verify_repository(Repository.open(repo.location), threads=2).report
    assert not report["ok"] and report["problem_count"] == 0
    assert [t["pack"] for t in report["damaged_pack_trailers"]] == [pack.rsplit("/", 1)[1]]
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location]) == IntegrityError.exit_code
    assert "table of contents" in capsys.readouterr().err
    assert main(["verify", "--repo", repo.location, "--repair", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["repair"]["trailers_rebuilt"]) == 1 and out["repair"]["complete"]
    assert open(path, "rb").read() == original  # the very pack it was
    assert verify_repository(Repository.open(repo.location), threads=2).report["ok"]
    # the trailer does its job again: with every pack index gone, adoption re-indexes it
    for name in repo.backend.list("index/"):
        repo.backend.delete(name)
    r = Repository.open(repo.location)
    assert any("adopted" in line for line in r.recover_leftovers(after_crash=True))
    out_img = tmp_path / "r.img"
    restore_to(Repository.open(repo.location), sid, out_img)
    assert same_file(out_img, img)


def test_a_table_of_contents_that_lacks_an_indexed_block_is_named(tmp_path):
    """The trailer check compares the index's records of a pack with the trailer's, as
    48-byte keys: intact, nothing; one record the trailer does not list, the pack."""
    from pyvbak.repo.verify import check_pack_trailers

    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 8 * BS, [(0, 8 * BS, "random")], seed=3)
    backup_file(repo, img)
    recs = repo.load_digest_index().records
    assert check_pack_trailers(repo, recs) == {}
    bad = recs.copy()
    bad["ulen"][0] = 123
    (pack,) = list(repo.pack_object_names())
    assert check_pack_trailers(repo, bad) == {
        pack.rsplit("/", 1)[1]: "its table of contents does not list blocks the pack index says it holds"}
