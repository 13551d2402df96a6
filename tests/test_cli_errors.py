"""Bad input through the CLI: each error is one ``pyvbak: error:`` line on stderr, no
traceback, and the documented exit code (pyvbak/errors.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import require_tool
from images import BS, MiB, assert_one_error_line, pack_files, random_bytes, run_pyvbak, same_file, vm_image, write_at
from pyvbak.cli.main import main
from pyvbak.errors import OutOfSpace
from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository


def cli(capsys, *args):
    """main(argv) in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("PYVBAK_REPO", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    repo = tmp_path / "repo"
    img = vm_image(tmp_path / "disk.img", 3 * MiB + 1000, seed=41)
    return tmp_path, str(repo), img


@pytest.fixture
def backed_up(env, capsys):
    tmp, repo, img = env
    assert cli(capsys, "init", repo)[0] == 0
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0, err
    return tmp, repo, img, json.loads(out)["id"]


def test_missing_image(env, capsys):
    tmp, repo, _ = env
    cli(capsys, "init", repo)
    code, out, err = cli(capsys, "backup", tmp / "nope.img", "--repo", repo, "--vm", "x")
    assert code == 4 and out == ""
    assert_one_error_line(err, "nope.img", "does not exist")
    assert Repository.open(repo).snapshots() == []


def test_directory_as_image(env, capsys):
    tmp, repo, _ = env
    cli(capsys, "init", repo)
    (tmp / "adir").mkdir()
    code, _, err = cli(capsys, "backup", tmp / "adir", "--repo", repo, "--vm", "x")
    assert code == 4
    assert_one_error_line(err, "is a directory")


def test_unreadable_image(env, capsys):
    tmp, repo, img = env
    cli(capsys, "init", repo)
    os.chmod(img, 0)
    try:
        prefix = []
        if os.geteuid() == 0:
            # root reads anything: drop the capabilities that bypass file permissions
            setpriv = require_tool("setpriv", "util-linux")
            prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
        import subprocess

        p = subprocess.run(
            prefix + [sys.executable, "-m", "pyvbak", "backup", img, "--repo", repo, "--vm", "x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.chmod(img, 0o644)
    assert p.returncode == 4, p.stderr
    assert_one_error_line(p.stderr, "not readable", "permission denied")
    assert Repository.open(repo).snapshots() == []
    assert os.listdir(os.path.join(repo, "locks")) == []  # the lock was released


def test_not_a_repository(env, capsys):
    tmp, _, img = env
    (tmp / "empty").mkdir()
    for path in (tmp / "empty", tmp / "absent"):
        for args in (["snapshots", "--repo", path], ["backup", img, "--repo", path, "--vm", "v"], ["verify", "--repo", path]):
            code, out, err = cli(capsys, *args)
            assert code == 3, (args, err)
            assert_one_error_line(err, "is not a pyvbak repository", "pyvbak init")
    assert not (tmp / "absent").exists()  # nothing was created by a failed open
    code, out, err = cli(capsys, "snapshots", "--repo", img)  # a file given as the repository
    assert code == 3
    assert_one_error_line(err, "is a file, not a pyvbak repository", "directory")


def test_newer_repository_version(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    cfg_path = os.path.join(repo, "config")
    doc = json.loads(open(cfg_path).read())
    doc["version"] = 2
    os.chmod(cfg_path, 0o644)
    open(cfg_path, "w").write(json.dumps(doc))
    for args in (["snapshots", "--repo", repo], ["backup", img, "--repo", repo, "--vm", "web"], ["restore", sid, tmp / "o", "--repo", repo]):
        code, _, err = cli(capsys, *args)
        assert code == 3
        assert_one_error_line(err, "format version 2", "upgrade pyvbak")
    assert not (tmp / "o").exists()


def test_unknown_snapshot(backed_up, capsys):
    tmp, repo, _, _ = backed_up
    for spec, rc in (("20000101T000000Z-00000000", 5), ("nosuchvm@latest", 5), ("web/nosuchdisk@latest", 5),
                     ("bad/id!", 2)):  # not found (5), or not a snapshot reference at all (a usage error)
        code, out, err = cli(capsys, "restore", spec, tmp / "out.img", "--repo", repo)
        assert code == rc, (spec, err)
        assert out == ""
        assert_one_error_line(err)
    assert not (tmp / "out.img").exists()
    # a VM's name where an id goes: the @latest form is named
    code, _, err = cli(capsys, "restore", "web", tmp / "out.img", "--repo", repo)
    assert code == 5 and "web is a VM; its newest snapshot is web@latest" in err, err


def test_restore_existing_output_and_force(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    out = tmp / "out.img"
    out.write_bytes(b"precious")
    code, _, err = cli(capsys, "restore", sid, out, "--repo", repo)
    assert code == 7
    assert_one_error_line(err, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    code, stdout, err = cli(capsys, "restore", sid, out, "--repo", repo, "--force")
    assert code == 0, err
    assert f"restored snapshot {sid}" in stdout
    assert same_file(out, img)
    assert [n for n in os.listdir(tmp) if ".pyvbak-restore-" in n] == []


def test_corrupt_snapshot_index(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    # a second, healthy snapshot of another VM
    code, out, _ = cli(capsys, "backup", img, "--repo", repo, "--vm", "db", "--json")
    healthy = json.loads(out)["id"]
    path = os.path.join(repo, fmt.snapshot_index_name(sid))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o644)
    open(path, "wb").write(data)

    code, _, err = cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)
    assert code == 6
    assert_one_error_line(err, "corrupt")
    assert not (tmp / "out.img").exists()

    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    assert code == 6
    report = json.loads(out)
    assert not report["ok"]
    assert [a["id"] for a in report["affected_snapshots"]] == [sid]
    assert_one_error_line(err, "1 damaged snapshot(s)")  # its index: no bad block named

    code, _, err = cli(capsys, "restore", healthy, tmp / "h.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp / "h.img", img)


def test_corrupt_chunk_verify_and_restore(env, capsys):
    tmp, repo, img = env
    cli(capsys, "init", repo)
    code, out, _ = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    s1 = json.loads(out)["id"]
    # a second VM whose disk shares every block but one with the first
    img2 = tmp / "other.img"
    shutil.copyfile(img, img2)
    write_at(img2, 0, random_bytes(BS, 42))
    code, out, _ = cli(capsys, "backup", img2, "--repo", repo, "--vm", "db", "--json")
    s2 = json.loads(out)["id"]
    r = Repository.open(repo)
    # corrupt the block only s2 has (block 0 of img2): s1 must stay clean
    own = bytes(r.load_snapshot_index(r.resolve(s2))[2]["digest"][0])
    idx = r.load_digest_index()
    rec = idx.records[idx.find(own)]
    pack = os.path.join(repo, fmt.pack_name(bytes(rec["pack"]).hex()))
    data = bytearray(open(pack, "rb").read())
    data[int(rec["offset"]) + int(rec["clen"]) // 2] ^= 0xFF
    os.chmod(pack, 0o644)
    open(pack, "wb").write(data)

    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6
    assert f"snapshot {s2}" in err and s1 not in err
    assert_one_error_line(err, "1 bad block", "affecting 1 snapshot")

    code, out, err = cli(capsys, "restore", s2, tmp / "r2.img", "--repo", repo)
    assert code == 6
    assert_one_error_line(err, s2)
    assert not (tmp / "r2.img").exists()
    assert [n for n in os.listdir(tmp) if ".pyvbak-restore-" in n] == []

    # now a block both share: both snapshots are named
    shared = bytes(r.load_snapshot_index(r.resolve(s1))[2]["digest"][-1])
    rec = idx.records[idx.find(shared)]
    pack = os.path.join(repo, fmt.pack_name(bytes(rec["pack"]).hex()))
    data = bytearray(open(pack, "rb").read())
    data[int(rec["offset"]) + 20] ^= 0xFF
    open(pack, "wb").write(data)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    assert code == 6
    report = json.loads(out)
    assert {a["id"] for a in report["affected_snapshots"]} == {s1, s2}
    assert report["problem_count"] == 2


@pytest.mark.parametrize("bad", ["100K", "32K", "32M", "abc", "0"])
def test_invalid_block_size(env, capsys, bad):
    tmp, repo, _ = env
    code, out, err = cli(capsys, "init", repo, "--block-size", bad)
    assert code == 2
    assert_one_error_line(err)
    assert not os.path.exists(os.path.join(repo, "config"))


def test_valid_block_size_and_init_twice(env, capsys):
    tmp, repo, img = env
    code, out, err = cli(capsys, "init", repo, "--block-size", "1M")
    assert code == 0 and "created pyvbak repository" in out
    assert Repository.open(repo).config.block_size == 1 << 20
    code, _, err = cli(capsys, "init", repo)
    assert code == 3
    assert_one_error_line(err, "already holds a pyvbak repository")


def test_repo_from_environment(env, capsys, monkeypatch):
    tmp, repo, img = env
    cli(capsys, "init", repo)
    monkeypatch.setenv("PYVBAK_REPO", repo)
    code, out, err = cli(capsys, "backup", img, "--vm", "envvm", "--json")
    assert code == 0, err
    sid = json.loads(out)["id"]
    code, out, _ = cli(capsys, "snapshots", "--json")
    assert [s["id"] for s in json.loads(out)] == [sid]
    assert not (tmp / "xdg").exists()  # the default repository was not touched
    code, _, err = cli(capsys, "restore", "envvm@latest", tmp / "o.img")
    assert code == 0, err
    assert same_file(tmp / "o.img", img)


def test_init_given_two_repositories_refuses_and_pyvbak_repo_gives_way(env, capsys, monkeypatch):
    """'init A --repo B' made A and said nothing of B."""
    tmp, repo, img = env
    code, _, err = cli(capsys, "init", tmp / "a", "--repo", tmp / "b")
    assert code == 2 and "two repositories" in err and not (tmp / "a").exists() and not (tmp / "b").exists(), err
    monkeypatch.setenv("PYVBAK_REPO", str(tmp / "c"))  # (a profile's): REPO comes first
    assert cli(capsys, "init", tmp / "a")[0] == 0
    assert (tmp / "a" / "config").exists() and not (tmp / "c").exists()


def test_default_repository_created_on_first_use(tmp_path):
    img = vm_image(tmp_path / "d.img", 1 * MiB + 5, seed=43)
    xdg = tmp_path / "xdg"
    default = xdg / "pyvbak" / "repository"
    p = run_pyvbak(["backup", img, "--vm", "first"], env={"XDG_DATA_HOME": str(xdg)})
    assert p.returncode == 0, p.stderr
    assert f"created the default repository at {default}" in p.stderr
    assert (default / "config").exists()
    p = run_pyvbak(["snapshots"], env={"XDG_DATA_HOME": str(xdg)})
    assert p.returncode == 0
    assert f"using the default repository at {default}" in p.stderr
    assert "first" in p.stdout
    # only commands that store something create it: the others say there is none, in
    # one line (verify once created an empty one and reported success)
    other = tmp_path / "other"
    for args in (["restore", "first@latest", tmp_path / "o"], ["verify"], ["snapshots"], ["forget", "first@latest"],
                 ["prune"], ["unlock"]):
        p = run_pyvbak(args, env={"XDG_DATA_HOME": str(other)})
        assert p.returncode == 3, (args, p.stderr)
        line = assert_one_error_line(p.stderr, "no repository given", f"default one ({other / 'pyvbak' / 'repository'}) "
                                     "does not exist yet", "--repo REPO")
        assert "using" not in line
    assert not other.exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    p = run_pyvbak(["snapshots", "--repo", tmp_path / "nothing"])
    assert p.returncode == 3 and p.stdout == ""
    assert_one_error_line(p.stderr, "not a pyvbak repository")
    p = run_pyvbak(["restore"])  # usage error from the parser
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_missing_pack(backed_up, capsys):
    """A pack deleted behind pyvbak's back: verify and restore exit 6, no output left."""
    tmp, repo, img, sid = backed_up
    packs = pack_files(repo)
    assert packs
    # another VM's pack stays (with no pack left at all the storage is taken for unmounted)
    assert cli(capsys, "backup", vm_image(tmp / "other.img", 2 * MiB, seed=44), "--repo", repo, "--vm", "db")[0] == 0
    os.unlink(packs[0])
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6
    assert f"snapshot {sid}" in err and "missing" in err
    code, _, err = cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)
    assert code == 6
    assert_one_error_line(err, sid)
    assert not (tmp / "out.img").exists()
    assert [n for n in os.listdir(tmp) if ".pyvbak-restore-" in n] == []


@pytest.mark.parametrize("how", ["packs moved away", "packs emptied", "only lost+found and a sentinel left"])
def test_a_backup_into_a_repository_whose_packs_are_all_gone_is_refused(backed_up, capsys, how):
    """Its index still names the blocks: a backup deduplicated against them and committed a
    snapshot no restore could read, exit 0.  Refused (exit 6, nothing written) until the
    packs are back or a prune has dropped them from the index; then it stores the blocks
    again.  Flags that leave copies unflagged are no way on: a restore's (what it tried),
    a verify's after a forget (the copies snapshots use)."""
    tmp, repo, img, sid = backed_up
    packs = os.path.join(repo, "packs")
    shutil.move(packs, tmp / "packs.away")
    if how != "packs moved away":
        os.mkdir(packs)
    if how == "only lost+found and a sentinel left":  # what an unmounted mount point may hold
        os.mkdir(os.path.join(packs, "lost+found"))
        open(os.path.join(packs, "lost+found", "#1234"), "w").close()
        open(os.path.join(packs, ".not-mounted"), "w").close()
    left = sorted(os.listdir(packs)) if os.path.exists(packs) else None
    before = sorted(os.listdir(os.path.join(repo, "snapshots")))
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and out == ""
    assert_one_error_line(err, f"none of their pack files in {packs}")
    assert "nothing was backed up" in err and "mount or copy the packs back" in err and "pyvbak verify --repair" in err
    assert sorted(os.listdir(os.path.join(repo, "snapshots"))) == before
    assert (sorted(os.listdir(packs)) if os.path.exists(packs) else None) == left

    # the packs put back: backups go on as before
    if os.path.exists(packs):
        shutil.rmtree(packs)
    shutil.move(tmp / "packs.away", packs)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0

    # truly lost: restore, verify and prune all refuse and write nothing (storage not
    # mounted, as far as they can tell); the user's 'verify --repair' drops the lost packs
    # from the index, and the next backup stores every block again
    other = vm_image(tmp / "other.img", 2 * MiB, seed=43)
    assert cli(capsys, "backup", other, "--repo", repo, "--vm", "db")[0] == 0
    assert cli(capsys, "forget", "db@latest", "--repo", repo)[0] == 0
    shutil.rmtree(packs)
    assert cli(capsys, "restore", sid, tmp / "partial.img", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 6
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "prune", "--repo", repo)
    assert code == 6 and out == "" and "nothing was pruned" in err, err
    assert not os.path.exists(os.path.join(repo, "lost"))  # (no pack at all: no flags, no records dropped)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 6
    assert cli(capsys, "verify", "--repair", "--repo", repo)[0] == 6  # (lost blocks until the next backup)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0, err
    assert json.loads(out)["new_blocks"] > 0
    assert cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_verify_and_restore_flag_nothing_while_the_packs_are_not_mounted(backed_up, capsys, command):
    """Packs/ unmounted: verify and restore flagged every copy as lost, the next backup took
    the flags for leave to store every block again, into the empty mount point, and once
    the storage was mounted back over it that snapshot's blocks were hidden: restore failed.
    Now both say the storage is missing and write nothing; the backup stays refused."""
    tmp, repo, img, sid = backed_up
    packs = os.path.join(repo, "packs")
    shutil.move(packs, tmp / "packs.away")
    os.mkdir(packs)  # the mount point, unmounted
    args = ["verify", "--repo", repo] if command == "verify" else ["restore", sid, tmp / "r.img", "--repo", repo]
    code, out, err = cli(capsys, *args)
    assert code == 6 and out == ""
    assert_one_error_line(err, f"none of their pack files in {packs}", "mount or copy the packs back")
    assert "nothing was" in err and "flagged" in err
    assert not os.path.exists(os.path.join(repo, "lost")) and not (tmp / "r.img").exists()
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 6 and os.listdir(packs) == [], err
    # the nightly job's prune: it dropped every record from the index, and the next
    # backup stored every block again into the mount point
    index_before = sorted(os.listdir(os.path.join(repo, "index")))
    code, out, err = cli(capsys, "forget", "--keep-last", "1", "--prune", "--repo", repo)
    assert code == 6 and "nothing was forgotten or pruned" in err and "mount or copy the packs back" in err, err
    assert sorted(os.listdir(os.path.join(repo, "index"))) == index_before
    assert cli(capsys, "prune", "--repo", repo)[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 6
    assert not os.path.exists(os.path.join(repo, "lost")) and os.listdir(packs) == []
    os.rmdir(packs)  # mounted again
    shutil.move(tmp / "packs.away", packs)
    code, out, err = cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)
    assert code == 0 and same_file(tmp / "out.img", img), err
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_packs_really_lost_with_a_damaged_pack_index_get_advice_that_works(backed_up, capsys):
    """Prune reads every pack index strictly: the advised 'pyvbak prune' failed on a damaged
    one, and the backup went on refusing with the same advice.  The
    way on is 'verify --repair' now, damaged pack index or not."""
    tmp, repo, img, sid = backed_up
    (name,) = os.listdir(os.path.join(repo, "index"))
    with open(os.path.join(repo, "index", name), "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    shutil.rmtree(os.path.join(repo, "packs"))
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "run 'pyvbak verify --repair' to drop them" in err
    cli(capsys, "verify", "--repair", "--repo", repo)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] > 0, err
    assert cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def test_flags_on_every_copy_are_no_leave_to_back_up_while_the_packs_are_gone(backed_up, capsys):
    """Flags covering every copy let a backup go on while packs/ was empty: flags an older
    pyvbak's verify wrote while the storage was not mounted, and that backup stored every
    block into the mount point.  'verify --repair' is the way on."""
    tmp, repo, img, sid = backed_up
    r = Repository.open(repo)
    recs = r.load_digest_index().records
    r.write_flag_marker([(bytes(x["digest"]).ljust(32, b"\0"), bytes(x["pack"]).ljust(32, b"\0"), int(x["offset"]))
                         for x in recs])
    packs = os.path.join(repo, "packs")
    shutil.move(packs, tmp / "packs.away")
    os.mkdir(packs)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "none of their pack files" in err and os.listdir(packs) == [], err
    os.rmdir(packs)
    shutil.move(tmp / "packs.away", packs)
    assert cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


@pytest.mark.parametrize("with_mark", [False, True])
def test_a_pack_the_index_does_not_name_does_not_make_the_storage_present(backed_up, capsys, with_mark):
    """Any object named like a pack counted: one stray pack in the empty mount point (one a
    backup stored there in an earlier unmount, or another repository's) let verify flag
    every copy and the next backup store every block into the mount point again.  With
    the other repository's pack-storage mark, that is said."""
    tmp, repo, img, sid = backed_up
    stranger = tmp / "stranger"
    assert cli(capsys, "init", stranger)[0] == 0
    assert cli(capsys, "backup", vm_image(tmp / "s.img", 2 * MiB, seed=45), "--repo", stranger, "--vm", "s")[0] == 0
    packs = os.path.join(repo, "packs")
    shutil.move(packs, tmp / "packs.away")
    shutil.copytree(stranger / "packs", packs)
    if not with_mark:
        os.unlink(os.path.join(packs, "pack-storage.json"))
    said = "another repository's packs" if with_mark else "none of their pack files"
    for args in (["verify", "--repo", repo], ["restore", sid, tmp / "out.img", "--repo", repo],
                 ["backup", img, "--repo", repo, "--vm", "web"], ["prune", "--repo", repo],
                 ["verify", "--repo", repo, "--repair"] if with_mark else ["forget", "web@latest", "--repo", repo,
                                                                           "--prune"]):
        code, out, err = cli(capsys, *args)
        assert code == 6 and said in err, (args, err)
    assert not os.path.exists(os.path.join(repo, "lost")) and not (tmp / "out.img").exists()
    assert sorted(pack_files(repo)) == sorted(p.replace(str(stranger), repo) for p in pack_files(stranger))
    assert os.path.exists(os.path.join(packs, "pack-storage.json")) is with_mark
    if with_mark:  # (the stranger's mark, untouched)
        assert (stranger / "packs" / "pack-storage.json").read_bytes() == open(os.path.join(packs, "pack-storage.json"), "rb").read()
    shutil.rmtree(packs)
    shutil.move(tmp / "packs.away", packs)
    assert cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def _stray_pack_in_the_mount_point(tmp, repo, capsys):
    """What an older pyvbak left: it stored a pack into the empty mount point while the
    storage was not mounted (the pack the index names), and the storage, mounted back, hid
    it.  Returns the packs/ the storage is mounted at (set aside, as if unmounted)."""
    packs = os.path.join(repo, "packs")
    before = set(pack_files(repo))
    code, out, err = cli(capsys, "backup", vm_image(tmp / "n.img", 2 * MiB, seed=52), "--repo", repo, "--vm", "new",
                         "--json")
    assert code == 0, err
    new = set(pack_files(repo)) - before
    assert new
    shutil.move(packs, tmp / "packs.away")  # unmounted: only that pack in the mount point
    for p in new:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        shutil.copy(os.path.join(tmp / "packs.away", os.path.relpath(p, packs)), p)
    return tmp / "packs.away"


@pytest.mark.parametrize("command", ["backup", "prune", "forget --prune", "verify", "restore"])
def test_a_pack_an_older_pyvbak_left_in_the_mount_point_does_not_make_the_storage_present(backed_up, capsys, command):
    """The index names such a pack, so the packs alone made the storage look present: the
    next backup stored every changed block into the mount point again, and a prune dropped
    the records of every pack not there.  The pack-storage mark is
    not in the mount point: the commands that write refuse, exit 6, and write nothing; the
    ones that only read say so and read what is there."""
    tmp, repo, img, sid = backed_up
    away = _stray_pack_in_the_mount_point(tmp, repo, capsys)
    packs = os.path.join(repo, "packs")
    index_before = sorted(os.listdir(os.path.join(repo, "index")))
    snaps_before = sorted(os.listdir(os.path.join(repo, "snapshots")))
    stray = pack_files(repo)
    args = {"backup": ["backup", img, "--repo", repo, "--vm", "web"], "prune": ["prune", "--repo", repo],
            "forget --prune": ["forget", "new@latest", "--repo", repo, "--prune"],
            "verify": ["verify", "--repo", repo], "restore": ["restore", sid, tmp / "out.img", "--repo", repo]}[command]
    code, out, err = cli(capsys, *args)
    if command in ("verify", "restore"):
        # (reads what is there: web's blocks are not; nothing flagged)
        assert code == 6 and f"the mark {packs}/pack-storage.json is missing" in err, err
    else:
        assert code == 6 and f"the mark {packs}/pack-storage.json is missing" in err, err
        assert "storage its packs are on is not there (not mounted?)" in err and "verify --repair" in err
    assert pack_files(repo) == stray and not os.path.exists(os.path.join(repo, "lost"))
    assert sorted(os.listdir(os.path.join(repo, "index"))) == index_before
    assert sorted(os.listdir(os.path.join(repo, "snapshots"))) == snaps_before
    assert not os.path.exists(os.path.join(packs, "pack-storage.json"))
    shutil.rmtree(packs)  # mounted back
    shutil.move(away, packs)
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    if command == "restore":
        assert same_file(tmp / "out.img", img)


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_verify_of_intact_packs_whose_mark_is_lost_fails_while_backups_refuse(backed_up, capsys, json_out):
    """It exited 0 with a warning while every backup refused: a monitor watching verify's
    exit code saw a healthy repository."""
    tmp, repo, img, sid = backed_up
    os.unlink(os.path.join(repo, "packs", "pack-storage.json"))
    code, out, err = cli(capsys, "verify", "--repo", repo, *(["--json"] if json_out else []))
    assert code == 6 and "every block verify read is intact, but backups refuse" in err, err
    assert "'pyvbak verify --repair'" in err.strip().splitlines()[-1], err
    if json_out:  # (the report agrees with the exit code)
        doc = json.loads(out)
        assert doc["ok"] is False and doc["problem_count"] == 0 and "is missing" in doc["pack_storage_problem"], doc
        assert "every block verify read is intact, but backups refuse" in doc["error"], doc
    assert cli(capsys, "verify", "--repair", "--repo", repo)[0] == 0  # the way it names
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0


def test_repair_marks_a_pack_storage_whose_mark_alone_was_lost(backed_up, capsys):
    """Packs copied to new storage without the mark: the backup refuses; 'verify --repair'
    (the user's word that this packs/ is the storage) checks the packs and marks it, and
    backups go on, deduplicating against those packs."""
    tmp, repo, img, sid = backed_up
    os.unlink(os.path.join(repo, "packs", "pack-storage.json"))
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "pack-storage.json is missing" in err, err
    code, out, err = cli(capsys, "verify", "--repair", "--repo", repo)
    assert code == 0 and "marked " in err and "was missing" in err, err
    assert open(os.path.join(repo, "packs", "pack-storage.json"), "rb").read() == open(
        os.path.join(repo, "pack-storage.json"), "rb").read()
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] == 0, err


@pytest.mark.parametrize("damage", ["damaged", "another repository's"])
def test_a_damaged_or_foreign_pack_storage_mark_is_refused_and_said(backed_up, capsys, damage):
    tmp, repo, img, sid = backed_up
    mark = os.path.join(repo, "packs", "pack-storage.json")
    if damage == "damaged":
        with open(mark, "r+b") as f:
            f.write(b"\xff")
    else:
        doc = json.load(open(mark))
        doc["repository"] = "0" * 32
        with open(mark, "w") as f:
            json.dump(doc, f)
    before = open(mark, "rb").read()
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    said = "is damaged" if damage == "damaged" else "names repository " + "0" * 32
    assert code == 6 and said in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli(capsys, "verify", "--repair", "--repo", repo)
    if damage == "damaged":  # the user's word: marked again
        assert code == 0 and "was damaged" in err, err
        assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    else:  # never replaced: another repository's storage
        assert code == 6 and said in err and open(mark, "rb").read() == before, err


def test_a_repository_made_before_the_mark_is_marked_by_its_next_backup(backed_up, capsys):
    """Repositories made by an older pyvbak have no mark: judged by their packs alone, and
    marked by the first backup that finds the packs there."""
    tmp, repo, img, sid = backed_up
    for name in ("packs/pack-storage.json", "pack-storage.json"):
        os.unlink(os.path.join(repo, name))
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    assert cli(capsys, "prune", "--repo", repo)[0] == 0
    assert not os.path.exists(os.path.join(repo, "pack-storage.json"))
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 0 and "marked" not in err, err
    mark = json.load(open(os.path.join(repo, "packs", "pack-storage.json")))
    assert mark["repository"] == Repository.open(repo).config.repo_id
    assert open(os.path.join(repo, "pack-storage.json"), "rb").read() == open(
        os.path.join(repo, "packs", "pack-storage.json"), "rb").read()


def test_index_and_packs_both_unmounted_refuse_a_backup(backed_up, capsys):
    """With index/ unmounted as well, the index is empty and the packs alone said nothing:
    a backup stored every block into the mount points.  The root
    copy of the mark says packs/ is marked: refused, nothing written."""
    tmp, repo, img, sid = backed_up
    for sub in ("packs", "index"):
        shutil.move(os.path.join(repo, sub), tmp / (sub + ".away"))
        os.mkdir(os.path.join(repo, sub))
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "pack-storage.json is missing" in err, err
    assert os.listdir(os.path.join(repo, "packs")) == [] and os.listdir(os.path.join(repo, "index")) == []
    for sub in ("packs", "index"):
        os.rmdir(os.path.join(repo, sub))
        shutil.move(tmp / (sub + ".away"), os.path.join(repo, sub))
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0


def test_a_repository_with_nothing_stored_is_no_reason_to_take_an_empty_mount_point(env, capsys):
    """Every snapshot forgotten and pruned, then the storage not mounted: the backup took the
    empty mount point for the storage, marked it, and stored its snapshot there - hidden,
    unrestorable, once the storage was mounted back.  Refused; verify --repair
    is the user's word."""
    tmp, repo, img = env
    assert cli(capsys, "init", repo)[0] == 0
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    assert cli(capsys, "forget", "web@latest", "--repo", repo, "--prune")[0] == 0
    packs = os.path.join(repo, "packs")
    shutil.move(packs, tmp / "packs.away")
    os.mkdir(packs)
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "pack-storage.json is missing" in err and os.listdir(packs) == [], err
    assert sorted(os.listdir(os.path.join(repo, "snapshots"))) == []
    code, _, err = cli(capsys, "verify", "--repair", "--repo", repo)
    assert code == 0 and "was missing" in err, err
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0


def test_a_repository_made_before_the_mark_is_not_backed_up_into_while_packs_are_missing(backed_up, capsys):
    """An unmarked repository whose storage is not mounted, with a pack an older pyvbak
    stored into the mount point: the packs check passes (the index names that pack), and
    the backup marked the mount point - after which every check passed at every unmount
    - then, unmarked, still stored into it.  Until the first mark, every pack the index
    names must be there."""
    tmp, repo, img, sid = backed_up
    for name in ("packs/pack-storage.json", "pack-storage.json"):
        os.unlink(os.path.join(repo, name))
    away = _stray_pack_in_the_mount_point(tmp, repo, capsys)
    os.unlink(os.path.join(repo, "pack-storage.json"))  # (that backup marked: an older pyvbak would not)
    os.unlink(os.path.join(away, "pack-storage.json"))
    stray = pack_files(repo)
    code, _, err = cli(capsys, "backup", vm_image(tmp / "n.img", 2 * MiB, seed=52), "--repo", repo, "--vm", "new")
    assert code == 6 and "of the packs the index of repository" in err and "no pack-storage mark" in err, err
    assert pack_files(repo) == stray
    assert not os.path.exists(os.path.join(repo, "packs", "pack-storage.json"))
    assert not os.path.exists(os.path.join(repo, "pack-storage.json"))
    shutil.rmtree(os.path.join(repo, "packs"))  # mounted back
    shutil.move(away, os.path.join(repo, "packs"))
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 0 and "warning" not in err, err
    assert os.path.exists(os.path.join(repo, "packs", "pack-storage.json"))


def test_repair_of_a_missing_mark_checks_everything_or_nothing(backed_up, capsys):
    """verify --repair SNAPSHOT (or --sample) marked packs/ for the whole repository after
    checking a part of it, exit 0."""
    tmp, repo, img, sid = backed_up
    os.unlink(os.path.join(repo, "packs", "pack-storage.json"))
    for scoped in (["web@latest"], ["--sample", "50"]):
        code, _, err = cli(capsys, "verify", "--repair", *scoped, "--repo", repo)
        assert code == 2 and "without SNAPSHOT or --sample" in err, err
        assert not os.path.exists(os.path.join(repo, "packs", "pack-storage.json"))


def test_restore_refuses_before_writing_when_the_mark_is_missing_and_a_pack_with_it(backed_up, capsys):
    """With the mark missing, a restore reads what is there; a snapshot whose packs are not
    all there is refused before anything is written (a block device had its zero runs
    written first), with the storage named, not "run verify"."""
    tmp, repo, img, sid = backed_up
    away = _stray_pack_in_the_mount_point(tmp, repo, capsys)
    out = tmp / "target.img"
    out.write_bytes(b"\xaa" * (4 * MiB))
    before = out.read_bytes()
    code, _, err = cli(capsys, "restore", sid, out, "--repo", repo, "--force")
    assert code == 6 and "pack-storage.json is missing" in err and "not mounted?" in err, err
    assert out.read_bytes() == before
    assert cli(capsys, "restore", "new@latest", tmp / "new.img", "--repo", repo)[0] == 0  # (its pack is there)
    assert same_file(tmp / "new.img", tmp / "n.img")
    # index/ not mounted either: blocks missing from the index, and the same error
    shutil.move(os.path.join(repo, "index"), tmp / "index.away")
    os.mkdir(os.path.join(repo, "index"))
    code, _, err = cli(capsys, "restore", sid, tmp / "o2.img", "--repo", repo)
    assert code == 6 and "pack-storage.json is missing" in err, err
    code, _, err = cli(capsys, "verify", "--repo", repo)
    last = err.strip().splitlines()[-1]
    assert code == 6 and "pack-storage.json is missing" in last and "nothing was flagged" in last, err
    del away


def test_a_mark_that_is_no_file_is_damaged_and_a_lost_root_copy_gets_the_marks_bytes(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    mark = os.path.join(repo, "packs", "pack-storage.json")
    raw = open(mark, "rb").read()
    os.unlink(os.path.join(repo, "pack-storage.json"))  # (a crash between the two writes)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    assert open(os.path.join(repo, "pack-storage.json"), "rb").read() == raw
    os.unlink(mark)
    os.mkdir(mark)
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "is damaged" in err and "not mounted" not in err, err


def _damage(path):
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)


def test_a_damaged_pack_index_beside_a_pack_really_lost_is_no_storage_missing(backed_up, capsys):
    """With only the packs the index names counted, a damaged pack index (its pack there)
    beside another VM's pack really lost made verify, backup and restore say "storage not
    mounted?" and refuse every backup until a repair."""
    tmp, repo, img, sid = backed_up
    web_index = set(os.listdir(os.path.join(repo, "index")))
    web_packs = set(pack_files(repo))
    assert cli(capsys, "backup", vm_image(tmp / "o.img", 2 * MiB, seed=46), "--repo", repo, "--vm", "db")[0] == 0
    (db_index,) = set(os.listdir(os.path.join(repo, "index"))) - web_index
    db_packs = set(pack_files(repo)) - web_packs
    (web_index,) = web_index
    _damage(os.path.join(repo, "index", web_index))
    for p in db_packs:
        os.unlink(p)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0 and "none of their pack files" not in err, err
    code, _, err = cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)
    assert code == 0 and same_file(tmp / "out.img", img), err
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "none of their pack files" not in err, err


@pytest.mark.parametrize("damaged", ["every pack index", "one pack index"])
def test_repair_of_packs_really_lost_says_so_before_it_touches_a_damaged_pack_index(backed_up, capsys, damaged):
    """verify --repair ran its leftover clean-up first: with the packs all gone it removed
    damaged pack indexes "(its packs were re-indexed ...)" with nothing to re-index, and
    with every index damaged it never said the storage looked unmounted.  Now it says so
    first, and removes them as lost with the rest."""
    tmp, repo, img, sid = backed_up
    assert cli(capsys, "backup", vm_image(tmp / "o.img", 2 * MiB, seed=47), "--repo", repo, "--vm", "db")[0] == 0
    names = sorted(os.listdir(os.path.join(repo, "index")))
    for n in names if damaged == "every pack index" else names[:1]:
        _damage(os.path.join(repo, "index", n))
    shutil.rmtree(os.path.join(repo, "packs"))
    code, out, err = cli(capsys, "verify", "--repair", "--repo", repo)
    lines = err.strip().splitlines()
    assert code == 6 and lines[0].startswith("warning: none of the packs the index names is in "), err
    assert f"{repo}/packs (storage not mounted?)" in lines[0]
    assert "re-indexed" not in err and "taken for lost with the others" in err, err
    assert os.listdir(os.path.join(repo, "index")) == [] and os.listdir(os.path.join(repo, "lost"))
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0 and json.loads(out)["new_blocks"] > 0, err
    assert cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def test_a_repair_taking_the_packs_for_lost_covers_every_snapshot_and_adopts_what_is_there(backed_up, capsys):
    """verify --repair SNAPSHOT (or --sample) with the packs all gone dropped every record
    and reported on the chosen snapshot alone: exit 0, "complete", while the others no
    longer restored.  It also left listed packs no index names (a killed backup's)
    unindexed until a second run."""
    tmp, repo, img, sid = backed_up
    web_index = set(os.listdir(os.path.join(repo, "index")))
    web_packs = set(pack_files(repo))
    db = vm_image(tmp / "db.img", 2 * MiB, seed=48)
    assert cli(capsys, "backup", db, "--repo", repo, "--vm", "db")[0] == 0
    for n in set(os.listdir(os.path.join(repo, "index"))) - web_index:  # db's pack: indexed by no one
        os.unlink(os.path.join(repo, "index", n))
    for p in web_packs:  # web's: really lost
        os.unlink(p)
    index_before = sorted(os.listdir(os.path.join(repo, "index")))
    for scoped in (["web@latest"], ["--sample", "50"]):
        code, out, err = cli(capsys, "verify", "--repair", *scoped, "--repo", repo)
        assert code == 2 and "without SNAPSHOT or --sample" in err, err
        assert sorted(os.listdir(os.path.join(repo, "index"))) == index_before
    code, out, err = cli(capsys, "verify", "--repair", "--repo", repo, "--json")
    assert code == 6, err
    repair = json.loads(out)["repair"]
    assert repair["packs_taken_for_lost"] is True and any(ln.startswith("adopted") for ln in repair["adopted"]), out
    assert cli(capsys, "restore", "db@latest", tmp / "db.out", "--repo", repo)[0] == 0
    assert same_file(tmp / "db.out", db)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    assert cli(capsys, "verify", "--repo", repo)[0] in (0, 6)  # (the old web snapshot lost its blocks)
    assert cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def test_a_repair_taking_the_packs_for_lost_indexes_a_killed_backups_pack_in_one_run(backed_up, capsys):
    """Verify looks for packs no index names only when a block is missing from the index;
    with the packs all gone the index names every block, so the first repair left a killed
    backup's pack unindexed."""
    tmp, repo, img, sid = backed_up
    web_index = set(os.listdir(os.path.join(repo, "index")))
    web_packs = set(pack_files(repo))
    code, out, err = cli(capsys, "backup", vm_image(tmp / "k.img", 2 * MiB, seed=50), "--repo", repo, "--vm", "k",
                         "--json")
    assert code == 0, err
    os.unlink(os.path.join(repo, "snapshots", json.loads(out)["id"] + ".json"))  # killed before its commit ...
    for n in set(os.listdir(os.path.join(repo, "index"))) - web_index:  # ... and before its pack index
        os.unlink(os.path.join(repo, "index", n))
    for p in web_packs:
        os.unlink(p)
    code, out, err = cli(capsys, "verify", "--repair", "--repo", repo, "--json")
    assert code == 6, err
    assert any(ln.startswith("adopted") for ln in json.loads(out)["repair"]["adopted"]), out
    r = Repository.open(repo)
    indexed = {fmt.pack_name(bytes(p).ljust(32, b"\0").hex()) for p in r.load_digest_index().records["pack"]}
    assert set(r.pack_object_names()) == indexed and indexed


def test_verify_sends_to_prune_for_unindexed_packs_only_when_prune_can_run(backed_up, capsys):
    """'verify --repair (or prune) indexes them again': prune stops on a damaged pack
    index, so with one the advice is the repair alone."""
    tmp, repo, img, sid = backed_up
    (web_index,) = os.listdir(os.path.join(repo, "index"))
    assert cli(capsys, "backup", vm_image(tmp / "db.img", 2 * MiB, seed=49), "--repo", repo, "--vm", "db")[0] == 0
    for n in set(os.listdir(os.path.join(repo, "index"))) - {web_index}:
        os.unlink(os.path.join(repo, "index", n))
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "(or 'pyvbak prune') indexes" in err, err
    _damage(os.path.join(repo, "index", web_index))
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "'pyvbak verify --repair' indexes" in err and "'pyvbak prune') indexes" not in err, err
    assert cli(capsys, "prune", "--repo", repo)[0] != 0  # (why: it reads every pack index strictly)
    assert cli(capsys, "verify", "--repair", "--repo", repo)[0] == 0
    assert cli(capsys, "restore", "db@latest", tmp / "db.out", "--repo", repo)[0] == 0


def test_a_refused_backup_leaves_a_damaged_pack_index_for_when_the_packs_are_back(backed_up, capsys):
    """Leftover recovery ran first and deleted a damaged pack index whose packs it could not
    see (packs/ unmounted); with every index damaged the check did not apply at all."""
    tmp, repo, img, sid = backed_up
    (name,) = os.listdir(os.path.join(repo, "index"))
    index_path = os.path.join(repo, "index", name)
    with open(index_path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    damaged = open(index_path, "rb").read()
    shutil.move(os.path.join(repo, "packs"), tmp / "packs.away")
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "none of their pack files" in err
    assert open(index_path, "rb").read() == damaged
    shutil.move(tmp / "packs.away", os.path.join(repo, "packs"))
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0  # re-indexes the pack
    assert cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


@pytest.mark.parametrize("vm,disk,needle", [
    ("a/b", "d", "VM name 'a/b' contains '/'"),
    ("", "d", "VM name is empty"),
    ("  ", "d", "VM name is empty"),
    ("web", "", "disk name is empty"),  # given empty, not the default name
    ("web", " ", "disk name is empty"),
    ("web", "x/y", "disk name 'x/y' contains '/'"),
    ("web", "a\tb", "disk name 'a\\tb' contains '\\t'"),
    ("web", "é" * 200, "disk name is longer than 255 bytes"),
])
def test_bad_vm_or_disk_names_are_refused_before_anything_happens(tmp_path, capsys, vm, disk, needle):
    """Names a snapshot reference (VM/DISK@latest) could not name again are refused with one
    line, before the repository is even opened."""
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(70000))
    repo = tmp_path / "no-repo-here"
    capsys.readouterr()
    code = main(["backup", str(img), "--repo", str(repo), "--vm", vm, "--disk", disk])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_error_line(err, needle)
    assert not repo.exists()


@pytest.mark.parametrize("variable,needle", [("PYVBAK_SHA256", "unknown SHA-256 kernel 'md5'"),
                                             ("PYVBAK_KERNEL", "unknown scan kernel 'md5'")])
def test_a_forced_kernel_that_is_unknown_fails_a_backup_with_nothing_to_hash(backed_up, capsys, monkeypatch, variable, needle):
    """A typo in a forced kernel fails every backup: one of a disk unchanged since the last
    hashes nothing, yet a nightly job must not pass on quiet nights and fail on busy ones."""
    tmp, repo, img, first = backed_up
    monkeypatch.setenv(variable, "md5")
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 2 and out == ""
    assert_one_error_line(err, needle, variable)
    assert [s.id for s in Repository.open(repo).snapshots()] == [first]


def test_a_path_holding_a_newline_is_shown_escaped_on_one_line(env, capsys):
    """A newline in a path broke the error line in two, or (as a space) named another path:
    "R x already holds a pyvbak repository: use it (--repo R x)"."""
    tmp = env[0]
    repo = tmp / "R sp ü\nnl"
    assert cli(capsys, "init", repo)[0] == 0
    code, out, err = cli(capsys, "init", repo)
    assert code == 3 and out == ""
    assert_one_error_line(err, f"{tmp}/R sp ü\\nnl already holds a pyvbak repository", f"--repo {tmp}/R sp ü\\nnl")
    code, _, err = cli(capsys, "snapshots", "--repo", tmp / "no\tsuch\x1b[31m")
    assert code == 3 and "\x1b" not in err
    assert_one_error_line(err, "no\\tsuch\\x1b[31m is not a pyvbak repository")


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_threads_beyond_the_bound_are_a_usage_error(tmp_path, capsys, command):
    args = ["backup", str(tmp_path / "d.img"), "--vm", "v"] if command == "backup" else ["restore", "v@latest", str(tmp_path / "o.img")]
    capsys.readouterr()
    code = main(args + ["--repo", str(tmp_path / "r"), "--threads", "1000"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'--threads': 1000 is not in the range 1<=x<=256" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.fixture
def read_only_mount(tmp_path):
    """A tmpfs at tmp_path/ro; call the returned function to remount it read-only."""
    import subprocess

    from conftest import tmpfs_at

    with tmpfs_at(tmp_path / "ro", 32) as mnt:
        yield mnt, lambda: subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


def test_read_only_repository_restores_and_verifies_with_no_lock(tmp_path, capsys, read_only_mount):
    """A backup disk mounted read-only (disaster recovery): restore and verify cannot take
    their shared lock, say so with the way out (--no-lock), and work with it; a backup
    fails with one line and no such hint."""
    mnt, remount_ro = read_only_mount
    repo = str(mnt / "repo")
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(5 * BS + 3, 91))
    assert main(["init", repo]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "v"]) == 0
    remount_ro()
    out = tmp_path / "out.img"
    capsys.readouterr()
    assert main(["restore", "v@latest", str(out), "--repo", repo]) == 3
    assert_one_error_line(capsys.readouterr().err, "read-only file system", "add --no-lock")
    assert not out.exists()
    assert main(["restore", "v@latest", str(out), "--repo", repo, "--no-lock"]) == 0
    assert same_file(out, img)
    capsys.readouterr()
    assert main(["verify", "--repo", repo, "--no-lock", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["backup", str(img), "--repo", repo, "--vm", "v"]) == 3
    err = assert_one_error_line(capsys.readouterr().err, "read-only file system")
    assert "--no-lock" not in err
    # restoring *into* the read-only file system: one line, not a traceback
    assert main(["restore", "v@latest", str(mnt / "back.img"), "--repo", repo, "--no-lock"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"cannot create the restored file in {mnt}", "Read-only file system")


def test_a_backup_out_of_space_keeps_what_it_stored_for_its_retry(tmp_path, capsys, read_only_mount, monkeypatch):
    """A disk that fills during a backup: one error line, the repository valid, and the
    packs stored before it indexed - they used to stay unindexed until a prune (the
    retry finds no stale lock, so nothing adopted them), took the room the retry needed,
    and every retry stored them again."""
    monkeypatch.setattr("pyvbak.engine.backup.PACK_TARGET_BYTES", 1 * MiB)
    mnt, _ = read_only_mount  # a 32 MiB tmpfs
    repo = str(mnt / "repo")
    assert main(["init", repo]) == 0
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(20 * MiB, 93))  # incompressible: 20 MiB of packs
    ballast = mnt / "ballast"
    ballast.write_bytes(bytes(18 * MiB))  # leaves ~14 MiB
    capsys.readouterr()
    assert main(["backup", str(img), "--repo", repo, "--vm", "v"]) == OutOfSpace.exit_code
    err = capsys.readouterr().err
    assert_one_error_line(err, "out of space")
    assert "this backup stored before it failed: they are indexed" in err, err
    kept = Repository.open(repo)
    assert kept.snapshots() == [] and len(kept.pack_index_names()) == 1
    stored_before = sum(1 for _ in kept.pack_object_names())
    assert stored_before >= 8
    ballast.unlink()
    capsys.readouterr()
    assert main(["backup", str(img), "--repo", repo, "--vm", "v", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["new_bytes"] <= 20 * MiB - stored_before * (MiB - BS)  # the kept packs were not stored again
    out = tmp_path / "out.img"
    assert main(["restore", res["id"], str(out), "--repo", repo]) == 0 and same_file(out, img)
    assert main(["verify", "--repo", repo]) == 0


def test_default_repository_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.delenv("PYVBAK_REPO", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(blocker / "data"))
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(BS, 92))
    capsys.readouterr()
    assert main(["backup", str(img), "--vm", "v"]) == 2
    assert_one_error_line(capsys.readouterr().err, "cannot create the default repository at", "give --repo REPO or set PYVBAK_REPO")


def test_an_unexpected_os_error_is_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    from pyvbak.cli import repo_cmds

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied", "/some/where")

    monkeypatch.setattr(repo_cmds, "open_repository", refuse)
    monkeypatch.delenv("PYVBAK_DEBUG", raising=False)
    capsys.readouterr()
    assert main(["snapshots", "--repo", str(tmp_path)]) == 1
    assert_one_error_line(capsys.readouterr().err, "Permission denied: /some/where", "PYVBAK_DEBUG=1")
    monkeypatch.setenv("PYVBAK_DEBUG", "1")
    with pytest.raises(PermissionError):
        main(["snapshots", "--repo", str(tmp_path)])


@pytest.mark.parametrize("damage", [b"garbage{", b'{"vm": "a", "status": "complete"}'])
def test_a_damaged_snapshot_metadata_object_blocks_nothing_but_prune(tmp_path, capsys, monkeypatch, damage):
    """One corrupt metadata object used to stop every command ("run verify" - and verify
    stopped too).  Now: listed as a warning, backups of every disk go on, verify names it
    and how to fix it, prune refuses (its blocks may still be needed), forget by id
    removes it, and then verify and prune pass."""
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")  # read the metadata objects themselves
    repo = str(tmp_path / "repo")
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(3 * BS, 93))
    assert main(["init", repo]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "a"]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "b"]) == 0
    r = Repository.open(repo)
    victim = r.latest("a", "d").id
    meta = os.path.join(repo, fmt.snapshot_meta_name(victim))
    os.chmod(meta, 0o644)
    with open(meta, "wb") as f:
        f.write(damage)
    capsys.readouterr()

    assert main(["backup", str(img), "--repo", repo, "--vm", "b", "--json"]) == 0
    out = capsys.readouterr().out
    assert any("corrupt and were left out" in w and victim in w for w in json.loads(out)["warnings"])
    assert main(["snapshots", "--repo", repo, "--json"]) == 0
    listed = capsys.readouterr()
    assert victim not in {s["id"] for s in json.loads(listed.out)} and len(json.loads(listed.out)) == 2
    assert f"snapshot metadata snapshots/{victim}.json is corrupt" in listed.err
    assert main(["verify", "--repo", repo, "--json"]) == 6
    report = json.loads(capsys.readouterr().out)
    assert [a["id"] for a in report["affected_snapshots"]] == [victim]
    assert f"pyvbak forget {victim}" in report["affected_snapshots"][0]["reason"]
    assert main(["prune", "--repo", repo]) == 6
    assert_one_error_line(capsys.readouterr().err, "prune stopped, nothing deleted", victim)
    assert main(["forget", victim, "--repo", repo]) == 0
    assert not os.path.exists(meta)
    capsys.readouterr()
    assert main(["verify", "--repo", repo]) == 0
    assert main(["prune", "--repo", repo]) == 0


@pytest.mark.parametrize("cache", ["none", "built-before-the-damage"])
def test_a_damaged_pack_index_is_reported_then_rebuilt_from_the_packs(tmp_path, capsys, monkeypatch, cache):
    """Overwritten pack index: restore says the blocks are missing, prune refuses, verify
    reports it (and drops a local cache that would hide it); the next backup re-indexes
    the packs from their own tables of contents and removes the damaged object; then
    everything passes and nothing was stored twice."""
    import pyvbak.repo.digest_index as digest_index

    if cache == "none":
        monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    else:
        monkeypatch.setattr(digest_index, "MERGE_MIN_RECORDS", 0)  # small repositories use it too
    repo = str(tmp_path / "repo")
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(6 * BS + 5, 94))
    assert main(["init", repo]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "a"]) == 0
    if cache != "none":
        assert main(["backup", str(img), "--repo", repo, "--vm", "a"]) == 0  # the cache now holds the index
    (index_name,) = os.listdir(os.path.join(repo, "index"))
    damaged = os.path.join(repo, "index", index_name)
    os.chmod(damaged, 0o644)
    with open(damaged, "wb") as f:
        f.write(b"not a pack index")
    out = tmp_path / "out.img"
    capsys.readouterr()
    if cache == "none":
        assert main(["restore", "a@latest", str(out), "--repo", repo]) == 6
        assert_one_error_line(capsys.readouterr().err, "missing from")
    assert main(["prune", "--repo", repo]) == 6
    assert_one_error_line(capsys.readouterr().err, f"pack index index/{index_name} is corrupt")
    assert main(["verify", "--repo", repo, "--json"]) == 6
    report = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in report["damaged_pack_indexes"]] == [f"index/{index_name}"]

    assert main(["backup", str(img), "--repo", repo, "--vm", "b", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert any(f"removed damaged pack index index/{index_name}" in c for c in res["cleaned_leftovers"])
    assert any(c.startswith("adopted unindexed pack") for c in res["cleaned_leftovers"])
    assert res["new_blocks"] == 0  # found again through the rebuilt index
    assert main(["verify", "--repo", repo]) == 0
    assert main(["restore", "a@latest", str(out), "--repo", repo, "--force"]) == 0
    assert same_file(out, img)
    assert main(["prune", "--repo", repo]) == 0


@pytest.mark.parametrize("edit", [
    lambda d: [],                                        # valid JSON, not an object
    lambda d: dict(d, block_size=None),
    lambda d: dict(d, compression=None),
    lambda d: dict(d, block_size=65537),                 # not a power of two
    lambda d: dict(d, block_size=4096),                  # below what init allows
    lambda d: dict(d, fast_hash_key="abcd"),             # a key of 2 bytes
    lambda d: dict(d, version="1"),
], ids=["list", "bs-null", "compression-null", "bs-odd", "bs-small", "short-key", "version-str"])
def test_a_damaged_config_is_one_line_and_exit_3(backed_up, capsys, edit):
    """config and its copy both damaged (one alone is read from the other:
    test_a_config_lost_or_damaged_alone_is_read_from_its_copy_and_put_back)."""
    tmp, repo, img, sid = backed_up
    cfg_path = os.path.join(repo, "config")
    doc = edit(json.loads(open(cfg_path).read()))
    for name in ("config", "config.copy"):
        os.chmod(os.path.join(repo, name), 0o644)
        open(os.path.join(repo, name), "w").write(json.dumps(doc))
    for args in (["snapshots", "--repo", repo], ["backup", img, "--repo", repo, "--vm", "web"],
                 ["restore", sid, tmp / "o", "--repo", repo]):
        code, _, err = cli(capsys, *args)
        assert code == 3, (args, err)
        assert_one_error_line(err, f"{repo}/config")
    assert not (tmp / "o").exists()


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "bs-odd", "zeroed"])
def test_a_config_lost_or_damaged_alone_is_read_from_its_copy_and_put_back(backed_up, capsys, damage):
    """One small file stood between a user and every snapshot: with config deleted or
    damaged, neither pyvbak nor restore.sh restored anything, and init refused to make it
    again (session 25's audit).  Its copy is read instead, every command says so, and the
    next backup puts config back, byte for byte."""
    tmp, repo, img, sid = backed_up
    cfg_path = os.path.join(repo, "config")
    original = open(cfg_path, "rb").read()
    assert open(os.path.join(repo, "config.copy"), "rb").read() == original
    os.chmod(cfg_path, 0o644)
    if damage == "deleted":
        os.unlink(cfg_path)
    else:
        doc = json.loads(original)
        open(cfg_path, "wb").write({"truncated": original[:40], "garbage": b"garbage{",
                                    "bs-odd": json.dumps(dict(doc, block_size=65537)).encode(),
                                    "zeroed": bytes(len(original))}[damage])
    how = "missing" if damage == "deleted" else "damaged"
    code, out, err = cli(capsys, "restore", sid, tmp / "o", "--repo", repo)
    assert code == 0, err
    assert f"warning: {repo}/config is {how}: read its copy config.copy" in err
    assert same_file(tmp / "o", img)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0 and f"config is {how}" in err
    # restore.sh reads the copy too
    p = subprocess.run(["sh", os.path.join(repo, "restore.sh"), sid, str(tmp / "o2")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "config is missing or damaged: reading its copy config.copy" in p.stderr
    assert same_file(tmp / "o2", img)
    # a backup puts config back (init would refuse: the repository is there)
    assert cli(capsys, "init", repo)[0] == 3
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 0, err
    assert f"config was {how}: put back from its copy config.copy" in err
    assert open(cfg_path, "rb").read() == original
    code, out, err = cli(capsys, "snapshots", "--repo", repo)
    assert code == 0 and "config" not in err


def test_a_repository_without_a_config_copy_gets_one_from_its_next_backup(backed_up, capsys):
    """Repositories made before the copy existed (and an init killed between config and
    its copy) have none: the next backup writes it; a plain verify does not write."""
    tmp, repo, img, sid = backed_up
    copy = os.path.join(repo, "config.copy")
    os.unlink(copy)
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    assert not os.path.exists(copy)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 0 and "wrote config.copy" in err
    assert open(copy, "rb").read() == open(os.path.join(repo, "config"), "rb").read()
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 0 and "config" not in err


@pytest.mark.parametrize("field,value", [("block_size", 0), ("block_size", 3000), ("size", -1)])
def test_snapshot_metadata_with_impossible_values_is_damaged(backed_up, capsys, monkeypatch, field, value):
    """Right types, impossible values (restore used to divide by a block size of 0): the
    snapshot is treated as damaged like any unreadable description."""
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    tmp, repo, img, sid = backed_up
    meta_path = os.path.join(repo, fmt.snapshot_meta_name(sid))
    os.chmod(meta_path, 0o644)
    meta = json.loads(open(meta_path).read())
    open(meta_path, "w").write(json.dumps(dict(meta, **{field: value})))
    code, _, err = cli(capsys, "restore", sid, tmp / "o", "--repo", repo)
    assert code != 0 and "Traceback" not in err
    assert_one_error_line(err, sid)
    assert not (tmp / "o").exists()
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    assert cli(capsys, "prune", "--repo", repo)[0] == 6


def test_prune_reads_metadata_damaged_after_it_was_cached(backed_up, capsys, monkeypatch):
    """The local cache keeps parsed descriptions (the objects are immutable); prune still
    reads every object, so damage done after a listing stops it."""
    tmp, repo, img, sid = backed_up
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp / "cache"))
    assert cli(capsys, "snapshots", "--repo", repo)[0] == 0  # the description is cached now
    meta_path = os.path.join(repo, fmt.snapshot_meta_name(sid))
    os.chmod(meta_path, 0o644)
    open(meta_path, "w").write("not json")
    code, _, err = cli(capsys, "prune", "--repo", repo)
    assert code == 6
    assert_one_error_line(err, "prune stopped, nothing deleted", sid)


def test_verify_sample_out_of_range_even_on_an_empty_repository(env, capsys):
    tmp, repo, _ = env
    assert cli(capsys, "init", repo)[0] == 0
    code, _, err = cli(capsys, "verify", "--repo", repo, "--sample", "500")
    assert code == 2
    assert_one_error_line(err, "--sample 500", "out of range")


def test_init_completes_a_directory_an_interrupted_init_left(env, capsys):
    """An init that died before its config leaves only the helpers (each written whole:
    replaced atomically) and temp objects: not a repository, and no obstacle to the next
    init (which the 'no config' error tells the user to run).  A user's own restore.sh
    is no such helper: it was replaced."""
    from importlib import resources

    tmp, repo, img = env
    os.makedirs(repo)
    for name in ("restore.sh", "README-RESTORE.txt"):
        open(os.path.join(repo, name), "wb").write(resources.files("pyvbak.repo").joinpath(name).read_bytes())
    open(os.path.join(repo, ".pyvbak-tmp-1-0123456789abcdef"), "w").write("partial")
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "x")
    assert code == 3
    assert_one_error_line(err, "no config file", f"pyvbak init {repo}")
    assert cli(capsys, "init", repo)[0] == 0
    assert open(os.path.join(repo, "restore.sh")).read().startswith("#!/bin/sh")
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "x")[0] == 0
    os.makedirs(tmp / "notempty")
    open(tmp / "notempty" / "restore.sh", "w").write("x")
    open(tmp / "notempty" / "data.txt", "w").write("x")
    code, _, err = cli(capsys, "init", tmp / "notempty")
    assert code == 3
    assert_one_error_line(err, "is not empty")
    os.makedirs(tmp / "scripts")
    open(tmp / "scripts" / "restore.sh", "w").write("my own script")  # alone: still the user's
    for where in (tmp / "scripts", f"file://{tmp / 'scripts'}", f"file://{tmp / 'notempty'}"):
        code, _, err = cli(capsys, "init", where)
        assert code == 3, where
        assert_one_error_line(err, "is not empty")
    assert open(tmp / "scripts" / "restore.sh").read() == "my own script"
    assert sorted(os.listdir(tmp / "notempty")) == ["data.txt", "restore.sh"]
    os.makedirs(tmp / "older")  # an older pyvbak's interrupted init: its kit had no revision line
    open(tmp / "older" / "restore.sh", "w").write("#!/bin/sh\n# restore.sh - restore a pyvbak snapshot WITHOUT "
                                                  "pyvbak.\n")
    assert cli(capsys, "init", tmp / "older")[0] == 0


def test_default_repository_created_by_concurrent_first_commands(tmp_path):
    """Several first commands at once: one creates the default repository, the others
    use it (they used to fail with 'is not empty')."""
    import subprocess

    xdg = tmp_path / "xdg"
    imgs = [vm_image(tmp_path / f"d{i}.img", 1 * MiB + i, seed=70 + i) for i in range(4)]
    env = dict(os.environ, XDG_DATA_HOME=str(xdg))
    env.pop("PYVBAK_REPO", None)
    procs = [subprocess.Popen([sys.executable, "-m", "pyvbak", "backup", str(img), "--vm", f"vm{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, img in enumerate(imgs)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(code == 0 for code, _ in results), results
    assert sum("created the default repository" in err for _, err in results) == 1
    repo = Repository.open(str(xdg / "pyvbak" / "repository"))
    assert sorted(s.meta["vm"] for s in repo.snapshots()) == [f"vm{i}" for i in range(4)]


@pytest.mark.parametrize("args,needles", [
    (["frobnicate"], ["No such command 'frobnicate'", "pyvbak --help"]),
    (["backup"], ["Missing argument", "pyvbak backup --help"]),
    (["restore", "x", "y", "--frobnicate"], ["No such option: --frobnicate", "pyvbak restore --help"]),
])
def test_usage_errors_are_one_line_too(capsys, args, needles):
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    assert_one_error_line(err, *needles)


def test_a_fifo_as_the_image_is_refused_not_waited_on(env):
    """Opening a FIFO for reading waits for a writer - while holding the repository lock."""
    import subprocess

    tmp, repo, _ = env
    assert run_pyvbak(["init", repo]).returncode == 0
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    try:
        p = run_pyvbak(["backup", fifo, "--repo", repo, "--vm", "x"], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("pyvbak waited on the FIFO")
    assert p.returncode == 4
    assert_one_error_line(p.stderr, "neither a regular file nor a block device")


def test_a_file_that_shrank_since_it_was_opened_is_an_error_not_zeros(tmp_path):
    """The hole scan once read 'no more data' past the new end as a hole up to the old
    size: the vanished tail was stored as zeros without a word."""
    from pyvbak.engine.backup import run_backup
    from pyvbak.errors import SourceError
    from pyvbak.sources.file import FileSource

    repo = Repository.init(str(tmp_path / "repo"))
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(4 * MiB, 77))
    with repo.lock(), FileSource(str(img)) as src:
        os.truncate(img, 1 * MiB)
        with pytest.raises(SourceError, match="shrank"):
            run_backup(repo, src, vm="v", disk="d", threads=2)
    assert repo.snapshots() == []


def test_out_of_memory_is_one_line(env, capsys, monkeypatch):
    from pyvbak import native

    tmp, repo, img = env
    cli(capsys, "init", repo)

    def no_memory(n):
        raise MemoryError()

    monkeypatch.setattr(native, "new_arrays", no_memory)
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "x")
    assert code == 1
    assert_one_error_line(err, "out of memory", "--block-size")


def test_verify_repair_makes_the_next_backup_store_corrupt_blocks_again(env, capsys):
    """A corrupt frame used to stay in the index: every later backup of unchanged data
    referenced it again (verify said so, nothing changed it).  --repair drops the bad copy
    from the index; the next backup scans fully and stores the block again."""
    tmp, repo, img = env
    assert cli(capsys, "init", repo)[0] == 0
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0, err
    first = json.loads(out)["id"]
    r = Repository.open(repo)
    rec = r.load_digest_index().records[0]
    pack = os.path.join(repo, fmt.pack_name(bytes(rec["pack"]).hex()))
    data = bytearray(open(pack, "rb").read())
    data[int(rec["offset"]) + int(rec["clen"]) // 2] ^= 0xFF
    os.chmod(pack, 0o644)
    open(pack, "wb").write(data)

    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair", "--json")
    assert code == 6
    report = json.loads(out)
    assert report["repair"]["records_removed"] == 1 and report["repair"]["lost_marker"].startswith("lost/")
    assert "_bad_records" not in report
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0, err
    healed = json.loads(out)
    assert healed["parent"] is None and healed["new_blocks"] >= 1
    assert any("lost from the repository" in w for w in healed["warnings"])
    code, _, err = cli(capsys, "verify", healed["id"], "--repo", repo)
    assert code == 0, err
    code, _, err = cli(capsys, "restore", healed["id"], tmp / "out.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp / "out.img", img)
    # blocks are named by content: the copy stored again heals the older snapshot too
    code, _, err = cli(capsys, "verify", first, "--repo", repo)
    assert code == 0, err
    code, _, err = cli(capsys, "restore", first, tmp / "first.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp / "first.img", img)
    code, _, err = cli(capsys, "verify", "--repo", repo, "--repair", "--no-lock")
    assert code == 2
    assert_one_error_line(err, "--repair", "--no-lock")


def test_verify_names_snapshot_indexes_without_metadata(backed_up, capsys):
    """A snapshot whose metadata object vanished left no trace in verify's report."""
    tmp, repo, img, sid = backed_up
    os.unlink(os.path.join(repo, fmt.snapshot_meta_name(sid)))
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    assert json.loads(out)["orphan_snapshot_indexes"] == [fmt.snapshot_index_name(sid)]
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert f"note: {fmt.snapshot_index_name(sid)} has no metadata" in err


def test_one_disk_restored_to_a_directory_path_is_a_usage_error(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    code, _, err = cli(capsys, "restore", "web/disk@latest", f"{tmp}/nodir/", "--repo", repo)
    assert code == 2
    assert_one_error_line(err, "names a directory", "one disk")
    assert not (tmp / "nodir").exists()


def _stopped_by(how: str):
    """A stand-in for a step that a stop request ends: Ctrl-C, or SIGTERM through the
    CLI's own handler."""
    from pyvbak.cli import main as main_mod

    def interrupted(*a, **k):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        main_mod._sigterm(15, None)

    return interrupted


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_restore_speaks_of_the_restore(env, capsys, monkeypatch, how):
    """Every interrupted command said "no snapshot was left half-written", a restore too."""
    import pyvbak.repo.restore as restore_mod

    tmp, repo, img = env
    cli(capsys, "init", repo)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0

    interrupted = _stopped_by(how)
    monkeypatch.setattr(restore_mod, "restore_snapshot", interrupted)
    code, out, err = cli(capsys, "restore", "v@latest", tmp / "o.img", "--repo", repo)
    assert code == 10
    line = assert_one_error_line(err, "SIGTERM" if how == "sigterm" else "Ctrl-C", "no partly restored file was left behind")
    assert "snapshot" not in line
    monkeypatch.setattr("pyvbak.repo.verify.verify_repository", interrupted)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 10 and "run the command again" in assert_one_error_line(err, "stopped cleanly")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_forget_stopped_in_its_prune_says_the_snapshots_are_gone_and_names_prune(env, capsys, monkeypatch, how):
    """'forget --prune' stopped while it pruned said "some of the snapshots may be
    forgotten already: list them before running it again": they all were, and what was
    left to do was the prune, which it did not name."""
    import pyvbak.repo.prune as prune_mod

    tmp, repo, img = env
    cli(capsys, "init", repo)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "w")[0] == 0

    interrupted = _stopped_by(how)
    monkeypatch.setattr(prune_mod, "prune_repository", interrupted)
    code, out, err = cli(capsys, "forget", "v@latest", "--prune", "--repo", repo)
    assert code == 10 and out == ""
    assert_one_error_line(err, "stopped cleanly; the 1 snapshot(s) are forgotten and the prune stopped",
                          "run 'pyvbak prune' to finish it")
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert [s["vm"] for s in json.loads(out)] == ["w"]
    monkeypatch.setattr("pyvbak.repo.verify.verify_repository", interrupted)
    code, out, err = cli(capsys, "verify", "--repo", repo)  # the next command: its own line again
    assert code == 10 and "run the command again" in assert_one_error_line(err, "stopped cleanly")
    code, out, err = cli(capsys, "forget", "w@latest", "--repo", repo)  # forget alone: as before
    assert code == 0
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "w")[0] == 0
    monkeypatch.setattr("pyvbak.repo.prune.keep_last_selection", interrupted)
    for extra in ([], ["--prune"]):  # a dry run said "some of the snapshots may be forgotten already"
        code, out, err = cli(capsys, "forget", "--keep-last", "1", "--dry-run", *extra, "--repo", repo)
        assert code == 10 and "a dry run changes nothing: nothing was forgotten or pruned" in assert_one_error_line(err)
    assert len(json.loads(cli(capsys, "snapshots", "--repo", repo, "--json")[1])) == 1


def test_a_restore_output_may_be_a_file_uri(backed_up, capsys, monkeypatch):
    """OUTPUT as file:///PATH went to ./file:/PATH; --repo and SOURCE read it."""
    from pathlib import Path

    tmp, repo, img, sid = backed_up
    monkeypatch.chdir(tmp)
    out = tmp / "restored disk.img"
    code, _, err = cli(capsys, "restore", sid, Path(out).as_uri(), "--repo", repo)
    assert code == 0, err
    assert out.read_bytes() == open(img, "rb").read() and not (tmp / "file:").exists()
    code, _, err = cli(capsys, "restore", sid, f"file://{tmp}/o.img?x", "--repo", repo)
    assert code == 2 and "restore output" in assert_one_error_line(err, "query or fragment")


def test_a_full_repository_filesystem_gives_advice_that_can_work(env, capsys, monkeypatch):
    """With no space even for a lock, 'free space or prune old snapshots' was circular:
    prune needs a lock too.  Readers are told about --no-lock."""
    from pyvbak.backends import local
    from pyvbak.backends.base import out_of_space

    tmp, repo, img = env
    cli(capsys, "init", repo)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    real = local.LocalBackend.write_new

    def full(self, name, data):
        if name.startswith("locks/"):
            raise out_of_space(name, f"local backend {self.location}", "No space left on device")
        return real(self, name, data)

    monkeypatch.setattr(local.LocalBackend, "write_new", full)
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 9 and "add --no-lock" in assert_one_error_line(err, "no space left", "even for a lock")
    assert cli(capsys, "verify", "--repo", repo, "--no-lock")[0] == 0
    code, _, err = cli(capsys, "prune", "--repo", repo)
    line = assert_one_error_line(err, "no space left", "even for a lock", "free space")
    assert code == 9 and "prune old snapshots" not in line and "--no-lock" not in line


def test_vm_latest_into_a_directory_works_for_a_vm_with_one_disk(backed_up, capsys):
    """VM@latest DIR/ put every disk of a VM with several into DIR but refused a VM with
    one ("is a directory", of a directory that did not exist): scripts had to know."""
    tmp, repo, img, sid = backed_up
    code, out, err = cli(capsys, "restore", "web@latest", f"{tmp}/vmdir/", "--repo", repo, "--json")
    assert code == 0, err
    (report,) = json.loads(out)
    assert report["snapshot"] == sid and report["consistency_group"] is None
    assert same_file(tmp / "vmdir" / "disk.img", img)
    code, out, err = cli(capsys, "restore", "web@latest", f"{tmp}/vmdir/", "--repo", repo)
    assert code == 7 and "--force" in assert_one_error_line(err, "disk.img")
    # the same snapshot by its id, the same way (refused as "is a directory", also where
    # the directory did not exist)
    code, out, err = cli(capsys, "restore", sid, f"{tmp}/by-id/", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp / "by-id" / "disk.img", img)


@pytest.mark.parametrize("via", ["--repo", "PYVBAK_REPO"])
def test_an_empty_repository_path_is_refused_not_the_default(backed_up, capsys, monkeypatch, tmp_path, via):
    """'--repo "$REPO"' with REPO unset backed up into the default repository, created in
    the user's home on the way."""
    tmp, repo, img, sid = backed_up
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    args = ["backup", img, "--vm", "web"] + (["--repo", ""] if via == "--repo" else [])
    if via == "PYVBAK_REPO":
        monkeypatch.setenv("PYVBAK_REPO", "")
    code, out, err = cli(capsys, *args)
    assert code == 2 and "repository path is empty" in assert_one_error_line(err)
    assert not (tmp_path / "data").exists()


def test_verify_finds_packs_no_index_names_and_repair_indexes_them(backed_up, capsys):
    """A pack index lost from storage hid its packs' blocks from every snapshot: verify said
    "missing" with no way out but a prune nothing suggested, and --repair did nothing."""
    tmp, repo, img, sid = backed_up
    for name in os.listdir(os.path.join(repo, "index")):
        os.unlink(os.path.join(repo, "index", name))
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 6 and report["unindexed_packs"]["packs"] >= 1 and report["problem_count"] > 0
    assert all("verify --repair" in p["reason"] for p in report["problems"])
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert "named by no pack index" in err and "verify --repair" in err
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert "repair: adopted unindexed pack" in err
    # the adopted blocks are checked in the same run: nothing is lost, so it says so and
    # exits 0 (it exited 6, "found N bad blocks", after a repair that had fixed them all)
    assert code == 0 and "all good" in err and "repair: complete" in err, err
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0, err
    code, _, err = cli(capsys, "restore", sid, tmp / "back.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp / "back.img", img)


def test_verify_of_damaged_metadata_alone_does_not_speak_of_zero_bad_blocks(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    with open(os.path.join(repo, fmt.snapshot_meta_name(sid)), "w") as f:
        f.write("{garbage")
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6
    line = err.strip().splitlines()[-1]
    assert "1 damaged snapshot(s)" in line and "0 bad block" not in line


def test_advice_for_a_path_that_is_no_repository_is_advice_that_works(env, capsys):
    """'not a pyvbak repository: create one with pyvbak init DIR' for a directory of other
    files sent the user to an init that then failed ("not empty")."""
    tmp, repo, img = env
    data = tmp / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "snapshots", "--repo", data)
    line = assert_one_error_line(err, "is not a pyvbak repository", "check the path")
    assert code == 3 and "pyvbak init" not in line
    assert cli(capsys, "init", repo)[0] == 0
    code, _, err = cli(capsys, "init", repo)
    assert code == 3 and "--repo" in assert_one_error_line(err, "already holds a pyvbak repository")
    code, _, err = cli(capsys, "restore", "vm1@lates", tmp / "o.img", "--repo", repo)
    assert code == 2 and "pyvbak snapshots" in assert_one_error_line(err, "is not a snapshot id or VM[/DISK]@latest")


def test_verify_repair_holds_the_exclusive_lock_from_the_start(backed_up, capsys, monkeypatch):
    """--repair verified under a shared lock and asked for the exclusive one afterwards: a
    backup started meanwhile made it fail after all the work.  Now a running backup is
    refused before the verify starts, and the repair never finds the repository taken."""
    import pyvbak.repo.verify as verify_mod

    tmp, repo, img, sid = backed_up
    started = []
    real = verify_mod.verify_repository

    def spy(*a, **k):
        started.append(True)
        return real(*a, **k)

    monkeypatch.setattr(verify_mod, "verify_repository", spy)
    with Repository.open(str(repo)).lock(purpose="backup"):
        code, _, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 8 and "locked by backup" in err and not started
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair", "--json")
    assert code == 0 and started and json.loads(out)["repair"]["records_removed"] == 0, err


def test_verify_repair_replaces_a_damaged_pack_index(backed_up, capsys):
    """--repair re-indexed the packs of a damaged pack index under the same content-named
    object name, which create-only writes never replaced: it said "adopted" and the
    garbage stayed, every snapshot still failing."""
    tmp, repo, img, sid = backed_up
    (name,) = os.listdir(os.path.join(repo, "index"))
    with open(os.path.join(repo, "index", name), "wb") as f:
        f.write(b"garbage")
    assert cli(capsys, "verify", "--repo", repo)[0] == 6
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert "repair: removed damaged pack index" in err and "repair: adopted unindexed pack" in err
    assert code == 0 and "repair: complete" in err, err
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0, err
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")
    assert code == 0 and json.loads(out)["cleaned_leftovers"] == [] and json.loads(out)["new_bytes"] == 0


def test_a_restore_into_the_repository_is_refused(backed_up, capsys):
    """'restore X REPO/config --force' replaced the repository's config (its id and hash
    key) with a disk image: pyvbak could no longer open it.  Files, and a group
    restore's directory, inside a local repository are refused; nothing is written."""
    tmp, repo, img, sid = backed_up
    config = open(os.path.join(repo, "config"), "rb").read()
    before = sorted(os.listdir(repo))
    for args in (["web@latest", f"{repo}/config", "--force"], ["web@latest", f"{repo}/packs/new.img"],
                 ["web@latest", f"{repo}/"], ["web@latest", f"{repo}/sub/dir/"], ["web@latest", repo, "--force"]):
        code, out, err = cli(capsys, "restore", *args, "--repo", repo)
        assert code == 2, (args, err)
        assert_one_error_line(err, "inside the repository", "restore it elsewhere")
    assert open(os.path.join(repo, "config"), "rb").read() == config
    assert sorted(os.listdir(repo)) == before and not os.path.exists(f"{repo}/sub")
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_a_group_restore_never_writes_outside_its_directory(backed_up, capsys):
    """The disk name of a snapshot's metadata names the file of a group restore: one with
    '/' (an altered repository) wrote outside DIR, with --force over any *.img file."""
    tmp, repo, img, sid = backed_up
    meta_path = os.path.join(repo, fmt.snapshot_meta_name(sid))
    meta = open(meta_path).read()
    victim = tmp / "victim.img"
    victim.write_text("another VM's disk")
    os.chmod(meta_path, 0o644)
    with open(meta_path, "w") as f:
        f.write(meta.replace('"disk": "disk"', f'"disk": "{tmp}/victim"'))
    code, out, err = cli(capsys, "restore", "web@latest", f"{tmp}/out/", "--repo", repo, "--force")
    assert code == 2, err
    assert_one_error_line(err, "cannot name a file in", "restore it alone")
    assert victim.read_text() == "another VM's disk" and not (tmp / "out").exists()
    # such a snapshot (an older pyvbak allowed '/' in disk names) still restores to a file
    assert cli(capsys, "restore", sid, tmp / "alone.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "alone.img", img)


def test_verify_repair_of_a_damaged_pack_index_exits_0(backed_up, capsys):
    """_repair_complete read the pack index name from the wrong word of its report line:
    a fully repaired damaged pack index still exited 6.  (Here the damaged index is
    redundant - another index object lists the same records - so no block is missing and
    the repair leaves nothing behind; when blocks were missing, verify --repair re-indexes
    their packs and says to verify again, exit 6.)"""
    tmp, repo, img, sid = backed_up
    (name,) = [n for n in os.listdir(os.path.join(repo, "index"))]
    path = os.path.join(repo, "index", name)
    shutil.copy(path, os.path.join(repo, "index", "f" * 64))
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(10)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair", "--json")
    rep = json.loads(out)
    assert rep["damaged_pack_indexes"] and rep["repair"]["complete"] is True
    assert code == 0, err
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_a_failed_group_restore_removes_the_directories_it_made(backed_up, capsys, monkeypatch):
    import pyvbak.repo.restore as restore_mod

    tmp, repo, img, sid = backed_up
    (tmp / "keep").mkdir()

    def full(*a, **k):
        raise OutOfSpace("no space left writing the restore")

    monkeypatch.setattr(restore_mod, "restore_snapshot", full)
    code, out, err = cli(capsys, "restore", "web@latest", f"{tmp}/keep/a/b/", "--repo", repo)
    assert code == 9, err
    assert os.listdir(tmp / "keep") == []


def test_latest_refuses_to_be_older_than_a_damaged_newer_snapshot(env, capsys):
    """'VM@latest' took the newest *readable* snapshot: with the newest metadata damaged
    (a recovery machine, no cache) it restored an older disk, exit 0, no word - in
    pyvbak and restore.sh.  Now both refuse and name the damaged object; the older
    snapshot still restores by its id."""
    import subprocess

    tmp, repo, img = env
    cli(capsys, "init", repo)
    first = json.loads(cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")[1])["id"]
    write_at(img, 0, random_bytes(BS, seed=77))
    second = json.loads(cli(capsys, "backup", img, "--repo", repo, "--vm", "web", "--json")[1])["id"]
    meta = os.path.join(repo, fmt.snapshot_meta_name(second))
    os.chmod(meta, 0o644)
    with open(meta, "r+b") as f:
        f.truncate(50)
    cache = tmp / "fresh-cache"
    os.environ["PYVBAK_CACHE_DIR"] = str(cache)  # a recovery machine: no cached metadata
    try:
        for out in (tmp / "o.img", f"{tmp}/dir/"):
            code, _, err = cli(capsys, "restore", "web@latest", out, "--repo", repo)
            assert code == 6, err
            assert_one_error_line(err, fmt.snapshot_meta_name(second), "newer than", first)
        assert not (tmp / "o.img").exists() and not (tmp / "dir").exists()
        code, _, err = cli(capsys, "restore", second, tmp / "o.img", "--repo", repo)
        assert code == 6 and "is damaged" in err  # there, but unreadable: not "not found" (5)
        assert cli(capsys, "restore", first, tmp / "o.img", "--repo", repo)[0] == 0
    finally:
        del os.environ["PYVBAK_CACHE_DIR"]
    p = subprocess.run(["sh", os.path.join(repo, "restore.sh"), "web@latest", str(tmp / "sh.img")],
                       capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert p.returncode != 0 and "may be newer than" in p.stderr and second.split("-")[0] in p.stderr, p.stderr
    assert not (tmp / "sh.img").exists()


def test_snapshot_specs_naming_no_vm_or_disk_and_ambiguous_prefixes_are_usage_errors(backed_up, capsys):
    tmp, repo, img, sid = backed_up
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    for spec in ("@latest", "/disk@latest", "web/@latest"):
        code, _, err = cli(capsys, "restore", spec, tmp / "o.img", "--repo", repo)
        assert code == 2, (spec, err)
        assert_one_error_line(err, "names no")
    code, _, err = cli(capsys, "restore", sid[:2], tmp / "o.img", "--repo", repo)
    assert code == 2 and "ambiguous" in err


def test_a_restore_into_the_repository_through_a_bind_mount_is_refused(backed_up, capsys):
    """The check compared path strings: a bind mount of the repository is another path
    to the same directory, and a restore there planted a fake lock or snapshot (or, with
    --force, replaced a pack).  Directories are compared by identity now, in pyvbak and
    in restore.sh."""
    import subprocess

    tmp, repo, img, sid = backed_up
    bind = tmp / "bind"
    bind.mkdir()
    r = subprocess.run(["mount", "--bind", repo, str(bind)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot bind-mount ({r.stderr.strip()}): needs root"
        pytest.fail(msg) if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip(msg)
    try:
        before = sorted(os.listdir(os.path.join(repo, "locks")))
        code, _, err = cli(capsys, "restore", "web@latest", bind / "locks" / "x.json", "--repo", repo)
        assert code == 2, err
        assert_one_error_line(err, "inside the repository")
        p = subprocess.run(["sh", os.path.join(repo, "restore.sh"), sid, str(bind / "locks" / "y.json")],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "inside the repository" in p.stderr, p.stderr
        assert sorted(os.listdir(os.path.join(repo, "locks"))) == before
    finally:
        subprocess.run(["umount", str(bind)], check=True)


def test_small_operator_errors_are_one_clear_line(backed_up, capsys, tmp_path):
    """An empty OUTPUT wrote its temp file into the parent of the working directory and
    failed with a bare OSError; a path through a file said 'Not a directory (set
    PYVBAK_DEBUG=1 ...)'; memory:// repositories (the tests' backend) were "created" by
    init and gone when it ended; -h was no option."""
    tmp, repo, img, sid = backed_up
    code, _, err = cli(capsys, "restore", sid, "", "--repo", repo)
    assert code == 2 and "restore target is empty" in assert_one_error_line(err)
    code, _, err = cli(capsys, "restore", sid, f"{img}/out.img", "--repo", repo)
    assert code == 2 and "is a file, not a directory" in assert_one_error_line(err)
    for args in (["init", "memory://m"], ["snapshots", "--repo", "memory://m"]):
        code, _, err = cli(capsys, *args)
        assert code == 2 and "in-memory repository" in assert_one_error_line(err)
    code, out, _ = cli(capsys, "restore", "-h")
    assert code == 0 and "Usage: pyvbak restore" in out


def test_init_of_a_file_url_makes_restore_sh_executable(tmp_path, capsys):
    code, _, err = cli(capsys, "init", f"file://{tmp_path}/r")
    assert code == 0, err
    assert os.stat(tmp_path / "r" / "restore.sh").st_mode & 0o111


def test_a_file_url_repository_is_read_as_rfc_8089_says(tmp_path, capsys, monkeypatch):
    """file://localhost/PATH is /PATH on this host; file://NAME names a host: refused.
    Both were taken as relative directories (./localhost/PATH, ./NAME)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "init", f"file://LocalHost{tmp_path}/r")
    assert code == 0, err
    assert os.path.exists(tmp_path / "r" / "config") and not os.path.exists(tmp_path / "LocalHost")
    code, out, err = cli(capsys, "snapshots", "--repo", f"file://localhost{tmp_path}/r", "--json")
    assert code == 0 and json.loads(out) == [], err
    for where, what in (("file://r", "names a host after file://"), ("file://", "has no path"),
                        ("file://server/srv/r", "names a host after file://")):
        code, _, err = cli(capsys, "snapshots", "--repo", where)
        assert code == 2 and assert_one_error_line(err) == (
            f"pyvbak: error: repository location {where!r} {what}: give file:///ABSOLUTE/PATH (three slashes) or a plain path")
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_a_file_url_repository_is_percent_decoded_and_may_have_one_slash(tmp_path, capsys, monkeypatch):
    """file:///a%20b was made as a directory "a%20b", file:///r?x=1 as "r?x=1", and
    file:/PATH (RFC 8089's form without an authority) as ./file:/PATH."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    spaced = tmp_path / "a b" / "r"
    code, _, err = cli(capsys, "init", Path(spaced).as_uri())  # (file:///.../a%20b/r)
    assert code == 0 and "%20" in Path(spaced).as_uri(), err
    assert (spaced / "config").exists() and not (tmp_path / "a%20b").exists()
    code, out, err = cli(capsys, "snapshots", "--repo", f"file:{spaced}".replace(" ", "%20"), "--json")
    assert code == 0 and json.loads(out) == [], err
    for where in (f"file://{tmp_path}/r?x=1", f"file://{tmp_path}/r#frag"):
        code, _, err = cli(capsys, "init", where)
        assert code == 2 and "has a query or fragment" in assert_one_error_line(err)
    code, _, err = cli(capsys, "init", f"file://{tmp_path}/bad%00name")
    assert code == 2 and "NUL" in assert_one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["a b"]  # nothing made for the refused ones, no ./file:
    # a directory literally named so stays a path (read as a URI, it would be a fresh
    # directory under tmp_path: never anything outside it)
    literal = tmp_path / f"file:{tmp_path}" / "lit"
    literal.mkdir(parents=True)
    code, _, err = cli(capsys, "init", f"file:{tmp_path}/lit")
    assert code == 0 and (literal / "config").exists() and not (tmp_path / "lit").exists(), err


def test_a_restore_whose_lock_was_removed_says_so(backed_up, capsys, monkeypatch):
    """After 'pyvbak unlock --all' and a prune under a running restore, the restore failed
    with 'pack ... is missing; run pyvbak verify', as if the repository were damaged."""
    import shutil

    import pyvbak.repo.restore as restore_mod

    tmp, repo, img, sid = backed_up
    real = restore_mod.restore_snapshot

    def meanwhile(r, *a, **k):
        for name in os.listdir(os.path.join(repo, "locks")):  # unlock --all
            os.unlink(os.path.join(repo, "locks", name))
        shutil.rmtree(os.path.join(repo, "packs"))  # and a prune that moved everything
        return real(r, *a, **k)

    monkeypatch.setattr(restore_mod, "restore_snapshot", meanwhile)
    code, _, err = cli(capsys, "restore", sid, tmp / "o.img", "--repo", repo)
    assert code == 6, err
    assert_one_error_line(err, "lock", "was removed while it ran", "a prune may have moved")
    assert not (tmp / "o.img").exists()


def test_verify_repair_with_a_sample_checks_again_the_same_sample(backed_up, capsys, monkeypatch):
    """The re-check after adopting packs drew a new sample: it could miss the blocks the
    first pass found lost and say "repair: complete", exit 0."""
    from pyvbak.repo import verify as verify_mod

    tmp, repo, img, sid = backed_up
    for name in os.listdir(os.path.join(repo, "index")):
        os.unlink(os.path.join(repo, "index", name))
    seeds = []
    real = verify_mod.verify_repository

    def recording(*a, **k):
        seeds.append(k.get("seed"))
        return real(*a, **k)
    monkeypatch.setattr(verify_mod, "verify_repository", recording)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair", "--sample", "50")
    assert len(seeds) == 2 and seeds[0] is not None and seeds[0] == seeds[1], seeds


def test_verify_names_a_pack_under_the_wrong_folder_before_advising_the_repair(backed_up, capsys):
    """A pack moved under another packs/HH/ with its pack index lost: prune named it ("left
    ... alone: a pack of that name belongs at ..."), verify computed the same line and
    dropped it, advising only the repair that gives its blocks up."""
    tmp, repo, img, sid = backed_up
    (pack,) = pack_files(repo)
    for name in os.listdir(os.path.join(repo, "index")):
        os.unlink(os.path.join(repo, "index", name))
    os.makedirs(os.path.join(repo, "packs", "00"), exist_ok=True)
    moved = os.path.join(repo, "packs", "00", os.path.basename(pack))
    os.rename(pack, moved)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    (left,) = json.loads(out)["packs_left_alone"]
    assert code == 6 and os.path.relpath(pack, repo) in left and os.path.relpath(moved, repo) in left
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert f"note: {left}" in err and "first look at the objects under packs/ named above" in err, err
    os.rename(moved, pack)
    assert cli(capsys, "verify", "--repair", "--repo", repo)[0] == 0
    assert cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def test_a_repository_made_before_the_mark_with_a_pack_really_lost_gets_out_with_one_repair(env, capsys):
    """Refused while a pack its index names is absent, and the repair dropped only the
    records snapshots use: those of blocks no snapshot uses (a forget without prune) kept
    naming the lost pack, and every backup stayed refused."""
    tmp, repo, img = env
    assert cli(capsys, "init", repo)[0] == 0
    old = vm_image(tmp / "old.img", 2 * MiB, seed=60)
    assert cli(capsys, "backup", old, "--repo", repo, "--vm", "old")[0] == 0
    assert cli(capsys, "forget", "old@latest", "--repo", repo)[0] == 0  # (its blocks stay indexed)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    for name in ("packs/pack-storage.json", "pack-storage.json"):  # made before the mark
        os.unlink(os.path.join(repo, name))
    r = Repository.open(repo)
    index = r.load_digest_index()
    web_digests = r.data_blocks(r.latest("web", "disk"))[1]
    web_packs = {bytes(p).ljust(32, b"\0").hex() for p in index.records_at(index.locate(web_digests))["pack"]}
    (old_pack,) = [p for p in pack_files(repo) if os.path.basename(p) not in web_packs]
    os.unlink(old_pack)
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 6 and "1 of the packs the index of repository" in err, err
    code, _, err = cli(capsys, "verify", "--repair", "web@latest", "--repo", repo)
    assert code == 2 and "without SNAPSHOT or --sample" in err, err
    code, _, err = cli(capsys, "verify", "--repair", "--repo", repo)
    assert code == 0, err
    code, _, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "web")
    assert code == 0 and os.path.exists(os.path.join(repo, "packs", "pack-storage.json")), err
    assert cli(capsys, "restore", "web@latest", tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def test_several_misplaced_packs_are_put_back_after_one_error(env, capsys):
    """The error named one misplaced pack and its place and said "move them there": a user
    doing what it says needed one verify per pack.  It now states where each belongs."""
    tmp, repo, img = env
    assert cli(capsys, "init", repo)[0] == 0
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    assert cli(capsys, "backup", vm_image(tmp / "db.img", 2 * MiB, seed=62), "--repo", repo, "--vm", "db")[0] == 0
    packs = pack_files(repo)
    assert len(packs) >= 2
    os.makedirs(os.path.join(repo, "packs", "zz"))
    for pack in packs:
        os.rename(pack, os.path.join(repo, "packs", "zz", os.path.basename(pack)))
    code, _, err = cli(capsys, "verify", "--repo", repo)
    rule = re.search(r"each pack belongs at packs/HH/NAME, HH the first two characters of its NAME", err)
    assert code == 6 and "move them there" in err and rule, err
    for name in os.listdir(os.path.join(repo, "packs", "zz")):  # the rule, followed once
        os.rename(os.path.join(repo, "packs", "zz", name), os.path.join(repo, "packs", name[:2], name))
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_a_misplaced_pack_of_a_repository_made_before_the_mark_is_named_not_given_up(env, capsys):
    """A pack moved under another packs/HH/ was taken for lost: the refusal never said where
    it was, and verify --repair dropped its records."""
    tmp, repo, img = env
    assert cli(capsys, "init", repo)[0] == 0
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    assert cli(capsys, "backup", vm_image(tmp / "db.img", 2 * MiB, seed=61), "--repo", repo, "--vm", "db")[0] == 0
    for name in ("packs/pack-storage.json", "pack-storage.json"):  # made before the mark
        os.unlink(os.path.join(repo, name))
    pack = pack_files(repo)[0]
    os.makedirs(os.path.join(repo, "packs", "zz"))
    moved = os.path.join(repo, "packs", "zz", os.path.basename(pack))
    os.rename(pack, moved)
    index_before = sorted(os.listdir(os.path.join(repo, "index")))
    for args in (["backup", img, "--repo", repo, "--vm", "web"], ["verify", "--repair", "--repo", repo]):
        code, _, err = cli(capsys, *args)
        assert code == 6 and f"packs/zz/{os.path.basename(pack)}, which belongs at" in err and "move it there" in err, err
    assert sorted(os.listdir(os.path.join(repo, "index"))) == index_before and not os.path.exists(
        os.path.join(repo, "lost"))
    os.rename(moved, pack)
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "web")[0] == 0
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_a_misplaced_pack_is_named_and_nothing_is_given_up(backed_up, capsys):
    """A pack moved under another packs/HH/ read as missing: verify flagged its copies,
    'verify --repair' dropped its records, the next backups stored its blocks again - and
    nothing said where it was."""
    tmp, repo, img, sid = backed_up
    assert cli(capsys, "backup", vm_image(tmp / "db.img", 2 * MiB, seed=62), "--repo", repo, "--vm", "db")[0] == 0
    r = Repository.open(repo)
    index = r.load_digest_index()
    web = {bytes(p).ljust(32, b"\0").hex() for p in index.records_at(index.locate(r.data_blocks(r.resolve(sid))[1]))["pack"]}
    (pack,) = [p for p in pack_files(repo) if os.path.basename(p) in web]
    os.makedirs(os.path.join(repo, "packs", "zz"))
    moved = os.path.join(repo, "packs", "zz", os.path.basename(pack))
    os.rename(pack, moved)
    index_before = sorted(os.listdir(os.path.join(repo, "index")))
    for args in (["verify", "--repo", repo], ["verify", "--repair", "--repo", repo],
                 ["restore", sid, tmp / "out.img", "--repo", repo], ["prune", "--repo", repo],
                 ["forget", "db@latest", "--repo", repo, "--prune"]):
        code, _, err = cli(capsys, *args)
        assert code == 6 and f"packs/zz/{os.path.basename(pack)}, which belongs at" in err, (args, err)
    assert sorted(os.listdir(os.path.join(repo, "index"))) == index_before
    assert not os.path.exists(os.path.join(repo, "lost")) and not (tmp / "out.img").exists()
    os.rename(moved, pack)
    assert cli(capsys, "verify", "--repo", repo)[0] == 0
    assert cli(capsys, "restore", sid, tmp / "out.img", "--repo", repo)[0] == 0
    assert same_file(tmp / "out.img", img)


def test_a_file_under_a_lost_packs_name_elsewhere_is_no_misplaced_pack(backed_up, capsys):
    """The name alone made junk "the misplaced pack": moved where told, it took the pack's
    place.  Only an object whose table of contents hashes to the name counts."""
    tmp, repo, img, sid = backed_up
    assert cli(capsys, "backup", vm_image(tmp / "db.img", 2 * MiB, seed=63), "--repo", repo, "--vm", "db")[0] == 0
    pack = pack_files(repo)[0]
    os.unlink(pack)
    os.makedirs(os.path.join(repo, "packs", "zz"))
    with open(os.path.join(repo, "packs", "zz", os.path.basename(pack)), "wb") as f:
        f.write(os.urandom(1024))
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "belongs at" not in err.splitlines()[-1] and "is missing" in err, err


@pytest.mark.parametrize("below", ["sub", "a/b/c"])
def test_init_under_a_file_says_which_is_not_a_directory(env, capsys, below):
    """'init afile/sub' said "error writing .../afile/sub/restore.sh (object 'restore.sh' in
    local backend ...) ... an object exists where a directory is needed" (session 25's
    audit); 'init afile' already said afile is not a directory."""
    tmp = env[0]
    (tmp / "afile").write_text("x")
    code, out, err = cli(capsys, "init", tmp / "afile" / below)
    assert code == 3 and out == ""
    assert_one_error_line(err, f"{tmp}/afile is not a directory", "choose another repository path")
    assert (tmp / "afile").read_text() == "x"


def test_an_empty_source_a_socket_and_a_format_given_by_option_get_their_own_lines(tmp_path, capsys):
    """Session 26's audit: an empty SOURCE was "disk image  does not exist" (exit 4), a
    socket the bare "No such device or address", and --format vmdk on a qcow2 named .img
    was said to be what "its name says"."""
    import socket
    import subprocess

    from conftest import run_cli

    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    code, _, err = run_cli(capsys, "backup", "", "--repo", repo, "--vm", "v")
    assert code == 2 and "SOURCE is empty" in assert_one_error_line(err), err
    sock_path = tmp_path / "a.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        code, _, err = run_cli(capsys, "backup", str(sock_path), "--repo", repo, "--vm", "v")
    assert code == 4 and "is neither a regular file nor a block device" in assert_one_error_line(err), err
    img = tmp_path / "q.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    code, _, err = run_cli(capsys, "backup", str(img), "--repo", repo, "--vm", "v", "--format", "vmdk")
    assert code == 4 and "is not a vmdk image, as --format says" in assert_one_error_line(err), err
