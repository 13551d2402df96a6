"""A plain verify flags the bad copies it finds, and the next backup stores those blocks again.

Before, every backup after the damage deduplicated against the bad copy until someone ran
``verify --repair`` (exclusive lock): each new snapshot was as unrestorable as the old ones
(the session-17 acceptance audit).  Now verify writes a ``lost/`` marker with the copies
it found corrupt or missing ("flagged"); backups treat a block whose every copy is flagged
as absent (docs/FORMAT.md, "Lost packs").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from images import BS, make_image, same_file
from pyvbak.cli.main import main
from pyvbak.repo import digest_sets
from pyvbak.repo.repository import Repository


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _damaged_repo(tmp_path, capsys, seed, *, blocks=40):
    """A repository with one snapshot of a random image whose first stored frame is
    corrupt: (repo, image, the bad copy's (digest, pack, offset))."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", blocks * BS, [(0, blocks * BS, "random")], seed=seed)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    rec = Repository.open(str(repo)).load_digest_index().records[0]
    pack_hex = bytes(rec["pack"]).ljust(32, b"\0").hex()
    path = repo / "packs" / pack_hex[:2] / pack_hex
    data = bytearray(path.read_bytes())
    data[int(rec["offset"]) + 7] ^= 0x55
    os.chmod(path, 0o644)
    path.write_bytes(data)
    return repo, img, (bytes(rec["digest"]).ljust(32, b"\0"), bytes(rec["pack"]).ljust(32, b"\0"), int(rec["offset"]))


def _markers(repo):
    return sorted(os.listdir(repo / "lost")) if (repo / "lost").is_dir() else []


def _restores_everything(capsys, tmp_path, repo, img, tag=""):
    for snap in Repository.open(str(repo)).snapshots():
        out = tmp_path / f"r{tag}-{snap.id}.img"
        code, _, err = cli(capsys, "restore", snap.id, out, "--repo", repo)
        assert code == 0 and same_file(out, img), err
        # the good copy is read first: no detour through the flagged one
        assert "had a missing or damaged copy" not in err, err
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        sh_out = tmp_path / f"sh{tag}-{snap.id}.img"
        done = subprocess.run(["sh", str(repo / "restore.sh"), snap.id, str(sh_out)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and same_file(sh_out, img), done.stderr


def test_the_backup_after_a_plain_verify_stores_the_bad_block_again_and_every_snapshot_restores(tmp_path, capsys):
    repo, img, bad = _damaged_repo(tmp_path, capsys, 301)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    last = err.strip().splitlines()[-1]
    assert code == 6 and "back up the affected disks" in last and "verify --repair" not in last, err
    (marker,) = _markers(repo)
    assert f"flagged 1 bad block copy(ies) (lost/{marker})" in err
    doc = json.loads((repo / "lost" / marker).read_text())
    assert doc["packs"] == [] and doc["records"] == 0
    assert doc["flagged"] == [[bad[0].hex(), bad[1].hex(), bad[2]]]

    # an incremental of the unchanged image: its parent names the flagged block, so the
    # whole disk is read, and the block stored again
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    res = json.loads(out)
    assert code == 0 and res["new_blocks"] == 1 and res["new_bytes"] == BS, err
    assert any(f"lost/{marker}" in w for w in res["warnings"]), res["warnings"]
    _restores_everything(capsys, tmp_path, repo, img)

    # the bad copy is still there, beside a good one: no snapshot is affected
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 6 and report["affected_snapshots"] == [] and report["damaged_copy_count"] == 1, err
    assert _markers(repo) == [marker]  # flagged before: not flagged again
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 0
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    _restores_everything(capsys, tmp_path, repo, img, "-repaired")


def test_a_verify_run_twice_flags_once_and_still_sends_to_the_backup(tmp_path, capsys):
    repo, img, _ = _damaged_repo(tmp_path, capsys, 302)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 6 and report["flagged"] == {"marker": None, "copies": 0, "error": None}
    assert len(_markers(repo)) == 1
    assert "back up the affected disks" in err.strip().splitlines()[-1], err


def test_verify_without_a_lock_writes_nothing_and_names_the_repair(tmp_path, capsys):
    repo, img, _ = _damaged_repo(tmp_path, capsys, 303)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--no-lock")
    assert code == 6 and _markers(repo) == []
    assert "were not flagged" in err and "--no-lock" in err
    assert "verify --repair" in err.strip().splitlines()[-1], err


def test_another_vm_holding_the_same_data_stores_it_again(tmp_path, capsys):
    """Deduplication across VMs skipped the flagged copy too: a first backup of another VM
    with the same data is restorable."""
    repo, img, _ = _damaged_repo(tmp_path, capsys, 304)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "other", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 1, err
    code, _, err = cli(capsys, "restore", "other@latest", tmp_path / "o.img", "--repo", repo)
    assert code == 0 and same_file(tmp_path / "o.img", img), err


def test_a_lost_pack_is_flagged_and_stored_again_by_the_next_backup(tmp_path, capsys):
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", 40 * BS, [(0, 40 * BS, "random")], seed=305)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    (pack,) = Repository.open(str(repo)).backend.list("packs/")
    os.unlink(repo / pack)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "back up the affected disks" in err.strip().splitlines()[-1], err
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 40, err
    _restores_everything(capsys, tmp_path, repo, img)


def test_dedup_index_hides_a_block_only_while_every_copy_of_it_is_flagged(tmp_path, capsys):
    repo, img, bad = _damaged_repo(tmp_path, capsys, 306, blocks=4)
    r = Repository.open(str(repo))
    assert r.dedup_index().find(bad[0]) >= 0  # nothing flagged yet
    r.write_flag_marker([bad])
    r = Repository.open(str(repo))
    assert r.dedup_index().find(bad[0]) < 0 and r.load_digest_index().find(bad[0]) >= 0
    others = [bytes(d).ljust(32, b"\0") for d in r.load_digest_index().records["digest"] if bytes(d).ljust(32, b"\0") != bad[0]]
    assert others and all(r.dedup_index().find(d) >= 0 for d in others)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    r = Repository.open(str(repo))
    assert len(r.load_digest_index().copies(bad[0])) == 2 and r.dedup_index().find(bad[0]) >= 0
    key = digest_sets.copy_key(*bad)
    assert r.flagged_copies().tolist() == [key]


def test_markers_without_flags_or_damaged_ones_flag_nothing_and_stop_no_backup(tmp_path, capsys):
    repo, img, bad = _damaged_repo(tmp_path, capsys, 307, blocks=4)
    r = Repository.open(str(repo))
    r.write_lost_marker([], 0)  # a marker of dropped records (prune, --repair): no flags
    r.backend.write_new("lost/20990101T000000Z-00000000", b"{not json")
    r.backend.write_new("lost/20990101T000000Z-00000001", json.dumps({"flagged": [["zz", 1, -1], "x", [bad[0].hex(), bad[1].hex(), -5]]}).encode())
    r = Repository.open(str(repo))
    assert len(r.flagged_copies()) == 0
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0, err


def test_an_older_pyvbak_reads_a_flag_marker_as_a_marker_of_nothing_dropped(tmp_path, capsys):
    """Format compatibility: the keys an older reader knows keep their meaning (no packs,
    no records dropped); ``flagged`` is an addition (docs/FORMAT.md)."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 308, blocks=4)
    name = Repository.open(str(repo)).write_flag_marker([bad])
    doc = json.loads((repo / name).read_text())
    assert list(doc) == ["time", "packs", "records", "flagged"]
    assert doc["packs"] == [] and doc["records"] == 0 and doc["flagged"][0][2] == bad[2]
    assert sys.modules["pyvbak.repo.repository"].Repository.open(str(repo)).lost_markers() == [name]


def test_a_flag_that_cannot_be_written_leaves_verify_s_report_and_names_the_repair(tmp_path, capsys, monkeypatch):
    """A full disk (or read-only storage) when verify writes its marker: the damage found is
    still what verify reports (exit 6, not the out-of-space exit), with the repair as the
    way out."""
    from pyvbak.backends.local import LocalBackend
    from pyvbak.errors import OutOfSpace

    repo, img, _ = _damaged_repo(tmp_path, capsys, 309)
    real = LocalBackend.write_new

    def full(self, name, data, *a, **k):
        if name.startswith("lost/"):
            raise OutOfSpace(f"no space left on device writing {name}")
        return real(self, name, data, *a, **k)

    monkeypatch.setattr(LocalBackend, "write_new", full)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and _markers(repo) == [], err
    assert "were not flagged" in err and "no space left" in err
    assert "verify --repair" in err.strip().splitlines()[-1], err
