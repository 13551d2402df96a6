"""The watchdog of a hot backup: a backup killed without its teardown (SIGKILL) is cleaned
out of the VM at once, not at the next backup; one that ends its own way leaves no
watchdog behind and nothing said."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_until
from images import untokened
from qemu_vm import HOT_SESSION_CHILD, MiB, FakeVM, assert_clean, backup
from pyvbak.hypervisors.qemu import QemuHotBackup, hot, watchdog
from pyvbak.sources.nbd import NbdSource

ROOT = Path(__file__).resolve().parent.parent
K64 = 64 * 1024


@pytest.fixture(autouse=True)
def watchdog_on(monkeypatch):
    monkeypatch.setenv(watchdog.ENV, "1")


def start_child(vm, work, prev, form: str) -> subprocess.Popen:
    """A hot session in a child process (its watchdog on), serving once it prints READY."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1")
    p = subprocess.Popen([sys.executable, "-c", HOT_SESSION_CHILD, vm.uri, str(work), json.dumps(prev), form],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    assert line.startswith("READY"), (line, p.stderr.read() if p.poll() is not None else "")
    return p


def nothing_of_pyvbak_in(vm) -> bool:
    return vm.exports() == ["guest"] and not vm.jobs() and not vm.pyvbak_nodes() and not vm.pyvbak_objects()


@pytest.mark.parametrize("form", ["snapshot-access", "qcow2"])
def test_a_killed_backup_is_cleaned_out_of_the_vm_at_once(vm, work, form, monkeypatch):
    monkeypatch.setattr(hot, "SNAPSHOT_ACCESS_SINCE", (7, 1) if form == "snapshot-access" else (99, 0))
    s1, _ = backup(vm, work)
    vm.write(0, b"x" * K64)
    p = start_child(vm, work, s1.change_tracking_state, form)
    vm.write(MiB, b"y" * K64)  # after the killed run's instant: only in the bitmap it made
    assert vm.jobs() and len(vm.exports()) == 2
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    # no new pyvbak runs: the watchdog alone takes the filter, export, nodes and lock away
    wait_until(lambda: nothing_of_pyvbak_in(vm), timeout=30, what="the watchdog's cleanup")
    said = p.stderr.read()  # end of file: the watchdog, holding the same stderr, is done
    p.stderr.close()
    assert "pyvbak watchdog: backup run" in said and "ended without its cleanup; removed:" in said, said
    assert "fleecing backup job" in said and "session lock" in said
    assert len(said.strip().splitlines()) == 1
    # the fleecing file went; the journal stays, the evidence for the bitmaps' settling
    assert [n for n in os.listdir(work) if not n.endswith(".json")] == []
    assert set(vm.bitmaps()) == {"pyvbak-gen-1", "pyvbak-gen-2"}
    vm.write(2 * MiB, b"z" * K64)  # the guest writes as before: no filter copies it aside

    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
        cleaned = untokened(" | ".join(s.cleaned_leftovers))
        assert "merged back into pyvbak-gen-1" in cleaned and "NBD export" not in cleaned
        assert s.fallback_reason is None
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            assert src.change_tracking(s1.change_tracking_state).extents == [(0, K64), (MiB, K64), (2 * MiB, K64)]
        s.commit()
    assert_clean(vm, work)


def test_a_backup_started_right_after_the_kill_waits_its_turn_at_the_monitor(vm, work):
    s1, _ = backup(vm, work)
    p = start_child(vm, work, s1.change_tracking_state, "qcow2")
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    # at once: the watchdog queued at the monitor first (or this backup did, and cleans up)
    s2, _ = backup(vm, work, s1.change_tracking_state)
    assert s2.fallback_reason is None
    p.stdout.close()
    p.stderr.read()
    p.stderr.close()
    assert_clean(vm, work)


def test_a_session_that_ends_its_own_way_stops_its_watchdog_quietly(vm, work):
    procs = []
    with QemuHotBackup(vm.uri, work_dir=work) as s:
        procs.append(s._watchdog._proc)
        s.commit()
    with pytest.raises(RuntimeError):
        with QemuHotBackup(vm.uri, previous_state=s.change_tracking_state, work_dir=work) as s2:
            procs.append(s2._watchdog._proc)
            raise RuntimeError("the engine failed")
    for proc in procs:
        assert proc.wait(30) == 0
    assert_clean(vm, work)


def test_a_cli_backup_leaves_no_watchdog_holding_its_output(vm, tmp_path):
    """The watchdog shares pyvbak's stderr: a caller reading it to the end is not kept waiting."""
    repo = tmp_path / "repo"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1", PYVBAK_WORK_DIR=str(tmp_path / "work"))
    subprocess.run([sys.executable, "-m", "pyvbak", "init", str(repo)], check=True, capture_output=True, env=env)
    p = subprocess.run([sys.executable, "-m", "pyvbak", "backup", vm.uri, "--repo", str(repo), "--vm", "v", "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "watchdog" not in p.stderr
    assert nothing_of_pyvbak_in(vm)


def test_no_watchdog_when_turned_off(vm, work, monkeypatch):
    monkeypatch.setenv(watchdog.ENV, "0")
    with QemuHotBackup(vm.uri, work_dir=work) as s:
        assert s._watchdog is None
        s.commit()
    assert_clean(vm, work)


# -- the watchdog's working directory, forked children, cleanup lock and sockets ----------

def _kill_cli_backup_once_serving(vm, tmp_path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``pyvbak backup`` (the console entry point, as a user runs it: the current directory not on its path) of ``vm`` from
    ``cwd``, SIGKILLed once its export serves; returns its (code, stdout, stderr)."""
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "pyvbak", "init", str(repo)], check=True, capture_output=True, env=env)
    vm.write(0, os.urandom(4 * MiB))  # something to read
    # the backup stops once its session serves (a fast one finished before a polled kill)
    code = ("import sys, threading; from pyvbak.engine import backup; "
            "backup.run_backup = lambda *a, **k: threading.Event().wait(); "
            "from pyvbak.cli.entry import entry; sys.argv[0] = 'pyvbak'; entry()")
    p = subprocess.Popen([sys.executable, "-P", "-c", code, "backup", vm.uri, "--repo", str(repo), "--vm", "v"],
                         cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(e.startswith("pyvbak-") for e in vm.exports()) or p.poll() is not None, timeout=60,
               what="the backup's export")
    p.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_the_watchdog_runs_nothing_from_the_directory_pyvbak_was_started_in(vm, tmp_path):
    """The watchdog imports json and socket before pyvbak: a json.py or socket.py where
    pyvbak was started (a user's scratch files, /tmp for a cron job) is not run."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "ran"
    for name in ("json", "socket", "signal", "time"):
        (cwd / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1", PYVBAK_WORK_DIR=str(tmp_path / "work"))
    p = _kill_cli_backup_once_serving(vm, tmp_path, cwd, env)
    assert p.returncode == -signal.SIGKILL
    wait_until(lambda: nothing_of_pyvbak_in(vm), timeout=30, what="the watchdog's cleanup")
    assert not marker.exists(), marker.read_text()
    assert "pyvbak watchdog: backup run" in p.stderr and "removed:" in p.stderr


FORKING_CHILD = r"""
import os, sys, time
from pyvbak.hypervisors.qemu import QemuHotBackup
with QemuHotBackup(sys.argv[1], work_dir=sys.argv[2]) as s:
    pid = os.fork()  # a worker forked while the session is open (multiprocessing's default)
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    print("READY", pid, flush=True)
    time.sleep(60)
"""


def test_a_process_forked_from_pyvbak_does_not_keep_the_watchdog_from_cleaning_up(vm, work):
    """The fork inherits the watchdog's socket and the QMP connection; both are closed in
    it, so pyvbak's death is seen at once and the monitor is free for the watchdog."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1")
    p = subprocess.Popen([sys.executable, "-c", FORKING_CHILD, vm.uri, str(work)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env)
    line = p.stdout.readline()
    assert line.startswith("READY"), line
    forked = int(line.split()[1])
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        wait_until(lambda: nothing_of_pyvbak_in(vm), timeout=30, what="the watchdog's cleanup while the fork lives")
        assert os.path.exists(f"/proc/{forked}")
    finally:
        os.kill(forked, signal.SIGKILL)
        p.stdout.close()


SIGPIPE_CHILD = r"""
import os, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line tools do
from pyvbak.hypervisors.qemu import QemuHotBackup
with QemuHotBackup(sys.argv[1], work_dir=sys.argv[2]) as s:
    wd = s._watchdog._proc
    wd.kill()
    wd.wait()
    s.commit()
print("over", flush=True)
"""


def test_a_watchdog_that_died_first_is_no_sigpipe_for_the_application(vm, work):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1")
    p = subprocess.run([sys.executable, "-c", SIGPIPE_CHILD, vm.uri, str(work)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert (p.returncode, p.stdout.strip()) == (0, "over"), p.stderr
    assert nothing_of_pyvbak_in(vm)


def test_a_session_waits_for_a_watchdogs_cleanup_lock_instead_of_failing(tmp_path):
    """Through another monitor of the VM nothing serialises a backup with a watchdog: the
    backup finds the watchdog's lock ("cleanup": true) ahead of it and waits for it to go
    (before, it failed: "another pyvbak session ... is backing up this VM")."""
    import threading
    import time

    from pyvbak.errors import SourceError
    from pyvbak.hypervisors.qemu import QmpClient, session_lock

    v = FakeVM(tmp_path, extra_monitors=1).start()
    try:
        with QmpClient(v.extra_qmp_paths[0]).connect() as q2:
            # a live run (this process's, held), as a watchdog's is while it cleans up
            lock = session_lock.acquire(q2, f"{os.getpid()}-beef", cleanup=True)
            assert '"cleanup": true' in v.ctl.cmd("qom-get", path=f"/objects/{lock}", property="data")
            timer = threading.Timer(0.5, session_lock.release, (q2, lock))
            t0 = time.monotonic()
            timer.start()
            try:
                with QemuHotBackup(v.uri, work_dir=tmp_path / "work") as s:
                    assert lock not in v.pyvbak_objects()
                    s.commit()
            finally:
                timer.join()
            assert time.monotonic() - t0 >= 0.45
            # and a watchdog gives way to a session
            with QemuHotBackup(v.uri, work_dir=tmp_path / "work") as s:
                with pytest.raises(SourceError, match="another pyvbak session"):
                    session_lock.acquire(q2, f"{os.getpid()}-cafe", cleanup=True)
                s.commit()
        assert v.pyvbak_objects() == []
    finally:
        v.stop()


def test_a_dead_runs_nbd_socket_stays_for_its_own_vms_cleanup(tmp_path):
    """Cleaning one VM leaves another VM's dead run its journal and its NBD socket (the
    evidence that its VM's NBD server is pyvbak's), and both go with age."""
    import json as json_

    from pyvbak.hypervisors.qemu import cleanup

    work = tmp_path / "work"
    work.mkdir()
    run = "4242-abcd"
    journal = work / f"pyvbak-{run}.json"
    journal.write_text(json_.dumps({"qmp": "/vm/b/qmp.sock"}))
    sock, fleece = work / f"pyvbak-{run}-nbd.sock", work / f"pyvbak-{run}-fleece.raw"
    sock.write_bytes(b"")
    fleece.write_bytes(b"x")
    files = [fleece, sock, journal]
    assert cleanup.keep_other_disks_journals(files, "qmp", "/vm/a/qmp.sock") == [fleece]
    assert cleanup.keep_other_disks_journals(files, "qmp", "/vm/b/qmp.sock") == files
    fleece.unlink()
    assert cleanup.drop_old_journals(work, None) == []  # young: kept
    old = journal.stat().st_mtime - cleanup.OTHER_JOURNAL_KEEP_S - 1
    os.utime(journal, (old, old))
    assert cleanup.drop_old_journals(work, None) == [f"file {sock}", f"file {journal}"]
    assert list(work.iterdir()) == []


def test_with_qemu_gone_the_watchdog_removes_the_runs_files_and_says_so(vm, work):
    """A fleecing file can be as big as the guest's writes: with no QEMU holding it any
    more (its monitor refuses connections) the watchdog removes it (and the NBD socket) at
    once; the journal stays.  (A missing monitor socket is no proof: a socket deleted under
    a live QEMU, a VM restarting - then nothing is removed.)"""
    p = start_child(vm, work, None, "qcow2")
    assert any(n.endswith("-fleece.qcow2") for n in os.listdir(work))
    vm.proc.kill()  # QEMU dies first (its socket stays, refusing connections), then pyvbak
    vm.proc.wait(10)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    said = p.stderr.read()  # end of file: the watchdog is done
    p.stderr.close()
    assert "no longer answers (QEMU is gone): nothing to clean in it; removed: file " in said, said
    assert len(said.strip().splitlines()) == 1
    assert [n for n in os.listdir(work) if not n.endswith(".json")] == []


def test_a_relative_qmp_socket_path_is_the_same_socket_for_the_watchdog(vm, work):
    """The watchdog runs in "/": a relative socket path (the Python API takes one) named
    another socket there, the VM was taken for gone, and the filter stayed."""
    uri = f"qemu:{vm.qmp_path.name}?node=disk0"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1")
    p = subprocess.Popen([sys.executable, "-c", HOT_SESSION_CHILD, uri, str(work), "null", "qcow2"], cwd=vm.qmp_path.parent,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    assert line.startswith("READY"), (line, p.stderr.read() if p.poll() is not None else "")
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    wait_until(lambda: nothing_of_pyvbak_in(vm), timeout=30, what="the watchdog's cleanup")
    said = p.stderr.read()
    p.stderr.close()
    assert "removed: NBD export" in said, said
