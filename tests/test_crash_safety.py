"""kill -9 of a running ``pyvbak backup`` at many instants leaves a repository with no half
snapshot that verifies clean; the next backup cleans the leftovers (stale lock, temp
objects, unindexed packs) and every snapshot restores identical.

Two kinds of instants:

* failpoints: the child is the real CLI, with the local backend wrapped so that right after
  (or in the middle of) a chosen write it signals the test and waits to be killed - the
  kill lands exactly there, every run;
* real races: the unmodified ``python -m pyvbak backup`` killed as soon as a condition on
  the repository directory becomes true (lock taken, first pack file created).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import reaped, wait_until
from images import MiB, make_image, same_file
from pyvbak.cli.main import main
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository
from repo_faults import FAILPOINT_CHILD, kill_child_at


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    # ~64 MiB, mostly incompressible: four 16 MiB packs
    return make_image(
        d / "disk.img",
        64 * MiB + 12345,
        [(0, 40 * MiB, "random"), (40 * MiB, 8 * MiB, "text"), (50 * MiB, 14 * MiB + 12345, "random")],
        seed=61,
    )


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def backup_argv(image, repo, vm="crashvm"):
    return ["backup", str(image), "--repo", str(repo), "--vm", vm, "--disk", "disk", "--threads", "2"]


def check_after_kill(capsys, repo, image, tmp_path, *, expect_cleanup: list[str]):
    """The invariants after a kill -9, then heal with the next backup and restore."""
    code, out, err = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0, err
    before = json.loads(out)
    for s in before:  # anything visible is complete and restorable
        assert set(s) >= {"id", "vm", "disk", "time", "size"}
    assert not [
        n for n in os.listdir(os.path.join(repo, "snapshots")) if n.endswith(".json") and n[:-5] not in {s["id"] for s in before}
    ] if os.path.isdir(os.path.join(repo, "snapshots")) else True
    # verify the repository exactly as the crash left it (the CLI's verify would take a
    # lock and so silently remove the stale one the next backup must report)
    report = verify_repository(Repository.open(str(repo)), threads=2).report
    assert report["ok"], report
    assert report["snapshots"] == len(before)

    code, out, err = cli(capsys, *backup_argv(image, repo), "--json")
    assert code == 0, err
    res = json.loads(out)
    cleaned = res["cleaned_leftovers"]
    for want in expect_cleanup:
        assert any(line.startswith(want) for line in cleaned), (want, cleaned)
    # nothing stays behind: no lock, no temp object
    assert os.listdir(os.path.join(repo, "locks")) == []
    assert not [f for _, _, fs in os.walk(repo) for f in fs if f.startswith(".pyvbak-tmp-")]
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0, err
    out_img = tmp_path / "restored.img"
    code, _, err = cli(capsys, "restore", res["id"], out_img, "--repo", repo)
    assert code == 0, err
    assert same_file(out_img, image)
    return before, res


def kill_at_failpoint(tmp_path, image, repo, point):
    assert kill_child_at(tmp_path, point, backup_argv(image, repo)) == -signal.SIGKILL


@pytest.mark.parametrize(
    "point, cleanup",
    [
        ("lock", ["removed stale lock"]),
        ("mid-pack", ["removed stale lock", "removed incomplete object"]),
        ("pack-1", ["removed stale lock", "adopted unindexed pack"]),
        ("pack-2", ["removed stale lock", "adopted unindexed pack"]),
        ("pack-index", ["removed stale lock"]),
        ("snapshot-index", ["removed stale lock"]),
    ],
)
def test_kill9_at_failpoint(tmp_path, image, capsys, point, cleanup):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0
    kill_at_failpoint(tmp_path, image, repo, point)
    # the lock of the dead process is still there, unreleased
    assert len(os.listdir(repo / "locks")) == 1
    before, res = check_after_kill(capsys, repo, image, tmp_path, expect_cleanup=cleanup)
    assert before == []  # no half snapshot became visible
    if point in ("pack-1", "pack-2", "pack-index", "snapshot-index"):
        # the blocks of durable packs were not stored a second time
        assert res["new_bytes"] < 64 * MiB
    if point in ("pack-index", "snapshot-index"):
        assert res["new_bytes"] == 0  # every pack was already indexed


def test_kill9_incremental_keeps_parent(tmp_path, image, capsys):
    """Killed during an incremental backup: the earlier snapshot is untouched."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    code, out, err = cli(capsys, *backup_argv(image, repo), "--json")
    assert code == 0, err
    first = json.loads(out)["id"]
    img2 = tmp_path / "changed.img"
    import shutil

    from images import rewrite_pages

    shutil.copyfile(image, img2)
    rewrite_pages(img2, fraction=0.4, seed=62)
    kill_at_failpoint(tmp_path, img2, repo, "pack-1")
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert [s["id"] for s in json.loads(out)] == [first]
    code, _, err = cli(capsys, "restore", first, tmp_path / "first.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp_path / "first.img", image)
    code, out, err = cli(capsys, *backup_argv(img2, repo), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["parent"] == first
    assert any(c.startswith("adopted unindexed pack") for c in res["cleaned_leftovers"])
    code, _, err = cli(capsys, "restore", "crashvm@latest", tmp_path / "second.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp_path / "second.img", img2)


def _tight_wait(pred, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred() or proc.poll() is not None:
            return
    pytest.fail("timed out waiting for the kill condition")


@pytest.mark.parametrize("condition", ["lock", "pack-file"])
def test_kill9_real_process(tmp_path, image, capsys, condition):
    """The unmodified CLI killed when the repository shows a condition; whenever the kill
    lands (or if the backup finished first) the invariants hold."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    env = dict(os.environ)
    env.pop("PYVBAK_REPO", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvbak", *backup_argv(image, repo)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    packs = repo / "packs"

    def cond():
        if condition == "lock":
            return (repo / "locks").exists() and bool(os.listdir(repo / "locks"))
        return packs.exists() and any(fs for _, _, fs in os.walk(packs))

    with reaped(proc):
        _tight_wait(cond, proc)
        os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=30)
    killed = rc == -signal.SIGKILL
    assert killed or rc == 0, proc
    before, res = check_after_kill(capsys, repo, image, tmp_path, expect_cleanup=[])
    assert len(before) <= 1
    if killed and not before:
        # killed with its lock (or the lock's temp file) in place: the next run cleans it
        assert res["cleaned_leftovers"], res


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_during_commit_exits_10_and_cleans_up(tmp_path, image, capsys, sig):
    """SIGTERM or Ctrl-C (not -9) between the snapshot's index and its metadata: exit 10,
    one error line, the lock and the snapshot's index removed, no snapshot visible; the
    next backup needs no cleanup of locks.  (Ctrl-C once exited 0 silently: typer turns
    it into an exit code that click returns instead of raising.)"""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    marker = tmp_path / "at-snapshot-index"
    env = dict(os.environ, PYVBAK_TEST_FAILPOINT="snapshot-index", PYVBAK_TEST_MARKER=str(marker))
    env.pop("PYVBAK_REPO", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", FAILPOINT_CHILD, *backup_argv(image, repo)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60, what="failpoint snapshot-index")
        assert marker.exists(), proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 10, err
    assert out == ""
    from images import assert_one_error_line

    assert_one_error_line(err, "SIGTERM" if sig == signal.SIGTERM else "interrupted (Ctrl-C)", "no snapshot was left half-written")
    assert os.listdir(repo / "locks") == []
    assert os.listdir(repo / "snapshots") == []  # the index written before the signal went too
    assert Repository.open(str(repo)).snapshots() == []
    code, out, err = cli(capsys, *backup_argv(image, repo), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert not [c for c in res["cleaned_leftovers"] if "lock" in c]
    assert res["new_bytes"] == 0  # the interrupted run's packs were indexed before the commit


@pytest.mark.parametrize("point", ["mid-pack", "pack-2"])
def test_verify_repair_after_a_killed_backup_leaves_nothing_behind(capsys, tmp_path, image, point):
    # verify --repair takes the exclusive lock, which removes a killed backup's stale lock:
    # the evidence 'unlock' and the next backup clean up the killed backup by (its temp
    # objects, its unindexed packs).  So the exclusive lock must do that itself (no writer
    # can be running under it).
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0
    kill_at_failpoint(tmp_path, image, repo, point)
    if point == "mid-pack":
        assert [f for _, _, fs in os.walk(repo) for f in fs if f.startswith(".pyvbak-tmp-")]
    else:
        assert len(Repository.open(str(repo)).unindexed_pack_records()[0])
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 0, err
    assert cli(capsys, "unlock", "--repo", repo)[0] == 0
    assert os.listdir(os.path.join(repo, "locks")) == []
    assert not [f for _, _, fs in os.walk(repo) for f in fs if f.startswith(".pyvbak-tmp-")]
    # adopted (its blocks dedup), as the next backup would have done had it seen the lock
    assert not len(Repository.open(str(repo)).unindexed_pack_records()[0])
    code, out, err = cli(capsys, *backup_argv(image, repo))
    assert code == 0, err
    assert os.listdir(os.path.join(repo, "locks")) == []


def test_prune_after_a_killed_backup_still_reports_what_it_adopted(capsys, tmp_path, image):
    # the exclusive lock adopts a killed backup's packs when it removes its stale lock:
    # prune's report still names them
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0
    kill_at_failpoint(tmp_path, image, repo, "mid-pack")
    code, out, err = cli(capsys, "prune", "--repo", repo, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["temp_objects_removed"] and all(".pyvbak-tmp-" in n for n in rep["temp_objects_removed"])
    assert not [f for _, _, fs in os.walk(repo) for f in fs if f.startswith(".pyvbak-tmp-")]
