"""Permission denied is the caller's rights, not damage:
a restore or verify that may not open a pack stops with exit 3 and the permission
message, and ``verify --repair --drop-unreadable`` - which verify offers for copies that
could not be read - never drops the records of intact blocks for it."""

from __future__ import annotations

import errno
import json
import os

import pytest

from conftest import run_cli
from images import MiB, random_bytes
from pyvbak.backends.local import LocalBackend


cli = run_cli


@pytest.fixture
def repo(tmp_path, capsys):
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(2 * MiB, seed=41))
    r = tmp_path / "repo"
    assert cli(capsys, "init", r)[0] == 0
    code, out, err = cli(capsys, "backup", img, "--repo", r, "--vm", "v", "--json")
    assert code == 0, err
    return r, img, json.loads(out)["id"]


@pytest.fixture
def packs_denied(monkeypatch):
    """Every read of a pack fails as open(2) does for a file another user owns 0600."""
    real = LocalBackend.read_range_into

    def denied(self, name, offset, buf):
        if name.startswith("packs/"):
            raise self._error(PermissionError(errno.EACCES, "Permission denied", self._path(name)),
                              name, self._path(name), "opening")
        return real(self, name, offset, buf)

    monkeypatch.setattr(LocalBackend, "read_range_into", denied)
    return lambda: monkeypatch.setattr(LocalBackend, "read_range_into", real)


def test_restore_says_permission_denied_not_damage(repo, packs_denied, capsys, tmp_path):
    r, _, sid = repo
    code, _, err = cli(capsys, "restore", sid, tmp_path / "out.img", "--repo", r)
    assert code == 3, err
    assert "permission denied" in err and "bad block" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.img").exists()


def test_verify_repair_drops_nothing_it_may_not_read(repo, packs_denied, capsys, tmp_path):
    r, img, sid = repo
    index_before = sorted(os.listdir(r / "index"))
    code, _, err = cli(capsys, "verify", "--repo", r)
    assert code == 3 and "permission denied" in err, err
    assert "--drop-unreadable" not in err
    code, _, err = cli(capsys, "verify", "--repo", r, "--repair", "--drop-unreadable")
    assert code == 3 and "permission denied" in err, err
    assert sorted(os.listdir(r / "index")) == index_before and not (r / "lost").exists()
    packs_denied()  # the ownership fixed: everything is there
    code, _, err = cli(capsys, "restore", sid, tmp_path / "out.img", "--repo", r)
    assert code == 0, err
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


def test_prune_stopped_by_permission_denied_exits_3(repo, monkeypatch, capsys):
    r, _, sid = repo
    real = LocalBackend.read

    def denied(self, name):
        if name.startswith("snapshots/") and name.endswith(".json"):
            raise self._error(PermissionError(errno.EACCES, "Permission denied", self._path(name)),
                              name, self._path(name), "reading")
        return real(self, name)

    monkeypatch.setattr(LocalBackend, "read", denied)
    code, _, err = cli(capsys, "prune", "--repo", r)
    assert code == 3, err
    assert "prune stopped, nothing deleted" in err and "permission denied" in err


@pytest.fixture
def read_only_locks(monkeypatch):
    """Lock files cannot be written, as on a repository mounted read-only."""
    real = LocalBackend.write_new

    def refused(self, name, data):
        if name.startswith("locks/"):
            raise self._error(OSError(errno.EROFS, "Read-only file system", self._path(name)),
                              name, self._path(name), "writing")
        return real(self, name, data)

    monkeypatch.setattr(LocalBackend, "write_new", refused)


def test_dry_runs_on_a_read_only_repository(repo, read_only_locks, capsys):
    """Previewing retention on read-only media: the dry runs say --no-lock would do, and
    with it they run; --no-lock without --dry-run is refused (forget and prune write)."""
    r, _, sid = repo
    for args in (("prune", "--dry-run"), ("forget", "--keep-last", "1", "--dry-run"),
                 ("forget", "v@latest", "--dry-run"), ("forget", "v@latest", "--prune", "--dry-run")):
        code, _, err = cli(capsys, *args, "--repo", r)
        assert code == 3 and "read-only file system" in err and "add --no-lock" in err, (args, err)
        code, out, err = cli(capsys, *args, "--no-lock", "--repo", r)
        assert code == 0, (args, err)
    code, out, _ = cli(capsys, "forget", "v@latest", "--dry-run", "--no-lock", "--repo", r)
    assert f"would forget 1 snapshot(s): {sid}" in out
    for args in (("prune",), ("forget", "v@latest")):
        code, _, err = cli(capsys, *args, "--no-lock", "--repo", r)
        assert code == 2 and "--no-lock only goes with --dry-run" in err, err
    code, out, _ = cli(capsys, "snapshots", "--repo", r, "--json")
    assert sid in out  # nothing was forgotten


def _made_by_backup(repo_dir, since: float):
    """(mode, uid, gid, is_dir) of every object and directory a backup made after ``since``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(repo_dir):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if st.st_ctime > since and not n.startswith("."):
                out[os.path.relpath(p, repo_dir)] = (st.st_mode & 0o7777, st.st_uid, st.st_gid, os.path.isdir(p))
    return out


def test_a_group_shared_repository_stays_shared(tmp_path, capsys, monkeypatch):
    """The repository's root lets its group in (setgid, group rwx): new objects are group
    readable and new directories group usable, whatever this process's umask - they were
    always 0600/0700, and the group lost the repository at the next backup."""
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(MiB, seed=42))
    r = tmp_path / "repo"
    assert cli(capsys, "init", r)[0] == 0
    os.chmod(r, 0o2770)
    old_umask = os.umask(0o077)
    try:
        since = os.stat(r).st_ctime
        code, _, err = cli(capsys, "backup", img, "--repo", r, "--vm", "v")
    finally:
        os.umask(old_umask)
    assert code == 0, err
    made = _made_by_backup(r, since - 1)
    files = {p: m for p, (m, _, _, d) in made.items() if not d and p.startswith(("packs", "index", "snapshots"))}
    dirs = {p: m for p, (m, _, _, d) in made.items() if d and p.startswith("packs/")}
    assert files and all(m & 0o777 == 0o640 for m in files.values()), files
    assert dirs and all(m == 0o2770 for m in dirs.values()), dirs


def test_a_backup_as_root_into_another_users_repository_leaves_it_theirs(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root: the case is a backup run as root into another user's repository")
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(MiB, seed=43))
    r = tmp_path / "repo"
    assert cli(capsys, "init", r)[0] == 0
    for dirpath, dirnames, filenames in os.walk(r):  # the user's repository
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            os.chown(n, 65534, 65534)
    since = os.stat(r).st_ctime
    code, _, err = cli(capsys, "backup", img, "--repo", r, "--vm", "v")
    assert code == 0, err
    made = _made_by_backup(r, since - 1)
    assert any(p.startswith("packs/") for p in made)
    assert all((uid, gid) == (65534, 65534) for _, uid, gid, _ in made.values()), made


def test_a_plain_repository_directory_shares_nothing(tmp_path, capsys):
    """0755 from a plain mkdir is no decision to share: objects stay 0600 (a first version
    of the sharing made every pack world-readable under such a root)."""
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(MiB, seed=44))
    r = tmp_path / "repo"
    assert cli(capsys, "init", r)[0] == 0
    os.chmod(r, 0o755)
    since = os.stat(r).st_ctime
    code, _, err = cli(capsys, "backup", img, "--repo", r, "--vm", "v")
    assert code == 0, err
    made = _made_by_backup(r, since - 1)
    files = {p: m for p, (m, _, _, d) in made.items() if not d and p.startswith(("packs", "index", "snapshots"))}
    assert files and all(m & 0o077 == 0 for m in files.values()), files


def test_sharing_is_best_effort_where_modes_cannot_be_set(tmp_path, capsys, monkeypatch):
    """vfat refuses chmod and chown: a group-shared root there must not stop backups."""
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(MiB, seed=45))
    r = tmp_path / "repo"
    assert cli(capsys, "init", r)[0] == 0
    os.chmod(r, 0o2770)

    def refused(*a, **kw):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    for name in ("fchmod", "chmod", "fchown", "chown"):
        monkeypatch.setattr(os, name, refused)
    code, _, err = cli(capsys, "backup", img, "--repo", r, "--vm", "v")
    assert code == 0, err


def test_verify_stops_on_a_snapshot_index_it_may_not_read(repo, monkeypatch, capsys):
    """A snapshot index this user may not read was reported as a damaged snapshot (exit 6,
    which monitoring reads as damage): it is the user's rights."""
    r, _, sid = repo
    real = LocalBackend.read

    def denied(self, name):
        if name.endswith(".index"):
            raise self._error(PermissionError(errno.EACCES, "Permission denied", self._path(name)),
                              name, self._path(name), "reading")
        return real(self, name)

    monkeypatch.setattr(LocalBackend, "read", denied)
    code, _, err = cli(capsys, "verify", "--repo", r)
    assert code == 3 and "permission denied" in err and "damaged" not in err, err
