"""Real processes killed during the newer repair and restore paths: ``verify --repair``
adopting packs no index names, and group restores (temp files, then renames)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import reaped, wait_until
from images import MiB, make_image, same_file
from pyvbak.cli.main import main
from repo_faults import kill_child_at


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def leftovers(repo):
    return [f for _, _, fs in os.walk(repo) for f in fs if f.startswith(".pyvbak-tmp-")] + os.listdir(repo / "locks")


def test_verify_repair_killed_while_adopting(capsys, tmp_path):
    image = make_image(tmp_path / "d.img", 6 * MiB, [(0, 6 * MiB, "random")], seed=5)
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0
    assert cli(capsys, "backup", image, "--repo", repo, "--vm", "v", "--disk", "d")[0] == 0
    for n in os.listdir(repo / "index"):  # a pack index lost from storage
        os.unlink(repo / "index" / n)
    assert cli(capsys, "verify", "--repo", repo)[0] != 0
    # killed right after it wrote the adopted packs' index, holding the exclusive lock
    kill_child_at(tmp_path, "pack-index", ["verify", "--repo", repo, "--repair"])
    assert cli(capsys, "unlock", "--repo", repo)[0] == 0
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 0, err
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0, err
    assert leftovers(repo) == []
    code, _, err = cli(capsys, "restore", "v/d@latest", tmp_path / "out.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp_path / "out.img", image)


def _make_group(repo, vm, sids):
    """Mark snapshots as one consistency group (what a QEMU backup of several disks writes)."""
    import json

    disks = []
    metas = []
    for sid in sids:
        p = repo / "snapshots" / f"{sid}.json"
        metas.append((p, json.loads(p.read_text())))
        disks.append(metas[-1][1]["disk"])
    group = {"id": "20260101T000000Z-0000abcd", "time": metas[0][1]["time"], "disks": disks}
    for p, m in metas:
        m["consistency_group"] = group
        p.chmod(0o644)
        p.write_text(json.dumps(m))



def _group_with_old_targets(capsys, tmp_path, size: int, seed: int):
    """A repository holding a two-disk group of VM g (disks d1, d2 of ``size`` random
    bytes), and tmp_path/out holding older d1.img and d2.img: (repo, images, ids, out)."""
    import json

    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0
    imgs, sids = [], []
    for k, disk in enumerate(("d1", "d2")):
        img = make_image(tmp_path / f"{disk}.src", size, [(0, size, "random")], seed=seed + k)
        code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "g", "--disk", disk, "--json")
        assert code == 0, err
        imgs.append(img)
        sids.append(json.loads(out)["id"])
    _make_group(repo, "g", sids)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for disk in ("d1", "d2"):
        (out_dir / f"{disk}.img").write_bytes(b"old " + disk.encode())
    return repo, imgs, sids, out_dir

# the CLI in a child that stops where a restore's renames would begin (every disk written
# to its temp file), until a signal ends it
PAUSED_BEFORE_RENAMES = r"""
import os, sys, time
from pyvbak.repo import restore

def paused(*args, **kwargs):
    with open(os.environ["PYVBAK_TEST_MARKER"], "w"):
        pass
    while True:
        time.sleep(0.01)

restore.commit_restored = paused
from pyvbak.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_group_restore_killed_leaves_targets_untouched_and_temps_cleaned(capsys, tmp_path, monkeypatch, sig):
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    repo, imgs, sids, out_dir = _group_with_old_targets(capsys, tmp_path, 48 * MiB, seed=20)
    for disk in ("d1", "d2"):
        os.chmod(out_dir / f"{disk}.img", 0o640)
    marker = tmp_path / "at-commit"
    env = dict(os.environ, PYVBAK_CACHE_DIR="", PYVBAK_TEST_MARKER=str(marker))
    env.pop("PYVBAK_REPO", None)
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_BEFORE_RENAMES, "restore", "g@latest", f"{out_dir}/",
                             "--repo", str(repo), "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with reaped(proc):
        # both disks are restored into their temp files and wait for the renames (a poll for
        # the second temp file instead let the restore finish first now and then: a CI run)
        wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60, what="the renames")
        assert marker.exists(), proc.communicate()
        assert sorted(n.split(".pyvbak-restore-")[0] for n in os.listdir(out_dir) if ".pyvbak-restore-" in n) == [
            ".d1.img", ".d2.img"]
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
    for disk in ("d1", "d2"):  # not renamed: the group is put in place whole or not at all
        assert (out_dir / f"{disk}.img").read_bytes() == b"old " + disk.encode()
    if sig != signal.SIGKILL:
        assert sorted(os.listdir(out_dir)) == ["d1.img", "d2.img"]
    assert os.listdir(repo / "locks") == [] or sig == signal.SIGKILL
    code, out, err = cli(capsys, "restore", "g@latest", f"{out_dir}/", "--repo", repo, "--force")
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["d1.img", "d2.img"]
    for disk, img in zip(("d1", "d2"), imgs):
        assert same_file(out_dir / f"{disk}.img", img)
        assert os.stat(out_dir / f"{disk}.img").st_mode & 0o777 == 0o640


def test_verify_beside_a_forget_does_not_report_the_forgotten_snapshot_damaged(capsys, tmp_path, monkeypatch):
    """forget takes a shared lock and runs beside verify: a snapshot forgotten between
    verify's listing and its reading of the snapshot's index is gone, not damaged."""
    import json

    from pyvbak.repo.repository import Repository
    from pyvbak.repo.verify import verify_repository

    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0
    img = make_image(tmp_path / "d.img", 2 * MiB, [(0, 2 * MiB, "random")], seed=3)
    sids = []
    for _ in range(2):
        code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--disk", "d", "--json")
        assert code == 0, err
        sids.append(json.loads(out)["id"])
    r = Repository.open(str(repo))
    listed = r.snapshots(cached=False)

    def listing_then_forget(*a, **k):  # the forget lands right after verify's listing
        assert cli(capsys, "forget", sids[0], "--repo", repo)[0] == 0
        return listed

    monkeypatch.setattr(r, "snapshots", listing_then_forget)
    report = verify_repository(r).report
    assert report["ok"], report
    assert report["affected_snapshots"] == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_group_commit_does_not_leave_disks_of_two_instants(capsys, tmp_path, monkeypatch, sig):
    """SIGTERM/Ctrl-C between two renames of a group restore's commit put one disk in
    place and discarded the other: a directory of disks from two instants."""
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    repo, imgs, sids, out_dir = _group_with_old_targets(capsys, tmp_path, 2 * MiB, seed=40)
    real_replace = os.replace
    sent = []

    def replace(src, dst):
        real_replace(src, dst)
        if ".pyvbak-restore-" in str(src) and not sent:
            sent.append(dst)
            os.kill(os.getpid(), sig)  # lands right after the first disk's rename

    monkeypatch.setattr(os, "replace", replace)
    code, out, err = cli(capsys, "restore", "g@latest", f"{out_dir}/", "--repo", repo, "--force")
    assert sent
    new = [same_file(out_dir / f"{d}.img", img) for d, img in zip(("d1", "d2"), imgs)]
    assert new in ([True, True], [False, False]), (code, err)
    assert sorted(os.listdir(out_dir)) == ["d1.img", "d2.img"]
