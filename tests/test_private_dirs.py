"""Directories pyvbak keeps private (the local cache and each repository's directory in it,
the QEMU work dir, the default repository) are used only when no one else can write them
(repo/cache.py, untrusted_dir_reason): whoever can write the cache can plant a cached index
or snapshot description that makes backups skip blocks; whoever can write the work dir can
put a socket where a backup connects to QEMU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import run_cli
from images import BS, assert_one_error_line, make_image
from pyvbak.errors import UsageError
from pyvbak.repo import cache as cache_mod
from pyvbak.repo.cache import SNAPSHOTS_FILE, untrusted_dir_reason

#: a user id no one on this machine has
STRANGER = 4242


def reason_of(path) -> str | None:
    r = untrusted_dir_reason(str(path))
    return None if r is None else str(r)


def test_private_directories_are_trusted_and_missing_parts_are_not_judged(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o700)
    assert reason_of(d) is None
    assert reason_of(d / "not" / "yet") is None  # make_private_dirs makes them 0700
    os.chmod(d, 0o755)  # readable by others: their secrets' problem, not a way in
    assert reason_of(d) is None


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_directory_others_can_write_is_not_trusted(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(cache_mod, "_private_group", lambda gid, uid: False)  # (0775: a group of several users)
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    reason = untrusted_dir_reason(str(d))
    assert str(reason) == f"{d} is writable by others (mode {mode:04o})"
    assert reason.advice() == f"take write access from the others ('chmod go-w {d}')"
    # and below it: anyone can rename what pyvbak makes there and put their own in its place
    below = reason_of(d / "pyvbak")
    if mode & 0o1000:  # sticky (/tmp): others cannot rename what is not theirs
        assert below is None
    else:
        who = "everyone" if mode & 0o002 else f"group {os.stat(d).st_gid}"
        assert below == f"{d} (a directory above {d / 'pyvbak'}) is writable by {who} (mode {mode:04o})"


def test_a_directory_only_the_users_private_group_can_write_is_trusted(tmp_path, monkeypatch):
    """Debian's OpenSSH allowance: with user private groups (umask 002) a user's own group
    holds the user alone, and group-writable is as private as 0755."""
    import grp
    import pwd

    d = tmp_path / "upg"
    d.mkdir()
    os.chmod(d, 0o775)
    try:
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(os.stat(d).st_gid)
        alone = group.gr_gid == me.pw_gid and group.gr_name == me.pw_name and set(group.gr_mem) <= {me.pw_name}
    except KeyError:  # a user id without a passwd entry (a container's --user): no group is its own
        alone = False
    assert cache_mod._private_group(os.stat(d).st_gid, os.geteuid()) is alone
    assert (reason_of(d) is None) is alone
    assert (reason_of(d / "sub") is None) is alone
    monkeypatch.setattr(cache_mod, "_private_group", lambda gid, uid: True)
    assert reason_of(d) is None and reason_of(d / "sub") is None


def test_another_users_directory_is_not_trusted_and_the_advice_fits_who_asks(tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    owner = os.stat(d).st_uid
    monkeypatch.setattr(cache_mod.os, "geteuid", lambda: STRANGER)  # this process as someone else
    reason = untrusted_dir_reason(str(d))
    assert str(reason) == f"{d} belongs to user id {owner}, not to this user ({STRANGER})"
    if owner == 0:
        assert reason.advice() == "it is user id 0's: use a directory of your own"
    else:  # (a directory above owned by root is trusted, as OpenSSH does)
        assert f"{d} (a directory above" in reason_of(d / "sub")
    # root running with a user's HOME (sudo without -H): never "make it yours" (the user's home)
    monkeypatch.setattr(cache_mod.os, "geteuid", lambda: 0)
    assert cache_mod.Distrust(str(d), "belongs to user id 1000", 1000).advice() == (
        "it is user id 1000's: run pyvbak as that user, or as root with root's own HOME (sudo -H)")


def test_in_a_user_namespace_the_hosts_root_directories_are_trusted(tmp_path, monkeypatch):
    """Inside ``unshare -r`` or a rootless container, every directory of the host's root
    shows as the overflow id (65534): the cache was off and the work dir refused."""
    d = tmp_path / "host-root"
    d.mkdir(mode=0o755)
    owner = os.stat(d).st_uid
    monkeypatch.setattr(cache_mod.os, "geteuid", lambda: STRANGER)  # the directory is not "ours" nor root's
    monkeypatch.setattr(cache_mod, "_unmapped_uid", lambda: None)  # no namespace: a stranger's directory
    assert owner == 0 or reason_of(d / "sub") is not None
    monkeypatch.setattr(cache_mod, "_unmapped_uid", lambda: owner)  # in one: it shows as the overflow id
    assert reason_of(d / "sub") is None
    assert reason_of(d) is not None  # (the directory itself must still be this user's)
    with open("/proc/self/uid_map") as f:  # and outside one (this test run), no such id
        if f.read().split() == ["0", "0", "4294967295"]:
            monkeypatch.undo()
            assert cache_mod._unmapped_uid() is None


def test_links_are_judged_where_they_lead(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    link = tmp_path / "cache"
    link.symlink_to(shared)
    assert reason_of(link) == f"{shared} is writable by others (mode 0777)"
    # and a link to a private directory, in a directory anyone can write (and so replace it)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (shared / "cache").symlink_to(mine)
    assert reason_of(shared / "cache") == (
        f"{shared} (a directory above {shared / 'cache'}) is writable by everyone (mode 0777)")


def test_a_directory_that_cannot_be_reached_is_left_to_the_error_of_making_it(tmp_path, monkeypatch):
    """EACCES on a directory above said "is not private: cannot be checked", where the
    older "cannot create the work dir ...: Permission denied" was the right line."""
    from pyvbak.hypervisors import default_work_dir

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    real_stat = os.stat

    def stat(p, *a, **k):
        if str(p).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(cache_mod.os, "stat", stat)
    assert reason_of(locked / "w") is None
    monkeypatch.setattr(cache_mod, "make_private_dirs",
                        lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied", p)))
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(locked / "w"))
    with pytest.raises(UsageError, match=rf"^cannot create the work dir {locked}/w \(sockets and fleecing files\): "
                                         "Permission denied; set PYVBAK_WORK_DIR to a writable directory"):
        default_work_dir()


def _backup(capsys, repo, img, vm="vm"):
    return run_cli(capsys, "backup", img, "--repo", repo, "--vm", vm, "--json")


def _cached_repo(tmp_path, capsys, monkeypatch):
    """(cache root, repository, image, snapshot id, the repository's cache directory)
    after a backup and a listing that cached its description."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(root))
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    img = make_image(tmp_path / "d.img", 8 * BS, [(0, 8 * BS, "random")], seed=3)
    code, out, err = _backup(capsys, repo, str(img))
    assert code == 0 and "local cache" not in err, err
    sid = json.loads(out)["snapshot_id"]
    assert run_cli(capsys, "snapshots", "--repo", repo)[0] == 0  # (the listing that caches it)
    [cached] = list(root.rglob(SNAPSHOTS_FILE))
    return root, repo, img, sid, cached.parent


def _plant(cache_dir, sid):
    doc = json.loads((cache_dir / SNAPSHOTS_FILE).read_text())
    doc["metas"][f"snapshots/{sid}.json"]["vm"] = "planted"
    (cache_dir / SNAPSHOTS_FILE).write_text(json.dumps(doc))


def test_a_cache_others_can_write_is_not_read_and_the_cli_warns(tmp_path, capsys, monkeypatch):
    """The attack: a snapshot description planted in the cache (its name is listed, its
    content is the attacker's) is what `snapshots` and the next backup's parent would be."""
    root, repo, img, sid, cache_dir = _cached_repo(tmp_path, capsys, monkeypatch)
    _plant(cache_dir, sid)
    os.chmod(root, 0o777)  # as a umask of 000 (or another user's hand) leaves it

    code, out, err = run_cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0, err
    assert [s["vm"] for s in json.loads(out)] == ["vm"]  # read from the repository, not the cache
    assert err.splitlines() == [
        f"warning: not using the local cache: {root} is writable by others (mode 0777); take write access from the "
        f"others ('chmod go-w {root}'), or set PYVBAK_CACHE_DIR to a directory only you can write ('' for no cache)"]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code, out, err = _backup(capsys, repo, str(img))  # works without the cache, writes nothing there
    assert code == 0, err
    assert json.loads(out)["parent"] == sid
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


@pytest.mark.parametrize("how", ["writable", "another user's", "a link"])
def test_a_repository_directory_in_the_cache_that_others_can_write_is_not_read(tmp_path, capsys, monkeypatch, how):
    """While the root was open, another user replaced this repository's directory in it
    with their own: after the root was mended (as the warning says) the plant was used,
    without a word."""
    root, repo, img, sid, cache_dir = _cached_repo(tmp_path, capsys, monkeypatch)
    _plant(cache_dir, sid)
    if how == "writable":
        os.chmod(cache_dir, 0o777)
        why = "is writable by others (mode 0777)"
    elif how == "a link":  # (even to a directory of this user's: whoever made the link chose where it leads)
        elsewhere = tmp_path / "elsewhere"
        shutil.move(str(cache_dir), str(elsewhere))
        cache_dir.symlink_to(elsewhere)
        why = "is a symbolic link, which pyvbak never makes"
    else:
        if os.geteuid() != 0:  # (as tmpfs_at in conftest: CI runs as root, where a skip would hide it)
            msg = "handing a directory to another user needs root"
            pytest.fail(msg) if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip(msg)
        os.chown(cache_dir, STRANGER, STRANGER)
        why = f"belongs to user id {STRANGER}, not to this user (0)"
    code, out, err = run_cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0, err
    assert [s["vm"] for s in json.loads(out)] == ["vm"]
    assert err.splitlines() == [
        f"warning: not using the local cache: {cache_dir} {why}; move it out of the way ('mv {cache_dir} "
        f"{cache_dir}.untrusted'): it is only a cache, made again, or set PYVBAK_CACHE_DIR to a directory only you "
        f"can write ('' for no cache)"]
    code, out, err = _backup(capsys, repo, str(img))
    assert code == 0 and json.loads(out)["parent"] == sid, err
    shutil.move(str(cache_dir), f"{cache_dir}.untrusted")  # the advice, followed: a fresh one, used
    code, out, err = run_cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0 and err == "" and [s["vm"] for s in json.loads(out)] == ["vm", "vm"]
    assert (cache_dir / SNAPSHOTS_FILE).exists() and oct(os.stat(cache_dir).st_mode & 0o777) == "0o700"


def test_a_work_dir_others_can_write_is_refused(tmp_path, monkeypatch):
    from pyvbak.hypervisors import default_work_dir

    work = tmp_path / "work"
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(work))
    assert default_work_dir() == str(work) and oct(os.stat(work).st_mode & 0o777) == "0o700"
    os.chmod(work, 0o777)
    with pytest.raises(UsageError, match=rf"^the work dir {work} \(sockets and fleecing files\) is not private: "
                       rf"{work} is writable by others \(mode 0777\); take write access from the others"):
        default_work_dir()
    os.chmod(work, 0o700)
    os.chmod(tmp_path, 0o777)  # a parent anyone can write: the work dir can be swapped
    try:
        nested = tmp_path / "new"
        monkeypatch.setenv("PYVBAK_WORK_DIR", str(nested))
        with pytest.raises(UsageError, match=rf"{tmp_path} \(a directory above {nested}\) is writable by everyone"):
            default_work_dir()
        assert not nested.exists()  # judged before anything is made there
    finally:
        os.chmod(tmp_path, 0o700)


def test_a_qemu_backup_with_a_shared_work_dir_fails_with_one_line(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(work))
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    code, out, err = run_cli(capsys, "backup", f"qemu://{tmp_path}/qmp.sock?node=n", "--repo", repo, "--vm", "v")
    assert code != 0 and out == ""
    assert_one_error_line(err, "is not private", f"the work dir {work}")
    assert os.listdir(work) == []


@pytest.mark.parametrize("command", ["backup", "init"])
def test_a_default_repository_others_can_write_is_refused(tmp_path, capsys, monkeypatch, command):
    """init of the default repository created it there, and the next backup refused it."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.delenv("PYVBAK_REPO", raising=False)
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=5)
    args = ["backup", str(img), "--vm", "v"] if command == "backup" else ["init"]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert assert_one_error_line(err) == (
        f"pyvbak: error: the default repository {data}/pyvbak/repository is not private: {data} (a directory above "
        f"{data}/pyvbak/repository) is writable by everyone (mode 0777); take write access from the others "
        f"('chmod go-w {data}'), or give --repo REPO")
    assert os.listdir(data) == []  # nothing made in it
    os.chmod(data, 0o700)
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err


def test_no_home_directory_means_no_cache_and_clear_errors(tmp_path, capsys, monkeypatch):
    """No HOME and no passwd entry: "~" stayed "~", and the cache, the work dir and the
    default repository went under whatever directory the command ran in."""
    from pyvbak.hypervisors import default_work_dir
    from pyvbak.repo.cache import cache_root

    monkeypatch.chdir(tmp_path)
    for var in ("PYVBAK_CACHE_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME", "PYVBAK_WORK_DIR", "PYVBAK_REPO"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # what it does with neither
    assert cache_root() is None
    no_home = r"there is no home directory \(no HOME, and no passwd entry for this user\)"
    with pytest.raises(UsageError, match=no_home + ", so the work dir"):
        default_work_dir()
    code, out, err = run_cli(capsys, "init")
    assert code == 2 and re.search(no_home + ", so the default repository cannot be kept under it: give --repo REPO",
                                   assert_one_error_line(err))
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=6)
    assert run_cli(capsys, "init", "r")[0] == 0
    code, out, err = run_cli(capsys, "backup", str(img), "--repo", "r", "--vm", "v")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["d.img", "r"]  # no ./~ made


def test_a_home_directory_that_does_not_exist_gets_no_cache_made_in_it(tmp_path, capsys, monkeypatch):
    """HOME=/nonexistent-home made /nonexistent-home/.cache/pyvbak: a home tree under /.
    The cache is skipped instead, as one that cannot be used is, and the CLI says so."""
    from pyvbak.repo.cache import cache_root

    home = tmp_path / "nonexistent-home"
    monkeypatch.setenv("HOME", str(home))
    for var in ("PYVBAK_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert cache_root() is None
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=7)
    code, out, err = _backup(capsys, repo, str(img))
    assert code == 0 and json.loads(out)["snapshot_id"]
    assert err.splitlines() == [
        f"warning: not using the local cache: the home directory {home} does not exist; every run is slower without "
        f"it: set PYVBAK_CACHE_DIR to a directory you can write ('' for no cache)"]
    assert not home.exists()


@pytest.mark.parametrize("where", ["/dev/null", "a regular file", "/proc", "XDG_CACHE_HOME=/dev/null"])
def test_a_cache_dir_that_cannot_be_used_is_said_once_and_json_stays_clean(tmp_path, capsys, monkeypatch, where):
    """It cost every run its cache without a word: a user tuning a slow nightly job could
    not know."""
    if where == "a regular file":
        (tmp_path / "afile").write_bytes(b"x")
        monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "afile"))
        why = f"{tmp_path / 'afile'} is not a directory"
    elif where.startswith("XDG"):
        monkeypatch.delenv("PYVBAK_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null")
        why = "/dev/null is not a directory"
    else:
        monkeypatch.setenv("PYVBAK_CACHE_DIR", where)
        why = "/dev/null is not a directory" if where == "/dev/null" else None
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=8)
    for args in (("backup", img, "--repo", repo, "--vm", "vm", "--json"), ("snapshots", "--repo", repo, "--json")):
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        json.loads(out)
        [line] = err.splitlines()
        assert line.startswith("warning: not using the local cache: "), line
        if why:
            assert f": {why}; every run is slower without it" in line
        elif os.geteuid() == 0:  # (anyone else is told /proc is root's: untrusted_cache_reason)
            assert "no directory can be made in /proc" in line


def test_a_usable_cache_is_not_warned_about_and_the_probe_leaves_nothing(tmp_path, capsys, monkeypatch):
    root = tmp_path / "new-cache"
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(root / "below"))
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    code, out, err = run_cli(capsys, "unlock", "--repo", repo)  # (writes nothing to the cache)
    assert code == 0 and err == ""
    assert not root.exists()
    root.mkdir()
    assert run_cli(capsys, "unlock", "--repo", repo)[2] == "" and os.listdir(root) == []


def test_a_home_directory_that_does_not_exist_gets_no_work_dir_or_default_repository_made(tmp_path, capsys,
                                                                                         monkeypatch):
    """HOME=/nonexistent-home made a home tree under / for the QEMU work dir and the
    default repository (session 25's audit; the cache already declines)."""
    from pyvbak.hypervisors import default_work_dir

    home = tmp_path / "nonexistent-home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for var in ("PYVBAK_CACHE_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME", "PYVBAK_WORK_DIR", "PYVBAK_REPO"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match=f"the home directory {home} does not exist"):
        default_work_dir()
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=7)
    for args in (["init"], ["backup", str(img), "--vm", "v"], ["demo"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and f"the home directory {home} does not exist" in assert_one_error_line(err)
        assert "give --repo REPO" in err
    assert not home.exists()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # a data directory of its own: used
    assert run_cli(capsys, "backup", str(img), "--vm", "v")[0] == 0
    assert (tmp_path / "data" / "pyvbak" / "repository").is_dir() and not home.exists()


def test_a_probe_directory_left_by_a_killed_run_is_removed_by_the_next_probe(tmp_path, capsys, monkeypatch):
    """The probe is made and removed at once; a kill -9 between the two left it in the
    cache's parent (a home directory) for good."""
    from pyvbak.processes import scope_token, start_time

    parent = tmp_path / "parent"
    parent.mkdir()
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(parent / "cache"))
    dead = subprocess.Popen(["true"])
    dead.wait()  # (its pid is free again)
    me = os.getpid()
    stale = parent / f".pyvbak-probe-{dead.pid}-12345-{scope_token()}-0123456789ab"
    live = parent / f".pyvbak-probe-{me}-{start_time(me)}-{scope_token()}-0123456789ab"
    old_style_stale = parent / f".pyvbak-probe-{dead.pid}-0123456789ab"
    old_style_recent = parent / f".pyvbak-probe-{me}-ba9876543210"
    not_empty = parent / f".pyvbak-probe-{dead.pid}-12345-{scope_token()}-ffffffffffff"
    a_file = parent / f".pyvbak-probe-{dead.pid}-12345-{scope_token()}-eeeeeeeeeeee"
    for d in (stale, live, old_style_stale, old_style_recent, not_empty):
        d.mkdir()
    (not_empty / "mine").write_bytes(b"x")
    a_file.write_bytes(b"x")
    os.utime(old_style_stale, (time.time() - 120, time.time() - 120))
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    code, out, err = run_cli(capsys, "unlock", "--repo", repo)
    assert code == 0 and err == ""
    assert sorted(p.name for p in parent.iterdir()) == sorted(p.name for p in (live, old_style_recent, not_empty, a_file))
