"""A hangup (the terminal or ssh session closed) stops a command the way SIGTERM does.

Only SIGTERM used to become ``Interrupted``: a SIGHUP took its default action and the
process died at once, like kill -9 - a restore left its 2 GiB temp file beside the output
and its lock in the repository, a backup its temp packs and lock.  Now a hangup cleans up
and exits 10 with one line; under ``nohup`` (SIGHUP ignored) the command goes on.

Each command runs in a child whose worker threads block, at a point where the command's
temp files and lock exist, until the test has sent its signal (no sleep-and-hope).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_until
from images import MiB, random_bytes, same_file

ROOT = Path(__file__).resolve().parent.parent

# The child: a hook that blocks the first call of a function run in worker threads until
# the file GO exists (after touching MARK), then pyvbak's main().
CHILD = r"""
import importlib, os, sys, time
mod, _, attr = sys.argv[1].partition(":")  # module:attribute or module:Class.attribute
target = importlib.import_module(mod)
*owners, name = attr.split(".")
for o in owners:
    target = getattr(target, o)
real = getattr(target, name)
def blocked(*a, **k):
    open(os.environ["MARK"], "a").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return real(*a, **k)
setattr(target, name, blocked)
from pyvbak.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def run_blocked(tmp_path, hook: str, args: list[str], *, ignore_hup: bool = False) -> subprocess.Popen:
    mark, go = tmp_path / "mark", tmp_path / "go"
    for f in (mark, go):
        if f.exists():
            f.unlink()
    env = dict(os.environ, MARK=str(mark), GO=str(go), PYTHONPATH=str(ROOT))
    pre = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_hup else None
    return subprocess.Popen([sys.executable, "-c", CHILD, hook, *map(str, args)], env=env, preexec_fn=pre,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hang_up(tmp_path, proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        wait_until((tmp_path / "mark").exists, timeout=30, what="the command to reach its blocked step")
        proc.send_signal(signal.SIGHUP)
    finally:
        (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.fixture
def backed_up(tmp_path):
    from pyvbak.cli.main import main

    img = tmp_path / "disk.img"
    img.write_bytes(random_bytes(24 * MiB, seed=5))
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    assert main(["backup", str(img), "--repo", str(repo), "--vm", "v"]) == 0
    return img, repo


def locks(repo: Path) -> list[str]:
    return sorted(os.listdir(repo / "locks"))


def temp_objects(repo: Path) -> list[str]:
    return [str(p) for p in repo.rglob("*") if ".pyvbak-tmp" in p.name]


def test_a_hangup_during_a_restore_cleans_up_and_exits_10(backed_up, tmp_path):
    img, repo = backed_up
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_blocked(tmp_path, "pyvbak.backends.local:LocalBackend.read_range_into",
                       ["restore", "v@latest", out_dir / "r.img", "--repo", repo])
    code, out, err = hang_up(tmp_path, proc)
    assert code == 10, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "SIGHUP" in lines[0] and "no partly restored file" in lines[0], err
    assert os.listdir(out_dir) == [] and locks(repo) == []


def test_a_hangup_during_a_backup_cleans_up_and_exits_10(backed_up, tmp_path):
    from pyvbak.repo.repository import Repository
    from pyvbak.repo.verify import verify_repository

    img, repo = backed_up
    img2 = tmp_path / "other.img"
    img2.write_bytes(random_bytes(16 * MiB, seed=6))
    before = sorted(os.listdir(repo / "snapshots"))
    proc = run_blocked(tmp_path, "pyvbak.native:sha256_blocks", ["backup", img2, "--repo", repo, "--vm", "w"])
    code, out, err = hang_up(tmp_path, proc)
    assert code == 10, err
    assert "SIGHUP" in err and "no snapshot was left half-written" in err
    assert locks(repo) == [] and temp_objects(repo) == []
    assert sorted(os.listdir(repo / "snapshots")) == before
    assert verify_repository(Repository.open(str(repo))).report["ok"]


def test_under_nohup_a_hangup_is_ignored(backed_up, tmp_path):
    img, repo = backed_up
    out = tmp_path / "r.img"
    proc = run_blocked(tmp_path, "pyvbak.backends.local:LocalBackend.read_range_into",
                       ["restore", "v@latest", out, "--repo", repo], ignore_hup=True)
    code, _, err = hang_up(tmp_path, proc)
    assert code == 0, err
    assert same_file(out, img) and locks(repo) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_after_the_backup_is_committed_finishes_it(backed_up, tmp_path, sig):
    """Once every snapshot is committed, a signal has nothing left to stop: the backup
    used to exit 10 with no --json result (a script lost the snapshot id) and a message
    saying the disks were not backed up.  Now it finishes, prints its result, exits 0 and
    says the signal arrived."""
    import json

    from pyvbak.repo.repository import Repository
    from pyvbak.repo.verify import verify_repository

    img, repo = backed_up
    proc = run_blocked(tmp_path, "pyvbak.hypervisors:OpenedDisk.commit",
                       ["backup", img, "--repo", repo, "--vm", "v", "--json"])
    try:
        wait_until((tmp_path / "mark").exists, timeout=30, what="the backup to commit its snapshot")
        proc.send_signal(sig)
    finally:
        (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert Repository.open(str(repo)).resolve("v@latest").id == result["id"]
    assert f"{sig.name} arrived after the work was committed" in err
    assert locks(repo) == [] and temp_objects(repo) == []
    assert verify_repository(Repository.open(str(repo))).report["ok"]


def test_a_signal_after_the_restore_is_in_place_finishes_it(backed_up, tmp_path):
    img, repo = backed_up
    out = tmp_path / "r.img"
    proc = run_blocked(tmp_path, "pyvbak.cli.restore_cmd:_warn_other_copies",
                       ["restore", "v@latest", out, "--repo", repo])
    code, stdout, err = hang_up(tmp_path, proc)
    assert code == 0, err
    assert "restored snapshot" in stdout and "SIGHUP arrived after the work was committed" in err
    assert same_file(out, img) and locks(repo) == []


def test_a_closed_terminal_after_the_commit_is_no_failure(backed_up, tmp_path, monkeypatch):
    """A real hangup closes the terminal: printing the result then fails with EIO, and a
    backup that had committed its snapshot exited 1 ('Input/output error').  Once the
    work is committed, an output that cannot be written is no failure (exit 0); before the
    commit the same error still fails the command."""
    import errno as errno_mod
    import io

    from pyvbak import interrupts
    from pyvbak.cli.main import main
    from pyvbak.repo.repository import Repository

    img, repo = backed_up

    class Gone(io.TextIOBase):
        def write(self, s):
            raise OSError(errno_mod.EIO, "Input/output error")

    before = len(Repository.open(str(repo)).snapshots())
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", Gone())
    assert main(["backup", str(img), "--repo", str(repo), "--vm", "v"]) == 0
    assert len(Repository.open(str(repo)).snapshots()) == before + 1
    assert not interrupts.finishing()  # main() ended the mode
    assert main(["snapshots", "--repo", str(repo)]) == 1  # nothing committed there: a failure


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["as the metadata is written", "after the commit"])
def test_a_signal_as_the_snapshot_is_committed_finishes_the_backup(tmp_path, capsys, monkeypatch, signum, when):
    """A Ctrl-C or SIGTERM between the snapshot's metadata write and the CLI's record of
    it exited 10, "no snapshot", with the snapshot made - and a QEMU disk's session
    merged its dirty bitmap back, so the next backup scanned the whole disk.  The
    commit and its record are now one step to signals:
    the backup completes, prints its result and says the signal came."""
    import json

    from pyvbak.cli.main import main
    from pyvbak.repo import repository

    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(1 * MiB, seed=5))
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    if when == "after the commit":
        orig = repository.Repository.commit_snapshot

        def commit(self, *a, **k):
            orig(self, *a, **k)
            os.kill(os.getpid(), signum)
        monkeypatch.setattr(repository.Repository, "commit_snapshot", commit)
    else:
        from pyvbak.backends.local import LocalBackend

        orig = LocalBackend.write_new

        def write_new(self, name, data):
            created = orig(self, name, data)
            if name.startswith("snapshots/") and name.endswith(".json"):
                os.kill(os.getpid(), signum)  # inside the commit: the handler runs now
            return created
        monkeypatch.setattr(LocalBackend, "write_new", write_new)
    capsys.readouterr()
    code = main(["backup", str(img), "--repo", str(repo), "--vm", "web", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    sid = json.loads(out)["id"]
    assert (repo / "snapshots" / f"{sid}.json").exists()
    assert signal.Signals(signum).name in err and "arrived after the work was committed" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_as_the_console_script_exits_leaves_its_exit_code(signum):
    """main() put back the default handlers before the interpreter's exit: a SIGTERM in
    those ~10 ms killed a backup that had succeeded (exit -15).  The console script's
    main(exiting=True) leaves them ignored instead."""
    # through entry(), the console script itself: main() signalled as it returns
    code = ("import os, signal, sys\n"
            "from pyvbak.cli import main as m\n"
            "real = m.main\n"
            "def main(*a, **k):\n"
            "    code = real(*a, **k)\n"
            f"    os.kill(os.getpid(), {int(signum)})\n"
            "    return code\n"
            "m.main = main\n"
            "sys.argv = ['pyvbak', '--version']\n"
            "from pyvbak.cli.entry import entry\n"
            "entry()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert p.returncode == 0 and "pyvbak" in p.stdout, (p.returncode, p.stderr)


def test_a_library_caller_hears_ctrl_c_only_after_on_commit(tmp_path, monkeypatch):
    """Python's own Ctrl-C handler raised at once, inside the commit: a library caller's
    on_commit was skipped although the snapshot existed.  held()
    puts a noting handler in its place for the step, and raises after it."""
    from pyvbak.backends.local import LocalBackend
    from pyvbak.engine.backup import run_backup
    from pyvbak.repo.repository import Repository
    from pyvbak.sources.file import FileSource

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(1 * MiB, seed=6))
    repo = Repository.init(str(tmp_path / "repo"))
    orig = LocalBackend.write_new

    def write_new(self, name, data):
        created = orig(self, name, data)
        if name.startswith("snapshots/") and name.endswith(".json"):
            os.kill(os.getpid(), signal.SIGINT)
        return created
    monkeypatch.setattr(LocalBackend, "write_new", write_new)
    committed = []
    with pytest.raises(KeyboardInterrupt):
        with repo.lock(purpose="test"), FileSource(str(img)) as src:
            run_backup(repo, src, vm="web", disk="d", on_commit=lambda r: committed.append(r.snapshot_id))
    assert committed and [s.id for s in repo.snapshots()] == committed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_in_another_thread_holds_nothing():
    """held() in a worker thread made the main thread's handler note a Ctrl-C, and the
    worker raise it: outside the main thread it holds nothing."""
    import threading

    from pyvbak import interrupts

    entered, release = threading.Event(), threading.Event()
    raised_in_worker = []

    def worker():
        try:
            with interrupts.held():
                entered.set()
                release.wait(10)
        except BaseException as e:  # noqa: BLE001 - what the test looks for
            raised_in_worker.append(e)

    from pyvbak.cli.main import _sigint  # the CLI's handler, which asks note_if_finishing

    previous = signal.signal(signal.SIGINT, _sigint)
    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(10)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a call: the handler runs before it returns
    finally:
        release.set()
        t.join(10)
        signal.signal(signal.SIGINT, previous)
    assert raised_in_worker == []
