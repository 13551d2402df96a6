"""Directories pyvbak keeps private (the local cache, the QEMU work dir, the default
repository) are used only when no one else can write them (repo/cache.py,
untrusted_dir_reason): whoever can write the cache can plant a cached index or snapshot
description that makes backups skip blocks; whoever can write the work dir can put a
socket where a backup connects to QEMU."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli
from images import BS, assert_one_error_line, make_image
from pyvbak.errors import UsageError
from pyvbak.repo import cache as cache_mod
from pyvbak.repo.cache import SNAPSHOTS_FILE, untrusted_dir_reason


def test_private_directories_are_trusted_and_missing_parts_are_not_judged(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o700)
    assert untrusted_dir_reason(str(d)) is None
    assert untrusted_dir_reason(str(d / "not" / "yet")) is None  # make_private_dirs makes them 0700
    os.chmod(d, 0o755)  # readable by others: their secrets' problem, not a way in
    assert untrusted_dir_reason(str(d)) is None


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_directory_others_can_write_is_not_trusted(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(cache_mod, "_private_group", lambda gid, uid: False)  # (0775: a group of several users)
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    reason = untrusted_dir_reason(str(d))
    assert reason == f"{d} is writable by others (mode {mode:04o})"
    # and below it: anyone can rename what pyvbak makes there and put their own in its place
    reason = untrusted_dir_reason(str(d / "pyvbak"))
    if mode & 0o1000:  # sticky (/tmp): others cannot rename what is not theirs
        assert reason is None
    else:
        assert reason is not None and reason.startswith(f"{d}, a directory above {d / 'pyvbak'}, is writable by")


def test_a_directory_only_the_users_private_group_can_write_is_trusted(tmp_path, monkeypatch):
    """Debian's OpenSSH allowance: with user private groups (umask 002) a user's own group
    holds the user alone, and group-writable is as private as 0755."""
    import grp
    import pwd

    d = tmp_path / "upg"
    d.mkdir()
    os.chmod(d, 0o775)
    me = pwd.getpwuid(os.geteuid())
    group = grp.getgrgid(os.stat(d).st_gid)
    alone = group.gr_gid == me.pw_gid and group.gr_name == me.pw_name and set(group.gr_mem) <= {me.pw_name}
    assert cache_mod._private_group(group.gr_gid, me.pw_uid) is alone
    assert (untrusted_dir_reason(str(d)) is None) is alone
    assert (untrusted_dir_reason(str(d / "sub")) is None) is alone
    monkeypatch.setattr(cache_mod, "_private_group", lambda gid, uid: True)
    assert untrusted_dir_reason(str(d)) is None and untrusted_dir_reason(str(d / "sub")) is None


def test_another_users_directory_is_not_trusted(tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    owner = os.stat(d).st_uid
    monkeypatch.setattr(cache_mod.os, "geteuid", lambda: owner + 4242)  # this process as someone else
    assert untrusted_dir_reason(str(d)) == f"{d} belongs to user id {owner}, not to this user ({owner + 4242})"
    if owner != 0:  # (a directory above owned by root is trusted, as OpenSSH does)
        assert f"{d}, a directory above" in untrusted_dir_reason(str(d / "sub"))


def test_links_are_judged_where_they_lead(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    link = tmp_path / "cache"
    link.symlink_to(shared)
    assert untrusted_dir_reason(str(link)) == f"{shared} is writable by others (mode 0777)"


def _backup(capsys, repo, img, vm="vm"):
    return run_cli(capsys, "backup", img, "--repo", repo, "--vm", vm, "--json")


def test_a_cache_others_can_write_is_not_read_and_the_cli_warns(tmp_path, capsys, monkeypatch):
    """The attack: a snapshot description planted in the cache (its name is listed, its
    content is the attacker's) is what `snapshots` and the next backup's parent would be."""
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
    [cached] = [p for p in root.rglob(SNAPSHOTS_FILE)]
    doc = json.loads(cached.read_text())
    doc["metas"][f"snapshots/{sid}.json"]["vm"] = "planted"
    cached.write_text(json.dumps(doc))
    os.chmod(root, 0o777)  # as a umask of 000 (or another user's hand) leaves it

    code, out, err = run_cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0, err
    assert [s["vm"] for s in json.loads(out)] == ["vm"]  # read from the repository, not the cache
    assert err.splitlines() == [
        f"warning: not using the local cache: {root} is writable by others (mode 0777); make it yours and 0700 "
        "(chmod 700), or set PYVBAK_CACHE_DIR to a directory only you can write (or to '' for no cache)"]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code, out, err = _backup(capsys, repo, str(img))  # works without the cache, writes nothing there
    assert code == 0, err
    assert json.loads(out)["parent"] == sid
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    os.chmod(root, 0o700)  # mended: used again, and the plant is still what it holds
    code, out, err = run_cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0 and err == ""


def test_a_work_dir_others_can_write_is_refused(tmp_path, monkeypatch):
    from pyvbak.hypervisors import default_work_dir

    work = tmp_path / "work"
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(work))
    assert default_work_dir() == str(work) and oct(os.stat(work).st_mode & 0o777) == "0o700"
    os.chmod(work, 0o777)
    with pytest.raises(UsageError, match=rf"^the work dir {work} \(sockets and fleecing files\) is not private: "
                       rf"{work} is writable by others \(mode 0777\); make it yours and 0700"):
        default_work_dir()
    os.chmod(work, 0o700)
    os.chmod(tmp_path, 0o777)  # a parent anyone can write: the work dir can be swapped
    try:
        nested = tmp_path / "new"
        monkeypatch.setenv("PYVBAK_WORK_DIR", str(nested))
        with pytest.raises(UsageError, match="a directory above"):
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


def test_a_default_repository_others_can_write_is_refused(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.delenv("PYVBAK_REPO", raising=False)
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=5)
    code, out, err = run_cli(capsys, "backup", str(img), "--vm", "v")
    assert code != 0 and out == ""
    assert assert_one_error_line(err) == (
        f"pyvbak: error: the default repository {data}/pyvbak/repository is not private: {data}, a directory above "
        f"{data}/pyvbak/repository, is writable by everyone (mode 0777); make it yours and 0700 (chmod 700), "
        "or give --repo REPO")
    assert os.listdir(data) == []  # nothing made in it
    os.chmod(data, 0o700)
    code, out, err = run_cli(capsys, "backup", str(img), "--vm", "v")
    assert code == 0, err
