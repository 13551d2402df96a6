"""Two backups into one repository at once; an exclusive lock blocks backups (exit 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import wait_until
from images import MiB, assert_one_error_line, make_image, same_file
from pyvbak.cli.main import main
from pyvbak.repo.repository import Repository
from repo_faults import FAILPOINT_CHILD


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _env(**extra):
    env = dict(os.environ, **extra)
    env.pop("PYVBAK_REPO", None)
    return env


def _images(tmp_path):
    a = make_image(tmp_path / "a.img", 24 * MiB + 3, [(0, 24 * MiB + 3, "random")], seed=71)
    b = make_image(tmp_path / "b.img", 20 * MiB, [(0, 12 * MiB, "random"), (14 * MiB, 6 * MiB, "text")], seed=72)
    return a, b


def _restore_latest_and_compare(capsys, repo, tmp_path, spec, image):
    out = tmp_path / f"{spec.replace('/', '_')}.out"
    code, _, err = cli(capsys, "restore", spec, out, "--repo", repo)
    assert code == 0, err
    assert same_file(out, image)


def test_two_backups_of_different_vms_at_once(tmp_path, capsys):
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    a, b = _images(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pyvbak", "backup", img, "--repo", repo, "--vm", vm, "--json", "--threads", "1"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for img, vm in ((a, "alpha"), (b, "beta"))
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert json.loads(out)["new_bytes"] > 0
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert sorted(s["vm"] for s in json.loads(out)) == ["alpha", "beta"]
    _restore_latest_and_compare(capsys, repo, tmp_path, "alpha@latest", a)
    _restore_latest_and_compare(capsys, repo, tmp_path, "beta@latest", b)
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_backup_runs_while_another_is_mid_way(tmp_path, capsys):
    """Deterministic overlap: backup A holds its (shared) lock and has written a pack it has
    not indexed yet; backup B runs from start to end meanwhile (and may adopt A's pack);
    then A continues.  Both snapshots restore identical."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    a, b = _images(tmp_path)
    marker, release = tmp_path / "a-paused", tmp_path / "a-release"
    proc = subprocess.Popen(
        [sys.executable, "-c", FAILPOINT_CHILD, "backup", a, "--repo", repo, "--vm", "alpha", "--json", "--threads", "1"],
        env=_env(PYVBAK_TEST_FAILPOINT="pack-1", PYVBAK_TEST_MARKER=str(marker), PYVBAK_TEST_RELEASE=str(release)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60, what="backup A to pause")
        assert marker.exists(), proc.communicate()
        assert len(os.listdir(repo / "locks")) == 1
        code, out, err = cli(capsys, "backup", b, "--repo", repo, "--vm", "beta", "--json")
        assert code == 0, err
        assert Repository.open(str(repo)).snapshots()[0].vm == "beta"
        release.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["vm"] == "alpha"
    assert os.listdir(repo / "locks") == []
    _restore_latest_and_compare(capsys, repo, tmp_path, "alpha@latest", a)
    _restore_latest_and_compare(capsys, repo, tmp_path, "beta@latest", b)
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_exclusive_lock_blocks_backup(tmp_path, capsys):
    repo_dir = tmp_path / "repo"
    cli(capsys, "init", repo_dir)
    img = make_image(tmp_path / "s.img", 1 * MiB, [(0, MiB, "random")], seed=73)
    repo = Repository.open(str(repo_dir))
    with repo.lock(exclusive=True, purpose="prune"):
        code, out, err = cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")
        assert code == 8 and out == ""
        assert_one_error_line(err, "is locked by prune", f"pid {os.getpid()}")
        code, _, err = cli(capsys, "verify", "--repo", repo_dir)
        assert code == 8
        # and in a separate process too
        p = subprocess.run(
            [sys.executable, "-m", "pyvbak", "backup", img, "--repo", repo_dir, "--vm", "v"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 8
        assert_one_error_line(p.stderr, "locked")
        assert len(os.listdir(repo_dir / "locks")) == 1  # only the exclusive lock remains
    assert repo.snapshots() == []
    assert cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")[0] == 0  # released


def test_shared_lock_blocks_exclusive(tmp_path, capsys):
    from pyvbak.errors import LockedError

    repo = Repository.init(str(tmp_path / "repo"))
    with repo.lock(purpose="backup"):
        try:
            with repo.lock(exclusive=True, purpose="prune"):
                raise AssertionError("exclusive lock granted while a backup holds a shared one")
        except LockedError as exc:
            assert exc.exit_code == 8
        with repo.lock(purpose="second backup"):  # shared locks coexist
            assert len(list(repo.backend.list("locks/"))) == 2
    assert list(repo.backend.list("locks/")) == []


def test_a_lock_whose_pid_now_runs_another_process_is_stale(tmp_path, capsys):
    """A lock left by a killed prune whose pid went to a newer Python process (pid reuse)
    must not block backups forever: the lock's boot and start time tell the processes
    apart.  A lock of a live owner still blocks; one from an older pyvbak (no such
    fields), or from another boot of a machine it does not name, is judged by its pid alone;
    one from an earlier boot of this machine is stale."""
    import socket

    from pyvbak.processes import identity

    repo_dir = tmp_path / "repo"
    cli(capsys, "init", repo_dir)
    img = make_image(tmp_path / "s.img", 1 * MiB, [(0, MiB, "random")], seed=74)
    # a live Python process standing in for "whoever got the dead prune's pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = identity()

        def lock(name, **fields):
            info = {"host": socket.gethostname(), "pid": other.pid, "time": 0, "exclusive": True,
                    "purpose": "prune", **fields}
            (repo_dir / "locks").mkdir(exist_ok=True)
            (repo_dir / "locks" / name).write_text(json.dumps(info))

        wait_until(lambda: open(f"/proc/{other.pid}/cmdline", "rb").read().startswith(sys.executable.encode()),
                   what="the child running python")
        from pyvbak.processes import start_time

        lock("a.json", boot=me["boot"], start=start_time(other.pid))  # really that process's
        code, _, err = cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")
        assert code == 8, err
        (repo_dir / "locks" / "a.json").unlink()
        lock("b.json")  # no identity fields: the pid alone, which is alive
        assert cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")[0] == 8
        (repo_dir / "locks" / "b.json").unlink()
        lock("c.json", boot=me["boot"], start=start_time(other.pid) - 1)  # an earlier process
        code, _, err = cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v", "--json")
        assert code == 0, err
        assert os.listdir(repo_dir / "locks") == []
        lock("d.json", boot="another-boot", start=start_time(other.pid))  # another boot, no machine id:
        assert cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")[0] == 8  # pid alone
        (repo_dir / "locks" / "d.json").unlink()
        # an earlier boot of this very machine: no process outlives a reboot, whatever runs
        # under its pid now (`unlock` and every backup remove it; before, only `unlock --all`)
        lock("e.json", boot="another-boot", start=start_time(other.pid), machine=me["machine"], pidns=me["pidns"])
        code, _, err = cli(capsys, "unlock", "--repo", repo_dir)
        assert code == 0 and os.listdir(repo_dir / "locks") == [], err
        lock("d.json", boot="another-boot", start=start_time(other.pid))
        other.kill()
        other.wait()
        code, _, err = cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v", "--json")
        assert code == 0, err
        assert os.listdir(repo_dir / "locks") == []
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("field,value", [("machine", "0123456789abcdef0123456789abcdef"),
                                         ("pidns", "pid:[1]")],
                         ids=["another-machine-same-host-name", "another-pid-namespace"])
def test_a_lock_this_process_cannot_judge_is_never_stale(tmp_path, capsys, field, value):
    """A backup in a container (its own pid namespace) or on another machine with the same
    host name records a pid that means nothing here: prune once judged such a live
    backup's lock stale, deleted it, then the packs the backup was about to reference.
    Such a lock keeps prune away; the message says how to remove it once that is known
    to be safe."""
    import socket

    from pyvbak.processes import identity

    repo_dir = tmp_path / "repo"
    cli(capsys, "init", repo_dir)
    (repo_dir / "locks").mkdir(exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"host": socket.gethostname(), "pid": dead.pid, "time": 0, "exclusive": False,
            "purpose": "backup", **identity()}
    info[field] = value
    (repo_dir / "locks" / "x.json").write_text(json.dumps(info))
    code, _, err = cli(capsys, "prune", "--repo", repo_dir)
    assert code == 8
    assert_one_error_line(err, "locked by backup", "pyvbak unlock --all")
    assert cli(capsys, "unlock", "--repo", repo_dir)[0] == 0
    assert os.listdir(repo_dir / "locks") == ["x.json"]  # plain unlock leaves it
    assert cli(capsys, "unlock", "--all", "--repo", repo_dir)[0] == 0
    assert cli(capsys, "prune", "--repo", repo_dir)[0] == 0


def test_a_damaged_lock_object_keeps_prune_away_but_not_backups(tmp_path, capsys):
    repo_dir = tmp_path / "repo"
    cli(capsys, "init", repo_dir)
    img = make_image(tmp_path / "s.img", 1 * MiB, [(0, MiB, "random")], seed=75)
    (repo_dir / "locks").mkdir(exist_ok=True)
    (repo_dir / "locks" / "bad.json").write_text("[1, 2]")
    assert cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")[0] == 0
    code, _, err = cli(capsys, "prune", "--repo", repo_dir)
    assert code == 8
    assert_one_error_line(err, "unreadable lock object", "pyvbak unlock --all")
    cli(capsys, "unlock", "--all", "--repo", repo_dir)
    assert cli(capsys, "prune", "--repo", repo_dir)[0] == 0


def test_a_backup_whose_lock_was_removed_under_it_commits_nothing(tmp_path, capsys, monkeypatch):
    """The safety net behind lock judgement: a writer checks its lock is still there before
    it commits (a prune may have run in between)."""
    repo_dir = tmp_path / "repo"
    cli(capsys, "init", repo_dir)
    img = make_image(tmp_path / "s.img", 1 * MiB, [(0, MiB, "random")], seed=76)
    real = Repository.load_digest_index

    def remove_locks_then_load(self, *args, **kwargs):
        for name in list(self.backend.list("locks/")):
            self.backend.delete(name)  # what 'pyvbak unlock --all' elsewhere does
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Repository, "load_digest_index", remove_locks_then_load)
        code, _, err = cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")
    assert code == 8
    assert_one_error_line(err, "lock on repository", "was removed while it ran", "nothing was committed")
    assert Repository.open(str(repo_dir)).snapshots() == []
    assert cli(capsys, "backup", img, "--repo", repo_dir, "--vm", "v")[0] == 0
