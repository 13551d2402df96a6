"""When the next backup looks for packs a killed backup left unindexed.

A backup writes its lock before anything else, so a killed backup always leaves a stale
lock; only then does the next backup look for temp objects and list every pack.  Readers (verify, restore) must leave that evidence in place.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pyvbak.backends import FaultInjectingBackend, open_backend
from pyvbak.cli.main import main
from pyvbak.engine.backup import run_backup
from pyvbak.errors import OutOfSpace
from pyvbak.repo.repository import Repository
from pyvbak.sources.file import FileSource


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def crashed_repo(tmp_path):
    """A repository where a 'killed' backup left packs without an index and a stale lock."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(40 << 20))
    repo = Repository.init(str(tmp_path / "repo"))
    faulty = Repository(FaultInjectingBackend(open_backend(repo.location), fail_on_write=1, prefix="index/"), repo.config)
    with FileSource(str(img)) as src, pytest.raises(OutOfSpace):
        run_backup(faulty, src, vm="vm", disk="d")
    assert list(repo.pack_object_names()) and not list(repo.backend.list("index/"))
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "time": 0, "exclusive": False, "purpose": "backup"}
    repo.backend.write_new("locks/deadbeef.json", json.dumps(lock).encode())
    return repo, img


def test_verify_keeps_the_stale_lock_and_the_next_backup_adopts(crashed_repo, capsys):
    repo, img = crashed_repo
    assert main(["verify", "--repo", repo.location]) == 0
    assert repo.backend.exists("locks/deadbeef.json")
    capsys.readouterr()
    assert main(["backup", str(img), "--repo", repo.location, "--vm", "vm", "--disk", "d", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("stale lock" in line for line in out["cleaned_leftovers"])
    assert any("adopted unindexed pack" in line for line in out["cleaned_leftovers"])
    assert out["new_bytes"] == 0  # every block was in the adopted packs


def test_backup_without_crash_evidence_does_not_list_packs(tmp_path, monkeypatch, capsys):
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(8 << 20))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm"]) == 0
    listed = []
    from pyvbak.backends.local import LocalBackend

    original = LocalBackend.list

    def spy(self, prefix=""):
        listed.append(prefix)
        return original(self, prefix)

    walked = []
    real_walk = os.walk

    def walk_spy(top, *a, **kw):
        walked.append(str(top))
        return real_walk(top, *a, **kw)

    monkeypatch.setattr(LocalBackend, "list", spy)
    monkeypatch.setattr(os, "walk", walk_spy)
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm"]) == 0
    assert "packs/" not in listed
    # no walk over the repository's objects either: only its locks/ folder is looked at
    assert [w for w in walked if w.startswith(repo)] == [os.path.join(repo, "locks")]
    capsys.readouterr()


def test_temp_objects_of_a_killed_backup_go_with_its_stale_lock(crashed_repo, capsys):
    repo, img = crashed_repo
    stray = os.path.join(repo.location, "packs", "00", ".pyvbak-tmp-%d-x" % _dead_pid())
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    with open(stray, "wb") as f:
        f.write(b"half a pack")
    assert main(["backup", str(img), "--repo", repo.location, "--vm", "vm", "--disk", "d", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("removed incomplete object packs/00/.pyvbak-tmp-" in line for line in out["cleaned_leftovers"])
    assert not os.path.exists(stray)


def test_unlock_adopts_what_the_removed_lock_left(crashed_repo, capsys):
    repo, _ = crashed_repo
    assert main(["unlock", "--repo", repo.location]) == 0
    out = capsys.readouterr().out
    assert "removed 1 lock" in out and "adopted unindexed pack" in out
    assert list(repo.backend.list("index/"))


def _backed_up_with_lock(tmp_path, name: str, *, pid: int, exclusive: bool, purpose: str):
    """(image, repository path, Repository): one backup done, then a lock object of ``pid``
    (a dead one: stale; this process: live) at locks/NAME.json."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(4 << 20))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm"]) == 0
    r = Repository.open(repo)
    lock = {"host": socket.gethostname(), "pid": pid, "time": 0, "exclusive": exclusive, "purpose": purpose}
    r.backend.write_new(f"locks/{name}.json", json.dumps(lock).encode())
    return img, repo, r


def test_a_backup_refused_for_missing_packs_keeps_a_killed_runs_stale_lock(tmp_path, capsys):
    """The refusal came after the lock was taken, which removed the stale lock: once the
    packs were back, no backup knew to clean up after the killed run."""
    import shutil

    img, repo, r = _backed_up_with_lock(tmp_path, "deadbeef", pid=_dead_pid(), exclusive=False, purpose="backup")
    shutil.move(os.path.join(repo, "packs"), tmp_path / "packs.away")
    capsys.readouterr()
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm"]) == 6
    assert "none of their pack files" in capsys.readouterr().err
    assert r.backend.exists("locks/deadbeef.json")
    shutil.move(tmp_path / "packs.away", os.path.join(repo, "packs"))
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("stale lock" in line for line in out["cleaned_leftovers"])


def _stale_lock_damaged_index_packs_away(tmp_path):
    """(image, repository path, Repository, its one pack index's path, that index's
    damaged bytes): a killed backup's stale lock, the pack index damaged, packs/ moved to
    TMP/packs.away (storage not mounted)."""
    import shutil

    img, repo, r = _backed_up_with_lock(tmp_path, "deadbeef", pid=_dead_pid(), exclusive=False, purpose="backup")
    (name,) = r.pack_index_names()
    path = os.path.join(repo, name)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    shutil.move(os.path.join(repo, "packs"), tmp_path / "packs.away")
    return img, repo, r, path, open(path, "rb").read()


@pytest.mark.parametrize("command", [["prune"], ["forget", "--keep-last", "1", "--prune"]])
def test_a_prune_refused_for_missing_packs_keeps_the_stale_lock_and_the_damaged_pack_index(tmp_path, capsys, command):
    """Prune's exclusive lock removed stale locks and cleaned up after them on the way in:
    with packs/ unmounted that deleted a damaged pack index whose packs it could not see,
    and the stale lock the backup after a remount cleans up on.  Now the storage check
    comes first; once the packs are back the prune removes the stale lock and re-indexes
    the pack (the exclusive lock's clean-up, after its stale locks go)."""
    import shutil

    img, repo, r, path, damaged = _stale_lock_damaged_index_packs_away(tmp_path)
    capsys.readouterr()
    assert main([*command, "--repo", repo]) == 6
    assert "none of their pack files" in capsys.readouterr().err
    assert r.backend.exists("locks/deadbeef.json") and open(path, "rb").read() == damaged
    shutil.move(tmp_path / "packs.away", os.path.join(repo, "packs"))
    assert main([*command, "--repo", repo]) == 0, capsys.readouterr().err
    assert not r.backend.exists("locks/deadbeef.json")
    r = Repository.open(repo)
    assert len(r.load_digest_index()) > 0 and r.damaged_pack_indexes == []
    assert main(["restore", "vm@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


def test_unlock_while_the_packs_are_not_mounted_leaves_the_clean_up_for_later(tmp_path, capsys):
    """Unlock's clean-up after the locks it removed ran with packs/ unmounted: it deleted a
    damaged pack index whose packs it could not see, said they were re-indexed, and the
    snapshot did not restore after the remount."""
    import shutil

    img, repo, r, path, damaged = _stale_lock_damaged_index_packs_away(tmp_path)
    capsys.readouterr()
    assert main(["unlock", "--repo", repo]) == 0
    out, err = capsys.readouterr()
    assert "removed 1 lock(s)" in out and "cleanup:" not in out
    assert "no clean-up after the removed locks was done" in err and "mount or copy the packs back" in err
    assert not r.backend.exists("locks/deadbeef.json") and open(path, "rb").read() == damaged
    shutil.move(tmp_path / "packs.away", os.path.join(repo, "packs"))
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm"]) == 0  # re-indexes the pack
    assert main(["restore", "vm@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


def test_a_backup_while_a_prune_holds_the_lock_says_so_even_with_packs_empty(tmp_path, capsys):
    """The check ran before the lock for a while: a backup during a prune that had emptied
    packs/ said the data was not there and advised the prune that was running; under the
    lock it waits its turn as before (exit 8)."""
    import shutil

    img, repo, r = _backed_up_with_lock(tmp_path, "feedface", pid=os.getpid(), exclusive=True, purpose="prune")
    shutil.rmtree(os.path.join(repo, "packs"))
    capsys.readouterr()
    assert main(["backup", str(img), "--repo", repo, "--vm", "vm"]) == 8
    err = capsys.readouterr().err
    assert "locked by prune" in err and "none of their pack files" not in err


def _listing_spy(monkeypatch) -> list[str]:
    from pyvbak.backends.local import LocalBackend

    listed, original = [], LocalBackend.list

    def spy(self, prefix=""):
        listed.append(prefix)
        return original(self, prefix)

    monkeypatch.setattr(LocalBackend, "list", spy)
    return listed


def _backup_writing_a_pack_index(repo: str, image, vm: str = "a") -> str:
    """Rewrite 1 MiB of ``image``, back it up, and return the name of the pack index object
    that backup wrote."""
    with open(image, "r+b") as f:
        f.write(os.urandom(1 << 20))
    before = set(os.listdir(os.path.join(repo, "index")))
    assert main(["backup", str(image), "--repo", repo, "--vm", vm]) == 0
    (written,) = set(os.listdir(os.path.join(repo, "index"))) - before
    return written


def _two_vms(tmp_path):
    repo = str(tmp_path / "repo")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(os.urandom(4 << 20))
    b.write_bytes(os.urandom(4 << 20))
    assert main(["init", repo]) == 0
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    (index_a,) = os.listdir(os.path.join(repo, "index"))
    assert main(["backup", str(b), "--repo", repo, "--vm", "b"]) == 0
    return repo, a, os.path.join(repo, "index", index_a)


def test_a_pack_index_lost_from_storage_is_indexed_again_by_the_next_backup(tmp_path, capsys):
    """A lost pack index object (its pack still there) left the pack unindexed, and every
    later backup of the disk exited 0 carrying the parent's records of its blocks on
    unread: snapshots neither restore nor restore.sh could read.  The backup sees a pack
    index it saw before gone, and indexes the
    pack again from its own table of contents."""
    repo, a, index_a = _two_vms(tmp_path)
    os.unlink(index_a)
    capsys.readouterr()
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    err = capsys.readouterr().err
    assert "packs no pack index names were in" in err and "adopted unindexed pack" in err, err
    assert main(["restore", "a@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == a.read_bytes()
    assert main(["verify", "--repo", repo]) == 0


def test_pack_indexes_a_prune_removed_make_no_listing_on_this_host_and_no_warning_elsewhere(tmp_path, monkeypatch,
                                                                                             capsys):
    """A prune rewrites pack indexes: the next backup on its host does not take their names
    gone for a loss (no listing of packs/); on another host (which remembers the old names)
    it lists packs/ once, finds nothing unindexed, and says nothing."""
    repo, a, _ = _two_vms(tmp_path)
    assert main(["forget", "b@latest", "--repo", repo, "--prune"]) == 0
    listed = _listing_spy(monkeypatch)
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    assert "packs/" not in listed
    # another host: it saw the pack indexes of before the prune
    seen = next(os.path.join(d, f) for d, _, fs in os.walk(os.environ["PYVBAK_CACHE_DIR"]) for f in fs
                if f == "pack-indexes-seen")
    with open(seen, "ab") as f:
        f.write(bytes(32))  # a name this host saw that the prune removed
    capsys.readouterr()
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    assert "packs/" in listed and "saw before is gone" not in capsys.readouterr().err
    listed.clear()
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    assert "packs/" not in listed


@pytest.mark.parametrize("between", ["nothing", "verify --repair of a part", "a damaged cache file"])
def test_the_pack_index_of_this_hosts_last_backup_lost_is_found_too(tmp_path, monkeypatch, capsys, between):
    """Only the listing before a backup was remembered, not the pack index the backup then
    wrote: that one lost went unnoticed by the next backup (one VM backed up night after
    night), as did any lost index once a repair of one snapshot had remembered the listing,
    or with no local cache at all."""
    repo = str(tmp_path / "repo")
    a = tmp_path / "a.img"
    a.write_bytes(os.urandom(4 << 20))
    assert main(["init", repo]) == 0
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    os.unlink(os.path.join(repo, "index", _backup_writing_a_pack_index(repo, a)))
    repaired = ""
    if between == "a damaged cache file":
        for d, _, fs in os.walk(os.environ["PYVBAK_CACHE_DIR"]):
            for f in fs:
                if f == "pack-indexes-seen":
                    with open(os.path.join(d, f), "ab") as out:
                        out.write(b"x")
    if between == "verify --repair of a part":  # (of the first snapshot: the lost index is the second's)
        (first, _) = [s.id for s in Repository.open(repo).snapshots()]  # (oldest first)
        main(["verify", "--repair", "--repo", repo, first])
        repaired = capsys.readouterr().err
        assert "adopted" not in repaired
    capsys.readouterr()
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    assert "adopted unindexed pack" in capsys.readouterr().err
    assert main(["restore", "a@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == a.read_bytes()


def test_without_a_local_cache_a_backup_checks_its_parent_against_the_index(tmp_path, monkeypatch, capsys):
    """Without a local cache nothing is remembered: backups did not look at all, and
    committed snapshots no restore could read; looking at every backup indexed a running
    backup's packs again, with a warning; looking only when no other lock was there let
    any other host's lock stop every look.  A backup checks
    the parent it carries blocks of against the index, and looks when that misses some -
    whatever other locks there are."""
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    repo, a, _ = _two_vms(tmp_path)
    b = tmp_path / "b.img"
    os.unlink(os.path.join(repo, "index", _backup_writing_a_pack_index(repo, a)))
    listed = _listing_spy(monkeypatch)
    assert main(["backup", str(b), "--repo", repo, "--vm", "b"]) == 0  # (its parent is whole)
    assert "packs/" not in listed
    capsys.readouterr()
    with Repository.open(repo).lock(purpose="backup of other/disk"):  # another backup, running
        assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    assert "packs/" in listed and "adopted unindexed pack" in capsys.readouterr().err
    assert main(["restore", "a@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == a.read_bytes()


def test_the_pack_index_a_parent_wrote_elsewhere_is_checked_too(tmp_path, monkeypatch, capsys):
    """A pack index written by a run without the local cache (or by another host) was never
    listed here: lost, it went unnoticed, and every later backup of the disk committed
    snapshots no restore could read.  A snapshot names the pack index
    it wrote, and the disk's next backup checks it is there."""
    repo = str(tmp_path / "repo")
    a = tmp_path / "a.img"
    a.write_bytes(os.urandom(4 << 20))
    assert main(["init", repo]) == 0
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    cache = os.environ["PYVBAK_CACHE_DIR"]
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    written = _backup_writing_a_pack_index(repo, a)
    assert Repository.open(repo).latest("a", "a").meta["pack_index"] == f"index/{written}"
    os.unlink(os.path.join(repo, "index", written))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", cache)
    capsys.readouterr()
    assert main(["backup", str(a), "--repo", repo, "--vm", "a"]) == 0
    assert "adopted unindexed pack" in capsys.readouterr().err
    assert main(["restore", "a@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == a.read_bytes()
