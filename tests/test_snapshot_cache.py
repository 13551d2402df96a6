"""The snapshot-metadata cache (pyvbak/repo/cache.py): the same snapshots as reading every
metadata object, fewer reads, and never a snapshot that is gone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from images import backup_file, make_image, BS
from pyvbak.repo.cache import SNAPSHOTS_FILE, repo_cache_dir
from pyvbak.repo.prune import forget_snapshots
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository
from pyvbak.errors import IntegrityError, SnapshotNotFound


def ids(snaps):
    return [s.id for s in snaps]


@pytest.fixture
def repo_with_snapshots(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    made = []
    for vm in ("a", "b", "a"):
        img = make_image(tmp_path / f"{vm}.img", 8 * BS, [(0, 8 * BS, "random")], seed=len(made))
        made.append(backup_file(repo, img, vm=vm).snapshot_id)
    return repo, made


def uncached(repo, **kw):
    return Repository.open(repo.location).snapshots(cached=False, **kw)


def test_same_snapshots_as_reading_every_object(repo_with_snapshots, monkeypatch):
    repo, made = repo_with_snapshots
    r = Repository.open(repo.location)
    assert ids(r.snapshots()) == ids(uncached(repo)) and sorted(made) == sorted(ids(uncached(repo)))
    assert ids(r.snapshots(vm="a")) == ids(uncached(repo, vm="a"))
    assert os.path.exists(os.path.join(repo_cache_dir(r.config.repo_id), SNAPSHOTS_FILE))
    # the second listing reads no metadata object
    reads = []
    orig = r.backend.read
    monkeypatch.setattr(r.backend, "read", lambda name: reads.append(name) or orig(name))
    assert ids(r.snapshots()) == ids(uncached(repo))
    assert not [n for n in reads if n.startswith("snapshots/")]


def test_forgotten_snapshots_leave_the_cache(repo_with_snapshots):
    repo, made = repo_with_snapshots
    r = Repository.open(repo.location)
    r.snapshots()  # cached
    with r.lock():
        forget_snapshots(r, [r.resolve(made[0])])
    r = Repository.open(repo.location)
    assert made[0] not in ids(r.snapshots())
    assert ids(r.snapshots()) == ids(uncached(repo))
    with open(os.path.join(repo_cache_dir(r.config.repo_id), SNAPSHOTS_FILE)) as f:
        assert not [k for k in json.load(f)["metas"] if made[0] in k]


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"format": "x"}', b"[1, 2]"])
def test_damaged_cache_is_ignored(repo_with_snapshots, damage):
    repo, made = repo_with_snapshots
    r = Repository.open(repo.location)
    r.snapshots()
    with open(os.path.join(repo_cache_dir(r.config.repo_id), SNAPSHOTS_FILE), "wb") as f:
        f.write(damage)
    assert ids(Repository.open(repo.location).snapshots()) == ids(uncached(repo))


def test_a_cached_entry_under_the_wrong_name_is_read_again(repo_with_snapshots):
    repo, made = repo_with_snapshots
    r = Repository.open(repo.location)
    r.snapshots()
    path = os.path.join(repo_cache_dir(r.config.repo_id), SNAPSHOTS_FILE)
    doc = json.load(open(path))
    name = f"snapshots/{made[1]}.json"
    doc["metas"][name] = dict(doc["metas"][name], id="20200101T000000Z-deadbeef", vm="zzz")
    json.dump(doc, open(path, "w"))
    snaps = {s.id: s for s in Repository.open(repo.location).snapshots()}
    assert snaps[made[1]].vm == "b"


def test_verify_reads_the_repository_not_the_cache(repo_with_snapshots):
    repo, made = repo_with_snapshots
    r = Repository.open(repo.location)
    r.snapshots()  # cached while intact
    path = os.path.join(repo.location, "snapshots", f"{made[2]}.json")
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(b"{damaged")
    # the cache still holds the intact copy; verify reads the object and reports it
    report = verify_repository(Repository.open(repo.location)).report
    assert report["ok"] is False
    assert [a["id"] for a in report["affected_snapshots"]] == [made[2]]
    assert "corrupt" in report["affected_snapshots"][0]["reason"]


def test_caches_of_repositories_unused_for_30_days_are_removed(repo_with_snapshots, monkeypatch):
    import pyvbak.repo.cache as cache_mod

    repo, _ = repo_with_snapshots
    root = os.environ["PYVBAK_CACHE_DIR"]
    old = 31 * 86400
    stale = os.path.join(root, "ab" * 16)
    recent = os.path.join(root, "cd" * 16)
    work = os.path.join(root, "work")  # QEMU work dir: never expired
    for d in (stale, recent, work):
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "x"), "w").close()
    now = time.time()
    os.utime(stale, (now - old, now - old))
    os.utime(work, (now - old, now - old))
    monkeypatch.setattr(cache_mod, "_expired_once", False)
    Repository.open(repo.location).snapshots()
    assert not os.path.exists(stale)
    assert os.path.exists(recent) and os.path.exists(work)
    assert os.path.isdir(repo_cache_dir(repo.config.repo_id))


def test_the_expiry_scan_runs_once_a_day_not_in_every_process(repo_with_snapshots, monkeypatch):
    """Each process used to look through every cache directory (a stat each: 16-22 ms
    of every backup with 2165 of them); the root's stamp now says when that last ran."""
    import pyvbak.repo.cache as cache_mod

    repo, _ = repo_with_snapshots
    root = os.environ["PYVBAK_CACHE_DIR"]
    stamp = os.path.join(root, cache_mod.EXPIRE_STAMP)
    stale = os.path.join(root, "ab" * 16)
    now = time.time()

    def make_stale():
        os.makedirs(stale, exist_ok=True)
        os.utime(stale, (now - 31 * 86400, now - 31 * 86400))

    def new_process():
        monkeypatch.setattr(cache_mod, "_expired_once", False)
        Repository.open(repo.location).snapshots()

    make_stale()
    new_process()  # no stamp yet: the scan runs and leaves one
    assert not os.path.exists(stale)
    assert now - os.stat(stamp).st_mtime < 60
    make_stale()
    new_process()  # scanned a moment ago: not again
    assert os.path.exists(stale)
    os.utime(stamp, (now - 2 * 86400, now - 2 * 86400))
    new_process()  # the last scan is two days old
    assert not os.path.exists(stale)
    assert now - os.stat(stamp).st_mtime < 60


def test_one_instance_reads_the_cache_file_once_and_still_sees_other_writers(repo_with_snapshots, tmp_path, monkeypatch):
    """A backup lists snapshots twice (its parent, then the engine's check); the second
    listing must not parse the cache file again, yet it lists afresh: a snapshot another
    process added or forgot in between shows (or goes)."""
    repo, made = repo_with_snapshots
    r = Repository.open(repo.location)
    assert sorted(ids(r.snapshots())) == sorted(made)
    import pyvbak.repo.cache as cache_mod

    loads = []
    monkeypatch.setattr(cache_mod.SnapshotMetaCache, "load", lambda self: loads.append(1) or {})
    other = Repository.open(repo.location)  # another process, in effect
    img = make_image(tmp_path / "c.img", 4 * BS, [(0, 4 * BS, "random")], seed=99)
    added = backup_file(other, img, vm="c").snapshot_id
    forget_snapshots(other, [other.resolve(made[0])])
    loads.clear()
    assert sorted(ids(r.snapshots())) == sorted(made[1:] + [added])
    assert loads == []


def test_a_killed_saves_temp_file_is_removed_by_a_later_save(tmp_path, monkeypatch):
    """A process killed while saving the metadata cache left snapshots.json.<hex>.tmp,
    one more per such kill, never removed."""
    import time as time_mod

    from pyvbak.repo import cache as cache_mod

    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache"))
    c = cache_mod.SnapshotMetaCache("0" * 32)
    c.save({"snapshots/a.json": {"vm": "v"}})
    d = os.path.dirname(c.path)
    stale = os.path.join(d, cache_mod.SNAPSHOTS_FILE + ".0123456789ab.tmp")
    fresh = os.path.join(d, cache_mod.SNAPSHOTS_FILE + ".ba9876543210.tmp")
    for p in (stale, fresh):
        with open(p, "w") as f:
            f.write("{}")
    old = time_mod.time() - 2 * cache_mod.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    import subprocess

    from pyvbak.processes import scope_token

    ended = subprocess.Popen(["true"])
    ended.wait()
    killed = os.path.join(d, f"{cache_mod.SNAPSHOTS_FILE}.{ended.pid}-123-{scope_token()}-0123456789ab.tmp")
    live = os.path.join(d, f"{cache_mod.SNAPSHOTS_FILE}.{os.getpid()}-0-{scope_token()}-0123456789ab.tmp")
    for p in (killed, live):
        with open(p, "w") as f:
            f.write("{}")
    c.save({"snapshots/b.json": {"vm": "v"}})
    assert not os.path.exists(stale) and not os.path.exists(killed)  # however young
    assert os.path.exists(fresh) and os.path.exists(live)  # a concurrent save's is kept
    assert c.load() == {"snapshots/b.json": {"vm": "v"}}


def test_directories_made_for_the_cache_and_work_dir_are_private_under_umask_000(tmp_path, monkeypatch):
    """makedirs gives its mode to the last directory only: under umask 000 a missing
    ~/.cache (the cache root's parent) was made 0777, so anyone on the host could swap
    pyvbak's directories in it."""
    from pyvbak.hypervisors import default_work_dir
    from pyvbak.hypervisors.qemu.fleece_image import _open_templates_dir as templates_dir

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("PYVBAK_CACHE_DIR", raising=False)
    monkeypatch.delenv("PYVBAK_WORK_DIR", raising=False)
    old = os.umask(0)
    try:
        work = default_work_dir()
        fd = templates_dir()
        repo = Repository.init(str(tmp_path / "repo"))
        repo.snapshots()  # writes the snapshot cache
        from pyvbak.cli.common import open_repository
        monkeypatch.delenv("PYVBAK_REPO", raising=False)
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
        default = open_repository(None, create_default=True)  # the default repository, its parents
    finally:
        os.umask(old)
    shared = [p for p in Path(default.location).parents if str(p).startswith(str(home)) and p.stat().st_mode & 0o077]
    assert str(home / ".local") in default.location and shared == [home], shared
    if fd is not None:
        os.close(fd)
    made = [p for p in (home / ".cache").rglob("*") if p.is_dir()] + [home / ".cache"]
    assert os.path.join(str(home), ".cache", "pyvbak", "work") == work
    assert any(p.name == "fleece-templates" for p in made) and len(made) >= 4, made
    assert {p: oct(p.stat().st_mode & 0o777) for p in made if p.stat().st_mode & 0o077} == {}
    (home / "file").write_text("x")
    from pyvbak.repo.cache import make_private_dirs
    with pytest.raises(FileExistsError):
        make_private_dirs(str(home / "file"))
    with pytest.raises(NotADirectoryError, match="file"):  # a parent in the way is named, as makedirs does
        make_private_dirs(str(home / "file" / "work"))


def test_a_whole_snapshot_id_is_resolved_by_reading_its_description_alone(repo_with_snapshots, monkeypatch):
    """`restore ID` listed every snapshot and read each description the cache lacked: on a
    machine without a cache, one read per snapshot in the repository."""
    repo, made = repo_with_snapshots
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    r = Repository.open(repo.location)
    calls = []
    real_list, real_read = r.backend.list, r.backend.read
    monkeypatch.setattr(r.backend, "list", lambda prefix, *a, **k: calls.append(("list", prefix)) or real_list(prefix, *a, **k))
    monkeypatch.setattr(r.backend, "read", lambda name, *a, **k: calls.append(("read", name)) or real_read(name, *a, **k))
    snap = r.resolve(made[1])
    assert (snap.id, snap.vm) == (made[1], "b")
    assert snap.meta == uncached(repo, vm="b")[0].meta
    assert calls == [("read", f"snapshots/{made[1]}.json")]
    calls.clear()
    assert r.resolve(made[1][:-2]).id == made[1]  # a prefix: found by listing
    assert ("list", "snapshots/") in calls

    forget_snapshots(r, [snap])  # gone: not found, as before
    with pytest.raises(SnapshotNotFound, match=f"snapshot {made[1]} not found"):
        r.resolve(made[1])
    with open(os.path.join(repo.location, "snapshots", f"{made[0]}.json"), "w") as f:
        f.write('{"vm": "a", "id": "another"}')  # damaged (or another's copied over it): said so
    with pytest.raises(IntegrityError, match=f"snapshot metadata snapshots/{made[0]}.json is damaged"):
        Repository.open(repo.location).resolve(made[0])
