"""A plain verify flags the bad copies it finds, and the next backup stores those blocks again.

Before, every backup after the damage deduplicated against the bad copy until someone ran
``verify --repair`` (exclusive lock): each new snapshot was as unrestorable as the old ones.
Now verify writes a ``lost/`` marker with the copies it found corrupt or missing
("flagged"); backups treat a block whose every copy is flagged as absent (docs/FORMAT.md,
"Lost packs").
"""

from __future__ import annotations

import json
import os
import subprocess

from images import BS, make_image, same_file
from pyvbak.cli.main import main
from pyvbak.repo import digest_sets
from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_pack_repo(tmp_path, capsys, seed, *, blocks=40):
    """A repository with one snapshot of a random image (up to a pack's worth of blocks),
    in one pack: (repo, image, the pack's object name)."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", blocks * BS, [(0, blocks * BS, "random")], seed=seed)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    (pack,) = Repository.open(str(repo)).pack_object_names()
    return repo, img, pack


def _another_pack(tmp_path, capsys, repo):
    """A second pack in ``repo`` (a backup of VM "keeper"), which stays when the tests
    delete the first: with no pack left at all, verify and restore take the storage for
    unmounted and flag nothing (pack_storage.named_packs_missing)."""
    keeper = make_image(tmp_path / "keeper.img", 4 * BS, [(0, 4 * BS, "random")], seed=999)
    assert cli(capsys, "backup", keeper, "--repo", repo, "--vm", "keeper")[0] == 0


def _damaged_repo(tmp_path, capsys, seed, *, blocks=40):
    """``_one_pack_repo`` whose first stored frame is corrupt: (repo, image, the bad
    copy's (digest, pack, offset))."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, seed, blocks=blocks)
    rec = Repository.open(str(repo)).load_digest_index().records[0]
    data = bytearray((repo / pack).read_bytes())
    data[int(rec["offset"]) + 7] ^= 0x55
    os.chmod(repo / pack, 0o644)
    (repo / pack).write_bytes(data)
    return repo, img, (bytes(rec["digest"]).ljust(32, b"\0"), bytes(rec["pack"]).ljust(32, b"\0"), int(rec["offset"]))


def _markers(repo):
    return sorted(os.listdir(repo / "lost")) if (repo / "lost").is_dir() else []


def _restores_everything(capsys, tmp_path, repo, img, tag=""):
    for snap in Repository.open(str(repo)).snapshots():
        if snap.vm == "keeper":  # (_another_pack's)
            continue
        out = tmp_path / f"r{tag}-{snap.id}.img"
        code, _, err = cli(capsys, "restore", snap.id, out, "--repo", repo)
        assert code == 0 and same_file(out, img), err
        # the good copy is read first: no detour through the flagged one
        assert "did not read back intact" not in err, err
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
    """Alone, a second verify does not flag the copy again (a marker a night for a block
    lost for good made every disk's next backup re-check its parent)."""
    repo, img, _ = _damaged_repo(tmp_path, capsys, 302)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 6 and report["flagged"] == {"marker": None, "copies": 0, "again": 0, "cleared": 0, "error": None}
    assert len(_markers(repo)) == 1
    assert "back up the affected disks" in err.strip().splitlines()[-1], err


def test_a_verify_beside_another_flags_again_what_that_one_may_clear(tmp_path, capsys):
    """Another verify running may have read the copy intact before it went bad again and
    be about to clear the earlier flag: this one flags it again."""
    from pyvbak.repo.locks import RepositoryLock

    repo, img, _ = _damaged_repo(tmp_path, capsys, 335)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    with RepositoryLock(Repository.open(str(repo)).backend, exclusive=False, purpose="verify", clean_stale=False,
                        reader=True):
        code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 6 and report["flagged"]["again"] == 1 and report["flagged"]["copies"] == 0, report["flagged"]
    assert len(_markers(repo)) == 2 and report["flagged"]["marker"][len("lost/"):] in _markers(repo)


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
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 305)
    _another_pack(tmp_path, capsys, repo)
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
    assert list(doc) == ["time", "packs", "records", "flagged", "cleared", "seen"] and doc["cleared"] == []
    assert doc["packs"] == [] and doc["records"] == 0 and doc["flagged"][0][2] == bad[2]
    assert Repository.open(str(repo)).lost_markers() == [name]


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


# -- backups and verifies honouring flags; parsing and caching markers ------------------


def test_a_parent_that_listed_the_marker_without_honouring_it_is_checked_all_the_same(tmp_path, capsys, monkeypatch):
    """A backup by an older pyvbak (a second host not yet upgraded) lists the flag marker
    in its lost_checked but deduplicated against the flagged copy: the next backup must
    still find the block its parent names flagged-only, and store it again (it carried it
    on with no warning, and verify's "back up" looped for ever)."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 310)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    with monkeypatch.context() as m:  # the older pyvbak: markers' flags unknown to it
        m.setattr(Repository, "dedup_index", Repository.load_digest_index)
        real_commit = Repository.commit_snapshot

        def older_commit(self, sid, meta, *a, **k):
            meta.pop("flags_honoured", None)
            return real_commit(self, sid, meta, *a, **k)

        m.setattr(Repository, "commit_snapshot", older_commit)
        code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
        assert code == 0 and json.loads(out)["new_blocks"] == 0, err
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    res = json.loads(out)
    assert code == 0 and res["new_blocks"] == 1 and res["warnings"], err
    _restores_everything(capsys, tmp_path, repo, img)


def test_a_marker_that_cannot_be_read_fails_the_backup_instead_of_ignoring_its_flags(tmp_path, capsys, monkeypatch):
    """An I/O error reading a marker was taken for "flags nothing": the backup deduplicated
    against the bad copy and recorded the marker as checked."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo, img, _ = _damaged_repo(tmp_path, capsys, 311)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    real = LocalBackend.read

    def failing(self, name, *a, **k):
        if name.startswith("lost/"):
            raise BackendError(f"reading {name}: Input/output error")
        return real(self, name, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "read", failing)
        code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v")
        assert code != 0 and "Input/output error" in err and len(err.strip().splitlines()) == 1, err
        # restore only prefers unflagged copies: it goes on without the marker
        code, _, err = cli(capsys, "restore", "v@latest", tmp_path / "blip.img", "--repo", repo)
        assert code == 6, err  # the one snapshot's only copy is bad (no backup stored it again yet)
    assert len(Repository.open(str(repo)).snapshots()) == 1
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 1, err
    _restores_everything(capsys, tmp_path, repo, img)


def test_each_flag_entry_is_parsed_on_its_own(tmp_path, capsys):
    """One entry it could not parse made the whole marker flag nothing, the docs said it is
    skipped."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 312)
    good = [bad[0].hex(), bad[1].hex(), bad[2]]
    odd = [[good[0], good[1], 1 << 64], [good[0], good[1]], "x", None, [*good, 1], ["zz" * 32, good[1], 0],
           [good[0], good[1], True], [good[0], good[1], -1], {"a": 1}]
    r = Repository.open(str(repo))
    r.backend.write_new("lost/20260101T000000Z-0000aaaa", json.dumps({"flagged": [*odd, good]}).encode())
    assert Repository.open(str(repo)).flagged_copies().tolist() == [digest_sets.copy_key(*bad)]
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "other", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 1, err


def test_a_pack_recut_under_its_old_name_is_deduplicated_against_and_verify_clears_its_flags(tmp_path, capsys):
    """The backup after a lost pack cuts the very same pack again (same blocks, same order):
    the good copies then carry the flagged keys.  They were left out of deduplication for
    good - every backup of the same data stored them again."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 313)
    _another_pack(tmp_path, capsys, repo)
    os.unlink(repo / pack)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 40, err
    assert pack in Repository.open(str(repo)).pack_object_names()  # the same name again
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "other", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 0, err
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0 and "cleared 40 flagged block copy(ies)" in err, err
    assert len(Repository.open(str(repo)).flagged_copies()) == 0
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "third", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 0 and json.loads(out)["warnings"] == [], err
    _restores_everything(capsys, tmp_path, repo, img)


def test_a_sampled_verify_sends_to_a_full_verify_before_the_backup(tmp_path, capsys):
    """A sample flags only the bad copies it read; the next step said the backup heals
    every snapshot while it deduplicated against the others."""
    repo, img, _ = _damaged_repo(tmp_path, capsys, 314)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--sample", "100")
    last = err.strip().splitlines()[-1]
    assert code == 6 and "run 'pyvbak verify' without --sample" in last, err


def test_a_flag_that_stays_costs_later_backups_no_parent_check(tmp_path, capsys, monkeypatch):
    """A flagged-only block no disk holds any more stays flagged (until a repair): the
    parents of this version's backups honoured the flags, so they are not read again on
    every backup (only the first backup after the marker looks at its parent)."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 315)
    other = make_image(tmp_path / "e.img", 8 * BS, [(0, 8 * BS, "random")], seed=316)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "backup", other, "--repo", repo, "--vm", "v", "--disk", "d", "--json")  # changed
    assert code == 0 and json.loads(out)["warnings"], err  # parent checked: it names the flagged block
    looked = []
    real = Repository.lost_blocks_of
    monkeypatch.setattr(Repository, "lost_blocks_of", lambda self, snap: looked.append(snap.id) or real(self, snap))
    for _ in range(2):
        code, out, err = cli(capsys, "backup", other, "--repo", repo, "--vm", "v", "--disk", "d", "--json")
        assert code == 0 and json.loads(out)["warnings"] == [] and json.loads(out)["new_blocks"] == 0, err
    assert looked == []
    assert len(Repository.open(str(repo)).dedup_index().excluded) == 1  # still flagged-only
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 6  # the old snapshot lost it for good
    assert not hasattr(Repository.open(str(repo)).dedup_index(), "excluded")


def test_a_clear_counts_for_the_flags_its_verify_saw_not_for_later_ones(tmp_path, capsys):
    """Flags and clears written in the same second were ordered by their names' random
    part: a clear could lose to the flag it cleared, or win over a newer one."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 317, blocks=4)
    r = Repository.open(str(repo))
    first = r.write_flag_marker([bad])
    r.write_flag_marker([], [bad], seen=[first])  # a verify that read the copy intact since
    assert len(Repository.open(str(repo)).flagged_copies()) == 0
    again = Repository.open(str(repo)).write_flag_marker([bad])  # found bad once more
    r = Repository.open(str(repo))
    assert r.flagged_copies().tolist() == [digest_sets.copy_key(*bad)]
    r.write_flag_marker([], [bad], seen=[first])  # a late clear that did not know the new flag
    assert len(Repository.open(str(repo)).flagged_copies()) == 1
    r.write_flag_marker([], [bad], seen=[first, again])
    assert len(Repository.open(str(repo)).flagged_copies()) == 0


def test_parsed_markers_come_from_the_local_cache_and_a_damaged_entry_is_read_again(tmp_path, capsys, monkeypatch):
    """A marker of a lost region can flag a million copies: parsed once per machine, not
    on every backup and restore."""
    from pyvbak.backends.local import LocalBackend

    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache"))
    repo, img, bad = _damaged_repo(tmp_path, capsys, 318, blocks=4)
    name = Repository.open(str(repo)).write_flag_marker([bad])
    assert Repository.open(str(repo)).flagged_copies().tolist() == [digest_sets.copy_key(*bad)]
    reads = []
    real = LocalBackend.read
    monkeypatch.setattr(LocalBackend, "read", lambda self, n, *a, **k: reads.append(n) or real(self, n, *a, **k))
    assert Repository.open(str(repo)).flagged_copies().tolist() == [digest_sets.copy_key(*bad)]
    assert name not in reads
    (cached,) = list((tmp_path / "cache").rglob("*.npz"))
    cached.write_bytes(b"garbage")
    assert Repository.open(str(repo)).flagged_copies().tolist() == [digest_sets.copy_key(*bad)]
    assert name in reads


# -- verifies side by side; the cost of a flag that stays -------------------------------


def test_a_clear_does_not_undo_a_flag_written_while_its_verify_read(tmp_path, capsys, monkeypatch):
    """The flags a verify clears are those it listed before reading the copies: one that
    another verify wrote in between stays."""
    import pyvbak.repo.verify as verify_mod

    repo, img, bad = _damaged_repo(tmp_path, capsys, 320, blocks=4)
    r = Repository.open(str(repo))
    r.write_flag_marker([bad])
    path = repo / "packs" / bad[1].hex()[:2] / bad[1].hex()
    good_bytes = path.read_bytes()
    data = bytearray(good_bytes)
    data[bad[2] + 7] ^= 0x55  # undo the damage: the flagged copy reads back intact now
    path.write_bytes(data)
    real_read_blocks = verify_mod.read_blocks
    written = []

    def read_then_flag(*a, **k):
        real_read_blocks(*a, **k)  # this verify read the copy intact ...
        if not written:  # ... then another verify found it bad (a blip) and flagged it again
            written.append(Repository.open(str(repo)).write_flag_marker([bad]))

    monkeypatch.setattr(verify_mod, "read_blocks", read_then_flag)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0 and "cleared 1 flagged" in err, err
    assert Repository.open(str(repo)).flagged_copies().tolist() == [digest_sets.copy_key(*bad)]


def test_verify_flags_anew_when_a_marker_cannot_be_read(tmp_path, capsys, monkeypatch):
    """A marker verify could not read may clear what it flags: verify then flags every bad
    copy it finds again, instead of taking them for flagged."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo, img, bad = _damaged_repo(tmp_path, capsys, 321, blocks=4)
    r = Repository.open(str(repo))
    first = r.write_flag_marker([bad])
    clear = r.write_flag_marker([], [bad], seen=[first])  # cleared (wrongly, say) ...
    real = LocalBackend.read

    def failing(self, name, *a, **k):
        if name == clear:
            raise BackendError(f"reading {name}: Input/output error")
        return real(self, name, *a, **k)

    monkeypatch.setattr(LocalBackend, "read", failing)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "flagged 1 bad block copy(ies)" in err, err
    monkeypatch.setattr(LocalBackend, "read", real)
    assert Repository.open(str(repo)).flagged_copies().tolist() == [digest_sets.copy_key(*bad)]


def test_a_flag_on_a_lost_pack_costs_backups_one_stat_not_a_read_per_copy(tmp_path, capsys, monkeypatch):
    """A flagged-only block no disk holds stays flagged; every backup looked at up to 1024
    of its copies one request at a time."""
    from pyvbak.backends.local import LocalBackend

    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", 40 * BS, [(0, 40 * BS, "random")], seed=322)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--disk", "d")[0] == 0
    (pack,) = Repository.open(str(repo)).pack_object_names()
    _another_pack(tmp_path, capsys, repo)
    os.unlink(repo / pack)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    other = make_image(tmp_path / "e.img", 8 * BS, [(0, 8 * BS, "random")], seed=323)
    assert cli(capsys, "backup", other, "--repo", repo, "--vm", "v", "--disk", "d")[0] == 0  # the data is gone
    calls = []
    for method in ("read", "read_range", "read_range_into", "stat"):
        real = getattr(LocalBackend, method)
        monkeypatch.setattr(LocalBackend, method,
                            lambda self, n, *a, _r=real, _m=method, **k: calls.append((_m, n)) or _r(self, n, *a, **k))
    assert cli(capsys, "backup", other, "--repo", repo, "--vm", "v", "--disk", "d")[0] == 0
    # one stat by the flag's recheck, one by Repository.check_pack_storage when the digest
    # index's first or last record is in that pack, and no read
    mine = [c for c in calls if c[1] == pack]
    assert mine in ([("stat", pack)], [("stat", pack)] * 2), mine


def test_a_copy_listed_twice_with_different_records_is_not_taken_for_healed(tmp_path, capsys):
    """Two index records of one flagged copy that differ (a damaged pack index): the
    backup's read-check took the copy for good when one of them read back, while restore
    reads the other."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 324, blocks=4)
    r = Repository.open(str(repo))
    recs = r.load_digest_index().records
    mine = recs[[bytes(d).ljust(32, b"\0") == bad[0] for d in recs["digest"]]].copy()
    path = repo / "packs" / bad[1].hex()[:2] / bad[1].hex()
    data = bytearray(path.read_bytes())
    data[bad[2] + 7] ^= 0x55  # the frame reads back intact again ...
    path.write_bytes(data)
    mine["clen"] += 3  # ... through one record; a second index file lists it longer
    r.write_pack_index(mine)
    r = Repository.open(str(repo))
    r.write_flag_marker([bad])
    assert len(Repository.open(str(repo)).load_digest_index().copies(bad[0])) == 2
    assert Repository.open(str(repo)).dedup_index().find(bad[0]) < 0


# -- lost for good; markers that cannot be read; packs cut short ------------------------


def test_verify_says_when_no_backup_can_bring_the_blocks_back(tmp_path, capsys):
    """Once the disk was backed up and its newest snapshot does not use the lost block, the
    disk no longer holds it: verify said "back up the affected disks" after every backup."""
    repo, img, _ = _damaged_repo(tmp_path, capsys, 330)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    changed = make_image(tmp_path / "c.img", 40 * BS, [(0, 40 * BS, "random")], seed=331)
    assert cli(capsys, "backup", changed, "--repo", repo, "--vm", "v", "--disk", "d")[0] == 0
    code, out, err = cli(capsys, "verify", "--repo", repo)
    last = err.strip().splitlines()[-1]
    assert code == 6 and "no longer hold those blocks" in last and "pyvbak forget ID" in last, err
    assert "back up the affected disks" not in last, err


def test_a_verify_that_cannot_read_a_marker_clears_nothing_and_says_nothing_of_clears(tmp_path, capsys, monkeypatch):
    """Its clears would list no marker they undo (void), while it printed "cleared N"."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo, img, bad = _damaged_repo(tmp_path, capsys, 332, blocks=4)
    r = Repository.open(str(repo))
    r.write_flag_marker([bad])
    other = r.write_lost_marker([], 0)
    path = repo / "packs" / bad[1].hex()[:2] / bad[1].hex()
    data = bytearray(path.read_bytes())
    data[bad[2] + 7] ^= 0x55  # intact again
    path.write_bytes(data)
    real = LocalBackend.read
    monkeypatch.setattr(LocalBackend, "read", lambda self, n, *a, **k: (_ for _ in ()).throw(
        BackendError(f"reading {n}: Input/output error")) if n == other else real(self, n, *a, **k))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0 and "cleared" not in err, err
    assert len(_markers(repo)) == 2


def test_a_markers_seen_list_keeps_marker_names_only(tmp_path, capsys):
    repo, img, bad = _damaged_repo(tmp_path, capsys, 333, blocks=4)
    r = Repository.open(str(repo))
    key = [bad[0].hex(), bad[1].hex(), bad[2]]
    r.backend.write_new("lost/20260101T000000Z-0000bbbb", json.dumps({"flagged": [key]}).encode())
    r.backend.write_new("lost/20260101T000001Z-0000cccc", json.dumps(
        {"cleared": [key], "seen": ["x" * 100000, 7, "lost/20260101T000000Z-0000bbbb"]}).encode())
    from pyvbak.repo.markers import _marker_flags

    assert _marker_flags(r.backend, "lost/20260101T000001Z-0000cccc", strict=True)[2] == ["lost/20260101T000000Z-0000bbbb"]
    assert len(Repository.open(str(repo)).flagged_copies()) == 0


def test_a_pack_cut_short_ends_healed_after_the_backup_and_one_repair(tmp_path, capsys):
    """Its table of contents cannot be rebuilt (frames are missing), so verify reported it
    every night after the repair, which could not rebuild it, and prune left it: the
    repair now moves the pack's intact blocks to a new pack."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 334)
    os.chmod(repo / pack, 0o644)
    os.truncate(repo / pack, os.path.getsize(repo / pack) // 2)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 0 and "into a new pack" in err and "repair: complete" in err, err
    assert pack not in Repository.open(str(repo)).pack_object_names()
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    _restores_everything(capsys, tmp_path, repo, img)


# -- moving a pack's intact blocks out of it --------------------------------------------


def test_a_move_that_cuts_the_old_pack_again_keeps_it(tmp_path, capsys):
    """Moving every frame of a pack writes the very same pack (same name): deleting the old
    name then deleted the new one - every block lost, "repair: complete"."""
    from pyvbak.repo.repair import move_out_of_packs

    repo, img, pack = _one_pack_repo(tmp_path, capsys, 340)
    done, left = move_out_of_packs(Repository.open(str(repo)), [pack.rsplit("/", 1)[-1]])
    assert done and not left
    assert list(Repository.open(str(repo)).pack_object_names()) == [pack]
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    _restores_everything(capsys, tmp_path, repo, img)


def test_a_pack_whose_rebuild_read_failed_is_not_moved(tmp_path, capsys, monkeypatch):
    """Only a pack refused for what it holds goes to the move, not one a read failed on."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend
    import pyvbak.repo.repair as repair_mod

    repo, img, pack = _one_pack_repo(tmp_path, capsys, 341)
    data = bytearray((repo / pack).read_bytes())
    data[-30] ^= 1  # the table of contents only
    os.chmod(repo / pack, 0o644)
    (repo / pack).write_bytes(data)
    real = LocalBackend.read_range
    calls = []

    def failing_once(self, name, offset, length):
        if name == pack and offset == 0 and not calls:  # the rebuild's read of the frames
            calls.append(1)
            raise BackendError(f"reading {name}: Input/output error")
        return real(self, name, offset, length)

    monkeypatch.setattr(LocalBackend, "read_range", failing_once)
    moved = []
    monkeypatch.setattr(repair_mod, "move_out_of_packs", lambda r, packs, *a: moved.append(packs) or ([], []))
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert calls and moved == [], err
    monkeypatch.setattr(LocalBackend, "read_range", real)
    _restores_everything(capsys, tmp_path, repo, img)


def test_an_interrupted_move_is_finished_by_the_next_repair_or_prune(tmp_path, capsys, monkeypatch):
    """Stopped after the index rewrite, before the old pack's delete, the old pack stayed
    for ever (prune warned on every run): a moved_out marker names it."""
    import pyvbak.repo.repair as repair_mod

    repo, img, pack = _one_pack_repo(tmp_path, capsys, 342)
    os.chmod(repo / pack, 0o644)
    os.truncate(repo / pack, os.path.getsize(repo / pack) // 2)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    real_delete = repair_mod.delete_object

    def stop_at_delete(backend, name):
        if name == pack:
            raise KeyboardInterrupt
        return real_delete(backend, name)

    monkeypatch.setattr(repair_mod, "delete_object", stop_at_delete)
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 10
    monkeypatch.setattr(repair_mod, "delete_object", real_delete)
    assert pack in Repository.open(str(repo)).pack_object_names()
    code, out, err = cli(capsys, "prune", "--repo", repo)
    assert code == 0 and "interrupted repair had moved" in (out + err) and "left in place" not in (out + err), out + err
    assert pack not in Repository.open(str(repo)).pack_object_names()
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    _restores_everything(capsys, tmp_path, repo, img)


def test_a_pack_cut_short_in_blocks_no_snapshot_uses_is_moved_without_them(tmp_path, capsys):
    """The lost tail held only blocks of a forgotten snapshot: the move refused for ever
    ("does not read back intact") and verify kept naming the repair."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 343)
    (sid,) = [s.id for s in Repository.open(str(repo)).snapshots()]
    half = make_image(tmp_path / "h.img", 20 * BS, [(0, 20 * BS, "random")], seed=343)  # the image's first half
    assert cli(capsys, "backup", half, "--repo", repo, "--vm", "w")[0] == 0
    assert cli(capsys, "forget", sid, "--repo", repo)[0] == 0
    os.chmod(repo / pack, 0o644)
    os.truncate(repo / pack, os.path.getsize(repo / pack) * 2 // 3)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 0 and "into a new pack" in err and "no snapshot uses" in err, err
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    _restores_everything(capsys, tmp_path, repo, half)


def test_lost_for_good_is_said_only_by_a_verify_of_everything(tmp_path, capsys):
    """'verify OLD_ID' or a sample cannot tell what the newest snapshots use."""
    repo, img, _ = _damaged_repo(tmp_path, capsys, 344)
    (old,) = [s.id for s in Repository.open(str(repo)).snapshots()]
    changed = make_image(tmp_path / "c.img", 40 * BS, [(0, 40 * BS, "random")], seed=345)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", changed, "--repo", repo, "--vm", "v", "--disk", "d")[0] == 0
    for args in (["verify", old], ["verify", "--sample", "100"]):
        code, out, err = cli(capsys, *args, "--repo", repo)
        assert code == 6 and "no longer hold" not in err, err


def test_a_move_is_finished_only_once_the_packs_it_wrote_are_indexed(tmp_path, capsys):
    """finish_moves deletes what a move emptied: not before the move's new packs are
    indexed, and never for a marker without them (damaged or not pyvbak's)."""
    from pyvbak.repo.repair import finish_moves

    repo, img, pack = _one_pack_repo(tmp_path, capsys, 346, blocks=8)
    r = Repository.open(str(repo))
    pack_hex = pack.rsplit("/", 1)[-1]
    r.write_lost_marker([], 0, moved_out=[pack_hex], moved_to=["ab" * 32])  # a move that never got indexed
    r.backend.write_new("lost/20260101T000000Z-0000dddd", json.dumps({"moved_out": [pack_hex]}).encode())
    assert finish_moves(r, indexed=set()) == ([], set())
    assert pack in Repository.open(str(repo)).pack_object_names()
    _restores_everything(capsys, tmp_path, repo, img)


# -- moves finished safely; restores that flag the bad copies they find -----------------


def _moved_pack_repo(tmp_path, capsys, seed):
    """A repository whose one pack was cut short, backed up again and moved out by a
    repair: (repo, image, the old pack's object name, its original bytes)."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, seed)
    original = (repo / pack).read_bytes()
    os.chmod(repo / pack, 0o644)
    os.truncate(repo / pack, len(original) // 2)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 0
    assert pack not in Repository.open(str(repo)).pack_object_names()
    return repo, img, pack, original


def test_a_moved_out_pack_put_back_whole_is_not_deleted(tmp_path, capsys):
    """A sampled or chosen repair does not adopt unindexed packs first; it deleted a pack
    put back from a copy under a name a move had emptied."""
    repo, img, pack, original = _moved_pack_repo(tmp_path, capsys, 350)
    (repo / pack).parent.mkdir(exist_ok=True)
    (repo / pack).write_bytes(original)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair", "--sample", "1")
    assert code == 0 and "interrupted repair" not in err, err
    assert pack in Repository.open(str(repo)).pack_object_names()
    assert cli(capsys, "prune", "--repo", repo)[0] == 0  # adopted (then judged like any pack)
    _restores_everything(capsys, tmp_path, repo, img)


def test_finishing_moves_waits_out_a_damaged_pack_index_and_odd_names(tmp_path, capsys, monkeypatch):
    """A damaged pack index stopped the whole repair in finish_moves; a moved_out entry
    that is no pack id failed every prune and repair."""
    import pyvbak.repo.repair as repair_mod
    from pyvbak.errors import IntegrityError

    repo, img, pack, _ = _moved_pack_repo(tmp_path, capsys, 351)
    r = Repository.open(str(repo))
    r.backend.write_new("lost/20260101T000000Z-0000eeee",
                        json.dumps({"moved_out": ["x" * 63 + "/"], "moved_to": ["ab" * 32]}).encode())
    assert repair_mod.finish_moves(r) == ([], set())

    def damaged(repo):
        raise IntegrityError("pack index index/x is corrupt")

    monkeypatch.setattr(repair_mod, "load_pack_indexes", damaged)
    assert repair_mod.finish_moves(r) == ([], set())


def test_a_move_keeps_the_pack_when_a_snapshot_index_cannot_be_read(tmp_path, capsys, monkeypatch):
    """Whether a damaged frame is used could not be told: the repair aborted;
    the pack now stays, and the repair reports."""
    from pyvbak.repo.repair import move_out_of_packs

    repo, img, pack = _one_pack_repo(tmp_path, capsys, 352)
    os.chmod(repo / pack, 0o644)
    os.truncate(repo / pack, os.path.getsize(repo / pack) // 2)
    real = Repository.referenced_digests

    def one_unreadable(self, snaps, on_unreadable=None):
        snaps = list(snaps)
        on_unreadable(snaps[0], IntegrityError_("snapshot index is corrupt"))
        return real(self, snaps[1:], on_unreadable=on_unreadable)

    from pyvbak.errors import IntegrityError as IntegrityError_

    monkeypatch.setattr(Repository, "referenced_digests", one_unreadable)
    done, left = move_out_of_packs(Repository.open(str(repo)), [pack.rsplit("/", 1)[-1]])
    assert not done and left and "does not read back intact" in left[0]
    assert pack in Repository.open(str(repo)).pack_object_names()


def test_a_restore_that_finds_a_bad_copy_flags_it_and_the_next_backup_heals(tmp_path, capsys):
    """A restore that hit a corrupt copy said to run verify, and until someone did, every
    backup went on deduplicating against that copy (a nightly test-restore changed
    nothing).  Now the restore flags it, as verify would, and the next backup of the disk
    stores the block again."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 341)
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "no-lock.img", "--repo", repo, "--no-lock")
    assert code == 6 and _markers(repo) == [] and "run 'pyvbak verify'" in err  # --no-lock writes nothing
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo)
    assert code == 6 and not (tmp_path / "o.img").exists()
    flagged_line = "the bad copies are flagged, so the next backup of a disk that still holds those blocks stores " \
                   "them again"
    assert flagged_line in err, err
    (marker,) = _markers(repo)
    doc = json.loads((repo / "lost" / marker).read_text())
    assert doc["flagged"] == [[bad[0].hex(), bad[1].hex(), bad[2]]] and doc["cleared"] == [] and doc["packs"] == []
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo)
    assert code == 6 and flagged_line in err, err  # (it said "run verify: it flags ...")
    assert _markers(repo) == [marker]  # flagged already: no marker per restore

    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    res = json.loads(out)
    assert code == 0 and res["new_blocks"] == 1 and res["new_bytes"] == BS, err
    _restores_everything(capsys, tmp_path, repo, img)  # the old snapshot too: the block is named by content
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    assert code == 6 and json.loads(out)["affected_snapshots"] == [], err  # only the bad copy beside a good one
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 0


def test_a_restore_from_another_copy_flags_the_bad_one(tmp_path, capsys):
    """A block stored twice (two backups at once): the restore reads past the bad copy
    and says so; it flags it too, so restores read the good copy first from then on."""
    repo, img, bad = _damaged_repo(tmp_path, capsys, 342)
    r = Repository.open(str(repo))
    good = r.read_checked_block(r.load_digest_index().records[0], BS)
    assert good is None  # (the first copy is the damaged one)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6  # flags it ...
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0  # ... and a second copy is stored
    for name in _markers(repo):
        os.unlink(repo / "lost" / name)  # (as if the flag never was: a repository restored from an older copy)
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 0 and same_file(tmp_path / "o.img", img), err
    assert report["blocks_from_other_copies"] == 1 and report["flagged_copies"] == 1
    (marker,) = _markers(repo)
    assert json.loads((repo / "lost" / marker).read_text())["flagged"] == [[bad[0].hex(), bad[1].hex(), bad[2]]]
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o2.img", "--repo", repo, "--json")
    assert code == 0 and json.loads(out)["blocks_from_other_copies"] == 0 and "another" not in err  # good copy first


def test_a_restore_flags_every_bad_copy_of_a_block_not_only_the_first(tmp_path, capsys):
    """A block stored twice, both copies bad: the restore flagged the copy it read first
    and said the bad copies were flagged; the backup then deduplicated against the other
    bad one, and its snapshot could not be restored either."""
    repo, img, first = _damaged_repo(tmp_path, capsys, 343)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6  # flags it ...
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0  # ... and a second copy is stored
    for name in _markers(repo):
        os.unlink(repo / "lost" / name)  # (as if the flag never was)
    r = Repository.open(str(repo))
    copies = r.load_digest_index().copies(first[0])
    assert len(copies) == 2
    second = [c for c in copies if bytes(c["pack"]).ljust(32, b"\0") != first[1]][0]
    path = repo / fmt.pack_name(bytes(second["pack"]).hex())  # the second one bad too now
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[int(second["offset"]) + 9] ^= 0x33
    path.write_bytes(data)
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo)
    assert code == 6, err
    (marker,) = _markers(repo)
    flagged = json.loads((repo / "lost" / marker).read_text())["flagged"]
    assert sorted(flagged) == sorted([[first[0].hex(), bytes(c["pack"]).ljust(32, b"\0").hex(), int(c["offset"])]
                                      for c in copies])
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 1, err
    # (that backup cut the second copy's one-block pack again, intact, under its name: the
    # next verify clears its flag, and restores read it first again)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6  # the first copy stays bad until a repair
    _restores_everything(capsys, tmp_path, repo, img)


def test_a_copy_that_reads_back_intact_the_second_time_is_neither_a_failure_nor_flagged(tmp_path, capsys,
                                                                                      monkeypatch):
    """Storage gone for a moment (a mount dropped, a short read): every copy not read yet
    was flagged "missing" and the next backup stored them all again.  The
    restore reads a failed copy once more before it gives up on it or flags it."""
    import pyvbak.repo.restore as restore_mod

    repo, img, _ = _one_pack_repo(tmp_path, capsys, 344)
    real = restore_mod.read_blocks

    def blip(repo_, recs, sink, *, threads):
        class Blip(restore_mod.BlockSink):
            def reserve(self, k, ulens):
                return sink.reserve(k, ulens)

            def filled(self, k, buffer, offsets, ulens, ok):
                for i in range(len(ok)):
                    sink.error(k + i, "pack 0123… is missing")  # every copy, this once
                sink.filled(k, buffer, offsets, ulens, ok & False)

            def error(self, k, reason):
                sink.error(k, reason)

        real(repo_, recs, Blip(), threads=threads)

    monkeypatch.setattr(restore_mod, "read_blocks", blip)
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo, "--json")
    assert code == 0 and same_file(tmp_path / "o.img", img), err
    report = json.loads(out)
    assert report["flagged_copies"] == 0 and report["blocks_from_other_copies"] == 0 and _markers(repo) == []


def test_a_restore_beside_a_verify_flags_again_what_that_verify_may_clear(tmp_path, capsys):
    """The verify may have read the copy intact just before it went bad again, and clear
    the earlier flag; a restore that finds it bad again flags it again while a verify
    holds a lock (as verify itself does)."""
    from pyvbak.repo.locks import RepositoryLock

    repo, img, _ = _damaged_repo(tmp_path, capsys, 345)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert len(_markers(repo)) == 1
    assert cli(capsys, "restore", "v@latest", tmp_path / "a.img", "--repo", repo)[0] == 6
    assert len(_markers(repo)) == 1  # alone: flagged once
    with RepositoryLock(Repository.open(str(repo)).backend, exclusive=False, purpose="verify", clean_stale=False,
                        reader=True):
        assert cli(capsys, "restore", "v@latest", tmp_path / "b.img", "--repo", repo)[0] == 6
    assert len(_markers(repo)) == 2


def test_a_restore_whose_lock_was_removed_flags_nothing(tmp_path, capsys, monkeypatch):
    """'unlock --all' and a prune meanwhile: the blocks may have moved, and the restore
    wrote a marker all the same."""
    import pyvbak.repo.restore as restore_mod
    from pyvbak.repo.locks import remove_locks

    repo, img, _ = _damaged_repo(tmp_path, capsys, 346)
    real = restore_mod.restore_snapshot

    def lock_gone_first(r, *a, **k):
        remove_locks(r.backend, all_hosts=True)
        return real(r, *a, **k)

    monkeypatch.setattr("pyvbak.cli.restore_cmd.restore_snapshot", lock_gone_first, raising=False)
    monkeypatch.setattr(restore_mod, "restore_snapshot", lock_gone_first)
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo)
    assert code == 6 and "lock on the repository was removed" in err and "flagged" not in err, err
    assert _markers(repo) == []


def test_a_lost_block_with_an_unreadable_copy_is_not_promised_to_heal(tmp_path, capsys, monkeypatch):
    """One copy bad, the other unreadable (an I/O error: never flagged): the restore said
    the bad copies were flagged and the next backup would store the block again - it
    deduplicated against the unreadable copy instead."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo, img, first = _damaged_repo(tmp_path, capsys, 347)
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0  # a second copy
    for name in _markers(repo):
        os.unlink(repo / "lost" / name)
    copies = Repository.open(str(repo)).load_digest_index().copies(first[0])
    [second] = [c for c in copies if bytes(c["pack"]).ljust(32, b"\0") != first[1]]
    unreadable = fmt.pack_name(bytes(second["pack"]).hex())
    for method in ("read_range", "read_range_into"):
        def failing(self, name, *a, _real=getattr(LocalBackend, method), **k):
            if name == unreadable:
                raise BackendError(f"reading {name}: Input/output error")
            return _real(self, name, *a, **k)

        monkeypatch.setattr(LocalBackend, method, failing)
    # (the first copy first: the index's order, the second one unflagged either way)
    code, out, err = cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo)
    assert code == 6 and "the bad copies are flagged, so the next backup" not in err, err
    assert "run 'pyvbak verify'" in err, err
    (marker,) = _markers(repo)  # the bad copy is flagged all the same
    assert json.loads((repo / "lost" / marker).read_text())["flagged"] == [[first[0].hex(), first[1].hex(), first[2]]]
