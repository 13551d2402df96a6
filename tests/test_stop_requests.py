"""A stop request (SIGTERM, SIGHUP, Ctrl-C) at an instant where it used to be swallowed or
to leave something behind.

``Interrupted`` (SIGTERM/SIGHUP) was a PyvbakError, so an ``Exception``: every ``except
Exception`` (an optimisation's fallback, a hint) or ``except PyvbakError`` (a warning, a
snapshot reported unreadable) on its way caught it, and the command went on - exit 0, or
verify's "damaged" (exit 6).  Ctrl-C (KeyboardInterrupt) was right all along; SIGTERM now
is no Exception either.  Each case runs the CLI in a child whose patched function sends the
signal to its own process at that instant (the handler runs there, as for a real one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from images import MiB, make_image
from pyvbak.errors import Interrupted, PyvbakError

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, signal, sys
SIG = int(os.environ["STOP_SIGNAL"])
fired = []
def stop_here():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), SIG)
PATCH
from pyvbak.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_stopped(tmp_path, patch: str, argv: list, sig=signal.SIGTERM, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), STOP_SIGNAL=str(int(sig)), PYVBAK_CACHE_DIR=str(tmp_path / "cache"),
               **env_extra)
    env.pop("PYVBAK_REPO", None)
    return subprocess.run([sys.executable, "-c", CHILD.replace("PATCH", patch), *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)


def pyvbak(*argv) -> None:
    subprocess.run([sys.executable, "-m", "pyvbak", *map(str, argv)], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture
def repo_and_image(tmp_path):
    repo = tmp_path / "repo"
    pyvbak("init", repo)
    img = make_image(tmp_path / "vm.img", 4 * MiB, [(0, 2 * MiB, "random")], seed=5)
    return repo, img


@pytest.fixture
def backed_up(tmp_path, repo_and_image):
    """A repository with one snapshot of the image (v@latest), and an empty directory."""
    repo, img = repo_and_image
    pyvbak("backup", img, "--repo", repo, "--vm", "v")
    out = tmp_path / "out"
    out.mkdir()
    return repo, out


def snapshots(repo: Path) -> list[str]:
    d = repo / "snapshots"
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".json")) if d.exists() else []


def test_a_stop_request_is_no_exception():
    assert issubclass(Interrupted, BaseException) and not issubclass(Interrupted, Exception)
    assert not issubclass(Interrupted, PyvbakError) and Interrupted("x\ny").exit_code == 10
    assert str(Interrupted("x\ny")) == "x\\ny"  # one line (errors.one_line)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_during_the_allocation_map_query_a_backup_stops(tmp_path, repo_and_image, sig):
    """`_zero_extent_blocks` falls back to reading everything when the map fails: it took
    the stop request for such a failure, and the snapshot was made (exit 0)."""
    repo, img = repo_and_image
    patch = ("from pyvbak.sources.file import FileSource\n"
             "real = FileSource.extents\n"
             "def extents(self, *a, **k):\n    stop_here()\n    return real(self, *a, **k)\n"
             "FileSource.extents = extents\n")
    p = run_stopped(tmp_path, patch, ["backup", img, "--repo", repo, "--vm", "v"], sig)
    assert p.returncode == 10 and "interrupted by SIG" in p.stderr, p.stderr
    assert snapshots(repo) == [] and os.listdir(repo / "locks") == []


def test_while_verify_reads_a_snapshot_index_it_stops_and_reports_no_damage(tmp_path, repo_and_image):
    repo, img = repo_and_image
    pyvbak("backup", img, "--repo", repo, "--vm", "v")
    patch = ("from pyvbak.repo.repository import Repository\n"
             "real = Repository.snapshot_digests\n"
             "def snapshot_digests(self, snap):\n    stop_here()\n    return real(self, snap)\n"
             "Repository.snapshot_digests = snapshot_digests\n")
    p = run_stopped(tmp_path, patch, ["verify", "--repo", repo])
    assert p.returncode == 10 and "damaged" not in p.stderr, (p.returncode, p.stderr)


def test_a_restore_stopped_in_a_prefetch_hint_puts_nothing_in_place(tmp_path, backed_up):
    repo, out = backed_up
    # inside the hint, where its `except Exception` was
    patch = ("from pyvbak.backends.local import LocalBackend\n"
             "real = LocalBackend._path\n"
             "def _path(self, name):\n"
             "    if sys._getframe(1).f_code.co_name == 'prefetch':\n        stop_here()\n"
             "    return real(self, name)\n"
             "LocalBackend._path = _path\n")
    p = run_stopped(tmp_path, patch, ["restore", "v@latest", out / "disk.img", "--repo", repo])
    assert p.returncode == 10 and os.listdir(out) == [], (p.returncode, p.stderr, os.listdir(out))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_right_after_the_repository_lock_is_written_removes_it(tmp_path, repo_and_image, sig):
    """A `with` whose __enter__ raises never calls __exit__: the lock stayed, and another
    host cannot judge it stale."""
    repo, img = repo_and_image
    patch = ("from pyvbak.repo.locks import RepositoryLock\n"
             "real = RepositoryLock._conflict\n"
             "calls = []\n"
             "def _conflict(self, locks):\n"
             "    calls.append(1)\n"
             "    if len(calls) == 2:  # the check after the lock object was written\n"
             "        stop_here()\n"
             "    return real(self, locks)\n"
             "RepositoryLock._conflict = _conflict\n")
    p = run_stopped(tmp_path, patch, ["backup", img, "--repo", repo, "--vm", "v"], sig)
    assert p.returncode == 10, p.stderr
    assert os.listdir(repo / "locks") == [] and snapshots(repo) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_as_the_restore_file_is_created_leaves_no_temp_file(tmp_path, backed_up, sig):
    repo, out = backed_up
    patch = ("import os as _os\n"
             "from pyvbak.repo import restore\n"
             "real_open = _os.open\n"
             "class _Os:\n"
             "    def __getattr__(self, name):\n        return getattr(_os, name)\n"
             "    def open(self, path, flags, *a):\n"
             "        fd = real_open(path, flags, *a)\n"
             "        if '.pyvbak-restore-' in str(path):\n            stop_here()\n"
             "        return fd\n"
             "restore.os = _Os()\n")
    p = run_stopped(tmp_path, patch, ["restore", "v@latest", out / "disk.img", "--repo", repo], sig)
    assert p.returncode == 10 and os.listdir(out) == [], (p.returncode, p.stderr, os.listdir(out))
    assert os.listdir(repo / "locks") == []


def test_a_stop_request_python_drops_in_a_finalizer_is_at_least_reported(tmp_path, repo_and_image):
    """Python drops an exception a signal handler raises inside a finalizer ("Exception
    ignored": every subprocess.run ends by collecting its Popen): the command runs to its
    end.  It says so instead of nothing."""
    repo, img = repo_and_image
    patch = ("from pyvbak.sources.file import FileSource\n"
             "class Dropped:\n    def __del__(self):\n        stop_here()\n"
             "real = FileSource.extents\n"
             "def extents(self, *a, **k):\n    Dropped()  # collected at once: its __del__ runs here\n"
             "    return real(self, *a, **k)\n"
             "FileSource.extents = extents\n")
    p = run_stopped(tmp_path, patch, ["backup", img, "--repo", repo, "--vm", "v"])
    assert p.returncode == 0 and len(snapshots(repo)) == 1, p.stderr
    assert "pyvbak: note: SIGTERM arrived while Python was cleaning up an object" in p.stderr, p.stderr
    assert "ran to its end and is complete" in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_the_nbd_handshake_of_a_hot_backup_leaves_qemu_answering(tmp_path, sig):
    """The half-open NBD connection stayed open while the teardown stopped QEMU's NBD server:
    QEMU 7.2 waited for it in nbd-server-stop, pyvbak timed out after 30 s, and the VM's
    monitor never answered again (a real qemu-system too)."""
    import time

    from conftest import require_tool
    from qemu_vm import FakeVM

    require_tool("qemu-storage-daemon", "qemu-system-common")
    require_tool("fusermount3", "fuse3")
    vm = FakeVM(tmp_path / "vm").start()
    try:
        repo = tmp_path / "repo"
        pyvbak("init", repo)
        vm.write(0, os.urandom(MiB))
        patch = ("from pyvbak.sources.nbd import NbdClient\n"
                 "real = NbdClient._handshake\n"
                 "def _handshake(self):\n    stop_here()\n    return real(self)\n"
                 "NbdClient._handshake = _handshake\n")
        t0 = time.monotonic()
        p = run_stopped(tmp_path, patch, ["backup", vm.uri, "--repo", repo, "--vm", "v"], sig)
        assert p.returncode == 10 and time.monotonic() - t0 < 20, p.stderr
        assert "incomplete" not in p.stderr, p.stderr
        assert vm.exports() == ["guest"] and vm.jobs() == [] and vm.pyvbak_nodes() == []  # the monitor answers
    finally:
        vm.stop()


def test_a_stop_during_the_demos_last_cleanup_is_said(tmp_path, monkeypatch):
    """After "demo OK" the cleanup deferred a signal and dropped it: exit 0, no word.  It
    is noted as one after the work was done."""
    from conftest import require_tool

    require_tool("mkfs.ext4", "e2fsprogs")
    repo = tmp_path / "repo"
    pyvbak("init", repo)
    patch = ("import shutil\n"
             "real = shutil.rmtree\n"
             "def rmtree(path, *a, **k):\n"
             "    if 'pyvbak-demo-' in str(path):\n        stop_here()\n"
             "    return real(path, *a, **k)\n"
             "shutil.rmtree = rmtree\n")
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(env_tmp))  # (the demo's work directory: its own)
    p = run_stopped(tmp_path, patch, ["demo", "--repo", repo, "--size-mib", "32"])
    assert p.returncode == 0 and p.stdout.rstrip().endswith("demo OK"), p.stderr
    assert "pyvbak: note: SIGTERM arrived after the work was committed" in p.stderr, p.stderr
    assert os.listdir(env_tmp) == []  # its work directory went all the same


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_qemu_img_starts_leaves_no_fleecing_image(tmp_path, sig):
    """subprocess.run lost its child when the stop request came inside its Popen: qemu-img
    create went on and made the fleecing image in the work dir after the teardown had
    removed its name, while pyvbak said it had cleaned up.  The stand-in qemu-img here
    waits for pyvbak to be gone before it creates the
    file: only a qemu-img that pyvbak kills makes none."""
    from conftest import require_tool, wait_until
    from qemu_vm import FakeVM

    require_tool("qemu-storage-daemon", "qemu-system-common")
    require_tool("fusermount3", "fuse3")
    real = subprocess.run(["sh", "-c", "command -v qemu-img"], capture_output=True, text=True).stdout.strip()
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    (bin_dir / "qemu-img").write_text(
        f"#!/bin/sh\nwhile kill -0 $PPID 2>/dev/null; do sleep 0.05; done\nexec {real} \"$@\"\n")
    (bin_dir / "qemu-img").chmod(0o755)
    vm = FakeVM(tmp_path / "vm").start()
    try:
        repo = tmp_path / "repo"
        pyvbak("init", repo)
        patch = ("import subprocess\n"
                 "real = subprocess.Popen._execute_child\n"
                 "def _execute_child(self, args, *a, **k):\n"
                 "    real(self, args, *a, **k)\n"
                 "    if 'qemu-img' in str(args[0]):\n        stop_here()\n"
                 "subprocess.Popen._execute_child = _execute_child\n")
        p = run_stopped(tmp_path, patch, ["backup", vm.uri, "--repo", repo, "--vm", "v"], sig,
                        PATH=f"{bin_dir}:{os.environ['PATH']}", PYVBAK_WORK_DIR=str(work), PYVBAK_WATCHDOG="0")
        assert p.returncode == 10, p.stderr

        def helpers_at_work() -> list[int]:  # the stand-in qemu-img, or the real one it became
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if str(work).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        found.append(int(pid))
                except OSError:
                    pass
            return found

        wait_until(lambda: helpers_at_work() == [], timeout=30, what="the stand-in qemu-img gone")
        assert [f.name for f in work.iterdir() if "fleece" in f.name] == [], p.stderr
        assert vm.pyvbak_nodes() == [] and vm.jobs() == []
    finally:
        vm.stop()


def _snapshots_through_entry(tmp_path, sig, prelude: str) -> subprocess.CompletedProcess:
    """`pyvbak snapshots` of a missing repository through the console script's entry(),
    after ``prelude`` (Python that arranges for STOP_SIGNAL to come at some instant)."""
    code = (prelude + "sys.argv = ['pyvbak', 'snapshots', '--repo', sys.argv[1]]\n"
            "from pyvbak.cli.entry import entry\nentry()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), STOP_SIGNAL=str(int(sig)))
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "no-repo")], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_while_the_modules_load_is_one_line_and_exit_10(tmp_path, sig):
    """Before main() had its handlers, SIGTERM and SIGHUP took their default action: a
    service manager's stop in the first ~0.2 s killed pyvbak without a word, exit 143 or
    129, while Ctrl-C got exit 10 and its line."""
    starter = (
        "import importlib.abc, os, signal, sys\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pyvbak.cli.main':\n"
        "            os.kill(os.getpid(), int(os.environ['STOP_SIGNAL']))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n")
    p = _snapshots_through_entry(tmp_path, sig, starter)
    assert p.returncode == 10, (p.returncode, p.stderr)
    assert p.stderr.count("\n") == 1 and "while starting: nothing was done" in p.stderr, p.stderr
    assert signal.Signals(sig).name[3:] in p.stderr or "Ctrl-C" in p.stderr, p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_a_failure_is_reported_keeps_the_failure(tmp_path, sig):
    """A stop request that landed while main() wrote a failed command's error line escaped
    it: SIGTERM as a traceback (exit 1), Ctrl-C as "interrupted while starting: nothing was
    done" (exit 10), of a command that had run.  The outcome is
    decided there: it stands, and the request is noted."""
    starter = (
        "import io, os, signal, sys\n"
        "class Stderr(io.TextIOWrapper):\n"
        "    fired = False\n"
        "    def write(self, text):\n"
        "        if 'pyvbak: error:' in text and not Stderr.fired:\n"
        "            Stderr.fired = True\n"
        "            os.kill(os.getpid(), int(os.environ['STOP_SIGNAL']))\n"
        "        return super().write(text)\n"
        "sys.stderr = Stderr(sys.stderr.buffer, encoding='utf-8', line_buffering=True)\n")
    p = _snapshots_through_entry(tmp_path, sig, starter)
    assert p.returncode == 3, (p.returncode, p.stderr)  # the repository is missing: that outcome stands
    assert "Traceback" not in p.stderr and "nothing was done" not in p.stderr, p.stderr
    assert "is not a pyvbak repository" in p.stderr and "the outcome above stands" in p.stderr, p.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_forget_reports_what_it_did_is_noted_not_a_failure(tmp_path, repo_and_image, sig):
    """Once forget has forgotten, a stop request while it printed so said "stopped cleanly;
    run the command again to finish" (exit 10), and running it again found the snapshot
    gone, exit 5."""
    repo, img = repo_and_image
    pyvbak("backup", img, "--repo", repo, "--vm", "v")
    (meta,) = snapshots(repo)
    sid = meta[: -len(".json")]
    patch = ("import builtins\n"
             "real_print = builtins.print\n"
             "def print(*a, **k):\n"
             "    if a and str(a[0]).startswith('forgot '):\n        stop_here()\n"
             "    return real_print(*a, **k)\n"
             "builtins.print = print\n")
    p = run_stopped(tmp_path, patch, ["forget", sid, "--repo", repo], sig)
    assert p.returncode == 0 and "arrived after the work was committed" in p.stderr, (p.returncode, p.stderr)
    assert f"forgot 1 snapshot(s): {sid}" in p.stdout and snapshots(repo) == []


def test_a_committed_backup_whose_json_reader_is_gone_exits_0(tmp_path, repo_and_image):
    """The reader of --json closed its end (a pipe to a process that died): typer turned the
    EPIPE into exit 1, silently, for a backup that was made."""
    repo, img = repo_and_image
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.Popen([sys.executable, "-m", "pyvbak", "backup", str(img), "--repo", str(repo), "--vm", "v",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # nobody reads the result
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=120) == 0, err
    assert len(snapshots(repo)) == 1 and "Traceback" not in err


def test_a_repair_that_leaves_damage_is_no_success_when_its_reader_is_gone(tmp_path, repo_and_image):
    """verify --repair marked itself finished before reporting, and the closed pipe's exit
    then became 0: a repair that left lost blocks said nothing and succeeded."""
    repo, img = repo_and_image
    pyvbak("backup", img, "--repo", repo, "--vm", "v")
    for pack in (repo / "packs").rglob("*"):
        if pack.is_file():
            pack.unlink()
    env = _as_users_run_it(tmp_path)
    for json_out in (["--json"], []):
        p = subprocess.Popen([sys.executable, "-m", "pyvbak", "verify", "--repair", "--repo", str(repo), *json_out],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        p.stdout.close()
        err = p.stderr.read()
        p.stderr.close()
        # the repair's own outcome and line, not click's silent exit 1 for the closed pipe
        assert p.wait(timeout=120) == 6, err
        assert "pyvbak: error: verify found" in err and "Exception ignored" not in err and "Traceback" not in err, err


def _as_users_run_it(tmp_path) -> dict:
    """The environment of a command-line run as users have it: stdout block-buffered
    into a pipe (this machine sets PYTHONUNBUFFERED, under which the output that waited
    for the interpreter's exit - and failed there, exit 120 - never waits)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("PYVBAK_REPO", None)
    return env


def test_a_listing_whose_reader_is_gone_exits_0(tmp_path, repo_and_image):
    """'pyvbak snapshots | head -1': the reader stops early; the command did its work."""
    repo, img = repo_and_image
    pyvbak("backup", img, "--repo", repo, "--vm", "v")
    env = _as_users_run_it(tmp_path)
    for args in (["snapshots", "--repo", str(repo)], ["snapshots", "--repo", str(repo), "--json"], ["--help"]):
        p = subprocess.Popen([sys.executable, "-m", "pyvbak", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env, text=True)
        p.stdout.close()
        err = p.stderr.read()
        p.stderr.close()
        assert p.wait(timeout=120) == 0 and err == "", (args, err)


def test_a_stop_while_the_output_waits_on_a_full_pipe_stops_the_command(tmp_path):
    """A reader that reads nothing (a hung job runner): the listing waited for the pipe at
    the interpreter's exit, where SIGTERM is ignored - the process hung until killed.
    Now main() writes its output and a stop ends it: exit 10, one line."""
    import fcntl
    import json
    import termios

    from conftest import wait_until
    from images import backup_file
    from pyvbak.repo.repository import Repository

    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "d.img", 65536, [(0, 65536, "random")], seed=9)
    for i in range(12):  # ~7 KB of --json listing: more than the pipe holds, less than Python's buffer
        backup_file(repo, img, vm=f"vm{i:02d}")
    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    p = subprocess.Popen([sys.executable, "-m", "pyvbak", "snapshots", "--repo", repo.location, "--json"], stdout=w,
                         stderr=subprocess.PIPE, env=_as_users_run_it(tmp_path), text=True)
    os.close(w)
    try:
        def pipe_full():
            n = bytearray(4)
            fcntl.ioctl(r, termios.FIONREAD, n)
            return int.from_bytes(n, sys.byteorder) >= 4096

        wait_until(pipe_full, timeout=60, what="the listing blocked on the full pipe")
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 10
        err = p.stderr.read()
        assert err.count("\n") == 1 and "interrupted by SIGTERM: stopped cleanly" in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
        os.close(r)
    # and read in full, the same listing is whole JSON (the test's premise: it is over 4 KiB)
    out = subprocess.run([sys.executable, "-m", "pyvbak", "snapshots", "--repo", repo.location, "--json"],
                         capture_output=True, text=True, env=_as_users_run_it(tmp_path), check=True).stdout
    assert len(out) > 4096 and len(json.loads(out)) == 12, len(out)
    assert len(out) < 8192, len(out)  # (all of it waits in Python's buffer for the end of the command)


def _waits_on_a_pipe(pid: int) -> bool:
    """Is process ``pid`` blocked writing to a pipe (its kernel wait channel)?"""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe" in f.read()
    except OSError:
        return False


def _stalled_run(tmp_path, args, *, same_pipe: bool, stops: int = 1):
    """``pyvbak ARGS`` with stdout (and, ``same_pipe``, stderr: 2>&1) a full 4 KiB pipe
    nobody reads; ``stops`` SIGTERMs once it waits there (the next once it waits again):
    (exit code, stderr or "")."""
    import fcntl

    from conftest import wait_until

    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    os.write(w, b"#" * 4096)  # what a reader that stalled left unread
    p = subprocess.Popen([sys.executable, "-m", "pyvbak", *map(str, args)], stdout=w,
                         stderr=w if same_pipe else subprocess.PIPE, env=_as_users_run_it(tmp_path), text=True)
    os.close(w)
    try:
        def waits_on_the_pipe():
            return _waits_on_a_pipe(p.pid)

        for _ in range(stops):
            wait_until(lambda: p.poll() is not None or waits_on_the_pipe(), timeout=60,
                       what="the command at its output")
            assert p.poll() is None
            p.send_signal(signal.SIGTERM)
            if stops > 1:  # the stop taken: its results dropped (stdout now /dev/null), then the error line waits
                def stdout_dropped():
                    try:
                        return os.readlink(f"/proc/{p.pid}/fd/1") == os.devnull
                    except OSError:
                        return p.poll() is not None

                wait_until(lambda: p.poll() is not None or stdout_dropped(), timeout=30, what="the stop taken")
        code = p.wait(timeout=30)  # (it hung here: a line waiting on the pipe, the stop only noted)
        return code, "" if same_pipe else p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stderr:
            p.stderr.close()
        os.close(r)


def test_a_stop_while_the_error_line_waits_on_a_full_pipe_ends_the_command(tmp_path, backed_up):
    """2>&1 into a reader that stopped reading: the error line of the stopped command
    waited on the same full pipe, and a second SIGTERM was only noted.  The first stop
    stops the work and leaves the line waiting for the reader (one that only paused gets
    it); the second ends the line."""
    repo, _ = backed_up
    code, _ = _stalled_run(tmp_path, ["snapshots", "--repo", repo, "--json"], same_pipe=True, stops=2)
    assert code == 10


def test_a_second_stop_ends_an_error_line_waiting_on_a_full_stderr_pipe(tmp_path):
    """The outcome is decided (the repository is missing: exit 3) and its line waits on a
    stderr nobody reads: one stop is noted (it may just have landed as a line went out),
    a second ends the line, not the outcome (it hung)."""
    import fcntl

    from conftest import wait_until

    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    os.write(w, b"#" * 4096)
    p = subprocess.Popen([sys.executable, "-m", "pyvbak", "snapshots", "--repo", str(tmp_path / "none")],
                         stdout=subprocess.DEVNULL, stderr=w, env=_as_users_run_it(tmp_path))
    os.close(w)
    try:
        wait_until(lambda: p.poll() is not None or _waits_on_a_pipe(p.pid), timeout=60,
                   what="the error line at the full pipe")
        p.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):  # one: noted, the line still waits
            p.wait(timeout=1)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 3
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(r)


@pytest.mark.parametrize("args", [["unlock"], ["snapshots"]])
def test_a_command_done_but_stopped_at_its_output_says_what_became_of_the_work(tmp_path, backed_up, args):
    """unlock (and cbt-off) that had done their work said "interrupted ... run it again"
    when stopped while their result waited on a full pipe; a listing is
    its output, so stopping it is a stop."""
    repo, _ = backed_up
    code, err = _stalled_run(tmp_path, [*args, "--repo", repo], same_pipe=False)
    if args == ["unlock"]:
        assert code == 0 and "arrived after the work was committed" in err, err
    else:
        assert code == 10 and "interrupted by SIGTERM: stopped cleanly" in err, err


def test_a_stop_during_forget_says_to_look_before_running_it_again(tmp_path, repo_and_image):
    """Stopped between two snapshots, forget said "run the command again to finish", which
    then failed on the one already forgotten, exit 5."""
    repo, img = repo_and_image
    pyvbak("backup", img, "--repo", repo, "--vm", "v")
    pyvbak("backup", img, "--repo", repo, "--vm", "w")
    ids = [m[: -len(".json")] for m in snapshots(repo)]
    patch = ("import pyvbak.repo.prune as pr\n"
             "real = pr.forget_snapshots\n"
             "def forget_snapshots(repo, targets):\n"
             "    done = real(repo, targets[:1])\n    stop_here()\n    return done + real(repo, targets[1:])\n"
             "pr.forget_snapshots = forget_snapshots\n")
    p = run_stopped(tmp_path, patch, ["forget", *ids, "--repo", repo])
    assert p.returncode == 10 and "list them with 'pyvbak snapshots' before running it again" in p.stderr, p.stderr
    assert len(snapshots(repo)) == 1


def test_a_ctrl_c_raised_inside_an_exec_of_a_string_still_exits_10_under_python_m(tmp_path, repo_and_image):
    """A KeyboardInterrupt raised inside exec() of a string (dataclasses build their
    methods so: a lazy import of a module with a @dataclass) sets CPython's "unhandled
    KeyboardInterrupt" flag though pyvbak caught it, and ``python -m pyvbak`` then killed
    itself with SIGINT after its exit-10 line (~2 % of early Ctrl-Cs).
    The Ctrl-C comes here inside such an exec, deterministically."""
    repo, img = repo_and_image
    (tmp_path / "stopping_main.py").write_text(
        "import os, signal\n"
        "from pyvbak.repo.repository import Repository\n"
        "def check(self):\n"
        "    exec('os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10 ** 7): pass', "
        "{'os': os, 'signal': signal})\n"
        "Repository.check_pack_storage = check\n"
        "from pyvbak.cli.entry import entry\n"
        "entry()\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PYVBAK_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "stopping_main", "backup", str(img), "--repo", str(repo), "--vm", "v"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == Interrupted.exit_code, (p.returncode, p.stderr)
    assert "interrupted (Ctrl-C)" in p.stderr and snapshots(repo) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_python_drops_while_the_modules_load_still_stops_the_command(tmp_path, backed_up, sig):
    """The start-up handler raised inside a weakref callback (the import machinery's module
    locks have one), where Python drops the exception with a traceback ("Exception
    ignored"): the command ran on to its end and exited 0 - a ``restore --force`` the user
    had stopped replaced the file (session 26's audit)."""
    repo, out = backed_up
    target = out / "existing.img"
    target.write_bytes(b"the user's file")
    code = (
        "import importlib.abc, os, signal, sys, weakref\n"
        "class Thing:\n    pass\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pyvbak.cli.main':\n"
        "            thing = Thing()\n"
        "            ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), int(os.environ['STOP_SIGNAL'])))\n"
        "            del thing  # the callback runs here; the handler raises inside it\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "sys.argv = ['pyvbak', 'restore', 'v@latest', sys.argv[1], '--repo', sys.argv[2], '--force']\n"
        "from pyvbak.cli.entry import entry\nentry()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), STOP_SIGNAL=str(int(sig)), PYVBAK_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", code, str(target), str(repo)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 10, (p.returncode, p.stderr)
    assert p.stderr.count("\n") == 1 and "while starting: nothing was done" in p.stderr, p.stderr
    assert ("Ctrl-C" if sig == signal.SIGINT else "SIGTERM") in p.stderr
    assert target.read_bytes() == b"the user's file" and os.listdir(out) == ["existing.img"]


def test_a_stop_request_python_drops_is_reported_without_a_traceback_by_the_console_script(tmp_path, repo_and_image):
    """Python prints a dropped exception's traceback under "Exception ignored"; the
    console script's command says in one note what became of the request instead."""
    repo, img = repo_and_image
    code = ("import os, signal, sys\n"
            "from pyvbak.sources.file import FileSource\n"
            "fired = []\n"
            "class Dropped:\n"
            "    def __del__(self):\n"
            "        if not fired:\n"
            "            fired.append(1)\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "real = FileSource.extents\n"
            "def extents(self, *a, **k):\n"
            "    Dropped()  # collected at once: its __del__ runs here\n"
            "    return real(self, *a, **k)\n"
            "FileSource.extents = extents\n"
            "sys.argv = ['pyvbak', 'backup', sys.argv[1], '--repo', sys.argv[2], '--vm', 'v']\n"
            "from pyvbak.cli.entry import entry\nentry()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", code, str(img), str(repo)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and len(snapshots(repo)) == 1, p.stderr
    assert p.stderr.splitlines() == [
        "pyvbak: note: SIGTERM arrived while Python was cleaning up an object, where it cannot stop the command: "
        "the backup ran to its end and is complete"], p.stderr
