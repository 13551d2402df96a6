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
from qemu_vm import MiB, FakeVM
from test_qemu_hot import CHILD, assert_clean, backup
from pyvbak.hypervisors.qemu import QemuHotBackup, hot, watchdog
from pyvbak.sources.nbd import NbdSource

ROOT = Path(__file__).resolve().parent.parent
K64 = 64 * 1024


@pytest.fixture
def vm(tmp_path):
    v = FakeVM(tmp_path).start()
    try:
        yield v
    finally:
        v.stop()


@pytest.fixture
def work(tmp_path):
    return tmp_path / "work"


@pytest.fixture(autouse=True)
def watchdog_on(monkeypatch):
    monkeypatch.setenv(watchdog.ENV, "1")


def start_child(vm, work, prev, form: str) -> subprocess.Popen:
    """A hot session in a child process (its watchdog on), serving once it prints READY."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="1")
    p = subprocess.Popen([sys.executable, "-c", CHILD, vm.uri, str(work), json.dumps(prev), form],
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
