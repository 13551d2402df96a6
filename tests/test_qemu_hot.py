"""Hot backup sessions against a real qemu-storage-daemon standing in for a VM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from images import untokened, zero_range

from conftest import wait_until
from qemu_vm import HOT_SESSION_CHILD, MiB, FakeVM, assert_clean, backup
from pyvbak.errors import Interrupted, SourceError, UsageError
from pyvbak.hypervisors.qemu import QemuHotBackup, QmpClient, hot, parse_qemu_uri
from pyvbak.sources.nbd import NbdSource

ROOT = Path(__file__).resolve().parent.parent
K64 = 64 * 1024


@pytest.fixture(params=["snapshot-access", "qcow2"])
def fleecing(request, monkeypatch):
    """Both ways of taking the frozen view: snapshot-access (QEMU >= 8.0) and the qcow2
    fleecing image QEMU 7.2 here gets, each forced by moving the version it starts from.
    (QEMU 7.2's snapshot-access view reads a block copied aside wrong when a read goes
    past it - test_reads_across_blocks_the_guest_overwrote_are_the_instants - so the
    tests on it read block by block, which it serves right.)"""
    monkeypatch.setattr(hot, "SNAPSHOT_ACCESS_SINCE", (7, 1) if request.param == "snapshot-access" else (99, 0))
    return request.param


# -- URI -------------------------------------------------------------------------------


def test_parse_qemu_uri():
    assert parse_qemu_uri("qemu:///run/vm/qmp.sock?node=disk0") == ("/run/vm/qmp.sock", "disk0")
    assert parse_qemu_uri("qemu:///run/vm/qmp.sock?device=vda") == ("/run/vm/qmp.sock", "vda")
    for bad in ("qemu:///run/qmp.sock", "qemu://host/run/qmp.sock?node=a", "nbd:///x?node=a",
                "qemu:///?node=a", "qemu:///s?node=a&x=1"):
        with pytest.raises(UsageError):
            parse_qemu_uri(bad)


# -- CBT lifecycle ---------------------------------------------------------------------


def test_first_then_incremental_backup(vm, work, fleecing):
    vm.write(0, b"A" * MiB)
    s1, ext = backup(vm, work)
    assert s1.fallback_reason == "no dirty bitmap of an earlier backup of this disk (its first backup through QEMU)"
    assert s1.dirty_bitmap is None and ext is None
    assert s1.size == vm.size
    st = s1.change_tracking_state
    assert untokened(st["bitmap"]) == "pyvbak-gen-1" and st["generation"] == 1 and st["node"] == "disk0"
    assert st["size"] == vm.size and st["image"].endswith("disk.qcow2")
    assert vm.bitmaps()["pyvbak-gen-1"]["recording"] is True
    assert_clean(vm, work)

    vm.write(3 * K64, b"x" * K64)
    vm.write(10 * K64 + 100, b"y" * 10)  # inside one 64 KiB granule
    vm.write(5 * MiB, b"z" * (2 * K64))
    s2, ext = backup(vm, work, st)
    assert s2.fallback_reason is None and untokened(s2.dirty_bitmap) == "pyvbak-gen-1"
    assert ext == [(3 * K64, K64), (10 * K64, K64), (5 * MiB, 2 * K64)]
    assert set(vm.bitmaps()) == {"pyvbak-gen-2"}
    assert s2.change_tracking_state["generation"] == 2
    assert_clean(vm, work)

    s3, ext = backup(vm, work, s2.change_tracking_state)
    assert s3.fallback_reason is None and ext == []

    s4, _ = backup(vm, work, s3.change_tracking_state, verify_cbt=True)
    assert "verify-cbt" in s4.fallback_reason and untokened(s4.dirty_bitmap) == "pyvbak-gen-3"


def test_point_in_time_view(vm, work, fleecing):
    blocks = 64  # 4 MiB of pattern A in 64 KiB blocks
    for i in range(blocks):
        vm.write(i * K64, bytes([0x41 + i % 8]) * K64)
    stop = threading.Event()
    written: list[int] = []

    def guest():
        i = 0
        while not stop.is_set() or i < 8:
            blk = (i * 7) % blocks
            vm.write(blk * K64, b"B" * K64)
            written.append(blk)
            i += 1

    with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
        assert s.snapshot_access == (fleecing == "snapshot-access")
        t = threading.Thread(target=guest)
        t.start()
        try:
            with NbdSource(s.nbd_uri) as src:
                for rnd in range(2):
                    for i in range(blocks):
                        assert src.read(i * K64, K64) == bytes([0x41 + i % 8]) * K64, f"block {i} round {rnd}"
                    if rnd == 0:
                        wait_until(lambda: len(written) >= 8, what="guest writes")
        finally:
            stop.set()
            t.join()
        s.commit()
    assert written
    for i in range(blocks):
        want = b"B" * K64 if i in written else bytes([0x41 + i % 8]) * K64
        assert vm.read(i * K64, K64) == want
    assert_clean(vm, work)
    # the writes during the backup belong to the next increment
    assert vm.bitmaps()["pyvbak-gen-1"]["count"] == len(set(written)) * K64


def test_failure_cleans_up_and_keeps_dirty_bits(vm, work, fleecing):
    s1, _ = backup(vm, work)
    vm.write(0, b"x" * K64)
    with pytest.raises(RuntimeError):
        with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
            assert s.fallback_reason is None
            fleece = s.disks[0].fleece_path
            assert fleece.exists() and fleece.suffix == (".raw" if fleecing == "snapshot-access" else ".qcow2")
            vm.write(2 * MiB, b"y" * K64)
            raise RuntimeError("engine failed")
    assert not fleece.exists()
    assert_clean(vm, work)
    bm = vm.bitmaps()
    assert set(bm) == {"pyvbak-gen-1"} and bm["pyvbak-gen-1"]["recording"]
    s3, ext = backup(vm, work, s1.change_tracking_state)
    assert s3.fallback_reason is None
    assert ext == [(0, K64), (2 * MiB, K64)]


def test_a_committed_disk_keeps_its_new_generation_when_the_session_then_fails(vm, work):
    """commit() says the disk's snapshot is durable: the old generation goes even if the
    session fails afterwards (a later disk of the run, a Ctrl-C before exit), and the
    writes after the instant are in the new one - nothing lost, and no needless full scan."""
    s1, _ = backup(vm, work)
    vm.write(0, b"x" * K64)
    with pytest.raises(RuntimeError):
        with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
            vm.write(2 * MiB, b"y" * K64)
            s.commit()
            raise RuntimeError("failed after the snapshot was durable")
    assert_clean(vm, work)
    assert set(vm.bitmaps()) == {"pyvbak-gen-2"}
    s3, ext = backup(vm, work, s.change_tracking_state)
    assert s3.fallback_reason is None
    assert ext == [(2 * MiB, K64)]


def test_keyboard_interrupt_cleans_up(vm, work):
    with pytest.raises(KeyboardInterrupt):
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work):
            raise KeyboardInterrupt
    assert_clean(vm, work)
    assert vm.bitmaps() == {}


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Interrupted], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_while_the_session_lock_is_made_leaves_no_lock(vm, work, monkeypatch, interrupt):
    """A signal after QEMU made the lock object but before its reply was read: the caller
    never learned the object's id, and the lock stayed in the VM while the message said
    everything was cleaned up."""
    from pyvbak.hypervisors.qemu.qmp import QmpClient

    real = QmpClient.execute

    def execute(self, command, /, **arguments):
        out = real(self, command, **arguments)
        if command == "object-add":
            raise interrupt("interrupted by SIGTERM") if interrupt is Interrupted else interrupt()
        return out

    monkeypatch.setattr(QmpClient, "execute", execute)
    with pytest.raises(interrupt):
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work):
            pass
    monkeypatch.undo()
    assert_clean(vm, work)
    assert vm.bitmaps() == {}


def test_resources_that_only_look_like_pyvbaks_are_left_alone(vm, work, tmp_path):
    """The admin's NBD server with an export named like a run's (pid 4242 not running),
    a node named like a fleecing node, bitmaps named 'pyvbak-gen-x': the leftover scan
    took the name as evidence - removed the export, stopped the admin's server under its
    clients, deleted the node and the bitmap.  Without a session lock or work-dir files
    of that run, nothing is pyvbak's."""
    admin = tmp_path / "admin.raw"
    admin.write_bytes(b"A" * MiB)
    vm.ctl.cmd("blockdev-add", **{"driver": "raw", "node-name": "pyvbak-4242-abcd-fl",
                                  "file": {"driver": "file", "filename": str(admin)}})
    vm.ctl.cmd("block-dirty-bitmap-add", node="disk0", name="pyvbak-gen-x", persistent=True)
    vm.ctl.cmd("block-dirty-bitmap-add", node="disk0", name="admin-inc", persistent=True)
    vm.ctl.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "admin-nbd.sock")}})
    vm.ctl.cmd("block-export-add", type="nbd", id="pyvbak-4242-abcd", **{"node-name": "pyvbak-4242-abcd-fl"},
               name="x")
    with pytest.raises(SourceError, match="already runs an NBD server"):  # the admin's, running on
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work):
            pass
    assert "pyvbak-4242-abcd" in vm.exports()
    assert "pyvbak-4242-abcd-fl" in vm.pyvbak_nodes()
    assert {"pyvbak-gen-x", "admin-inc"} <= set(vm.bitmaps())
    vm.ctl.cmd("block-export-del", id="pyvbak-4242-abcd")
    vm.ctl.cmd("nbd-server-stop")
    s1, _ = backup(vm, work)
    s2, _ = backup(vm, work, s1.change_tracking_state)
    assert s2.fallback_reason is None and not s2.cleaned_leftovers
    assert vm.pyvbak_nodes() == ["pyvbak-4242-abcd-fl"]
    assert set(vm.bitmaps()) == {"pyvbak-gen-x", "admin-inc", "pyvbak-gen-2"}


# -- killed runs -----------------------------------------------------------------------

def start_child(vm, work, prev, fleecing="snapshot-access"):
    # what the next run cleans is tested here: no watchdog cleans up first
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="0")
    p = subprocess.Popen([sys.executable, "-c", HOT_SESSION_CHILD, vm.uri, str(work), json_dumps(prev), fleecing],
                         stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    assert line.startswith("READY"), line
    return p


def killed_run(vm, work, prev, fleecing="snapshot-access") -> None:
    """A session started in a child process and killed with SIGKILL once it serves."""
    p = start_child(vm, work, prev, fleecing)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()


def json_dumps(x):
    import json

    return json.dumps(x)


def test_kill9_leftovers_cleaned_by_next_run(vm, work, fleecing):
    s1, _ = backup(vm, work)
    vm.write(0, b"x" * K64)
    p = start_child(vm, work, s1.change_tracking_state, fleecing)
    vm.write(MiB, b"y" * K64)  # written after the killed run's instant: only in gen-2
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    assert len(vm.exports()) == 2 and vm.pyvbak_nodes() and vm.jobs()
    assert set(vm.bitmaps()) == {"pyvbak-gen-1", "pyvbak-gen-2"}

    assert len(vm.pyvbak_objects()) == 1  # the killed run's session lock stays behind
    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
        cleaned = " | ".join(s.cleaned_leftovers)
        assert "session lock" in cleaned and "of a dead run" in cleaned
        assert "NBD export" in cleaned and "job" in cleaned and "fleecing node" in cleaned
        if fleecing == "snapshot-access":
            assert "snapshot-access node" in cleaned and "fleece.raw" in cleaned
        else:
            assert "snapshot-access node" not in cleaned and "fleece.qcow2" in cleaned
        assert "merged back into pyvbak-gen-1" in untokened(cleaned)
        assert s.fallback_reason is None
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            assert src.change_tracking(s1.change_tracking_state).extents == [(0, K64), (MiB, K64)]
        s.commit()
    assert_clean(vm, work)
    assert set(vm.bitmaps()) == {untokened(s.change_tracking_state["bitmap"])}


def test_a_cleanup_interrupted_halfway_keeps_the_evidence_for_the_next(vm, work, tmp_path, monkeypatch):
    """The leftover cleanup released a dead run's session lock first: interrupted before it
    removed the run's export and job, it left them with no evidence that they were
    pyvbak's, and every later backup from another work dir failed ('already runs an NBD
    server') with the copy job on the guest's disk.  The lock now goes last."""
    from pyvbak.hypervisors.qemu import cleanup

    s1, _ = backup(vm, work)
    killed_run(vm, work, s1.change_tracking_state)
    other = tmp_path / "other-work"  # another host's or user's work dir: only QEMU holds evidence
    real = cleanup.remove_export

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cleanup, "remove_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=other):
            pass
    monkeypatch.setattr(cleanup, "remove_export", real)
    assert len(vm.pyvbak_objects()) == 1 and len(vm.exports()) == 2  # the dead run's lock, and its export
    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=other) as s:
        cleaned = " | ".join(s.cleaned_leftovers)
        assert "NBD export" in cleaned and "job" in cleaned and "session lock" in cleaned
        s.commit()
    assert vm.exports() == ["guest"] and vm.pyvbak_nodes() == [] and vm.jobs() == [] and vm.pyvbak_objects() == []


def test_under_nohup_a_hangup_does_not_stop_a_hot_session(vm, work):
    """TerminationGuard installed its SIGHUP handler over an ignored SIGHUP: under nohup,
    a hangup still stopped hot backups (exit 10) while file backups went on."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: the session goes on
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert_clean(vm, work)


def test_sigterm_cleans_up(vm, work):
    s1, _ = backup(vm, work)
    p = start_child(vm, work, s1.change_tracking_state)
    vm.write(0, b"x" * K64)
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    assert p.wait(20) == 10, out
    p.stdout.close()
    assert "SIGTERM" in out
    assert_clean(vm, work)
    bm = vm.bitmaps()
    assert set(bm) == {"pyvbak-gen-1"} and bm["pyvbak-gen-1"]["recording"] and bm["pyvbak-gen-1"]["count"] == K64


# -- errors and fallbacks --------------------------------------------------------------


def test_qmp_socket_missing(tmp_path):
    with pytest.raises(SourceError, match="does not exist.*-qmp unix:"):
        QemuHotBackup(f"qemu://{tmp_path}/nope.sock?node=d", previous_state=None, work_dir=tmp_path).__enter__()


def test_qmp_socket_busy(vm, work):
    with QmpClient(str(vm.qmp_path), timeout=5):
        with pytest.raises(SourceError, match="another client"):
            QemuHotBackup(vm.uri, previous_state=None, work_dir=work, qmp_timeout=0.5).__enter__()


@pytest.mark.parametrize("greeting,needle", [
    (b"5\n", "is not a QMP socket"),
    (b'"QMP"\n', "is not a QMP socket"),
    (b"NBDMAGIC\x00\x00\x42\x02\x49\x53\x4f\x00\x03", "is an NBD server's socket"),
    (b"{" + b" " * (1 << 20), "without ending a message"),  # a peer that never ends a line
])
def test_a_socket_that_is_not_qmp_is_refused_at_once(tmp_path, monkeypatch, greeting, needle):
    """Non-object JSON used to raise TypeError (traceback); an NBD socket waited for the
    timeout and then blamed 'another client'; an endless line was buffered unbounded."""
    import socket
    import time

    from pyvbak.hypervisors.qemu import qmp

    monkeypatch.setattr(qmp, "MAX_MESSAGE_BYTES", 256 << 10)
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        try:
            conn.sendall(greeting)
            conn.recv(1)  # hold the connection open until the client gives up
        except OSError:
            pass
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(SourceError, match=needle):
            QmpClient(path, timeout=20).connect()
    finally:
        srv.close()
    assert time.monotonic() - t0 < 10  # refused on what it read, not at the 20 s timeout
    t.join(5)


def test_qmp_error_class(vm):
    with QmpClient(str(vm.ctl_path), timeout=5) as q:
        with pytest.raises(SourceError, match="no-such-command.*CommandNotFound"):
            q.execute("no-such-command")
        assert q.execute("query-jobs") == []


def test_wrong_node_name(vm, work):
    with pytest.raises(SourceError, match="no block node named 'disk9'.*disk0"):
        with QemuHotBackup(f"qemu://{vm.qmp_path}?node=disk9", previous_state=None, work_dir=work):
            pass
    assert_clean(vm, work)


def test_bitmap_deleted_by_someone_else(vm, work):
    s1, _ = backup(vm, work)
    vm.ctl.cmd("block-dirty-bitmap-remove", node="disk0", name=vm.bitmaps()["pyvbak-gen-1"]["name"])
    s2, ext = backup(vm, work, s1.change_tracking_state)
    assert "gone" in s2.fallback_reason and ext is None and s2.dirty_bitmap is None
    assert set(vm.bitmaps()) == {"pyvbak-gen-2"}


def test_old_generation_removed_by_someone_else_during_the_backup(vm, work):
    """The commit retires the old generation without asking QEMU first: one already
    gone is no failure, and the new generation stays."""
    s1, _ = backup(vm, work)
    vm.write(0, b"q" * K64)
    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            ct = src.change_tracking(s1.change_tracking_state)
        s.release_view()
        vm.ctl.cmd("block-dirty-bitmap-remove", node="disk0", name=vm.bitmaps()["pyvbak-gen-1"]["name"])
        s.commit()
    assert ct.extents == [(0, K64)]
    assert set(vm.bitmaps()) == {"pyvbak-gen-2"}
    assert_clean(vm, work)


def test_bitmap_disabled_by_someone_else(vm, work):
    s1, _ = backup(vm, work)
    vm.ctl.cmd("block-dirty-bitmap-disable", node="disk0", name=vm.bitmaps()["pyvbak-gen-1"]["name"])
    s2, _ = backup(vm, work, s1.change_tracking_state)
    assert "disabled" in s2.fallback_reason
    assert set(vm.bitmaps()) == {"pyvbak-gen-2"}


def test_disk_resized(vm, work):
    s1, _ = backup(vm, work)
    vm.ctl.cmd("block_resize", **{"node-name": "disk0", "size": 32 * MiB})
    s2, _ = backup(vm, work, s1.change_tracking_state)
    assert "resized" in s2.fallback_reason and s2.size == 32 * MiB
    assert s2.change_tracking_state["size"] == 32 * MiB


def test_generation_mismatch(vm, work):
    s1, _ = backup(vm, work)
    prev = dict(s1.change_tracking_state, generation=7)
    s2, _ = backup(vm, work, prev)
    assert "generation" in s2.fallback_reason


def test_nbd_server_already_running(vm, work, tmp_path):
    s1, _ = backup(vm, work)
    vm.ctl.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "other.sock")}})
    with pytest.raises(SourceError, match="already runs an NBD server.*one NBD server per"):
        with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work):
            pass
    assert_clean(vm, work)
    bm = vm.bitmaps()
    assert set(bm) == {"pyvbak-gen-1"} and bm["pyvbak-gen-1"]["recording"]
    vm.ctl.cmd("nbd-server-stop")


def test_raw_disk_tracks_changes_in_memory_until_qemu_restarts(tmp_path, work):
    """A raw disk cannot store a bitmap: pyvbak's lives in QEMU's memory, trusted while the
    same QEMU runs; after a restart it is gone and the backup scans, saying why."""
    (tmp_path / "vm").mkdir()
    vm = FakeVM(tmp_path / "vm", fmt="raw").start()
    try:
        vm.write(0, b"R" * MiB)
        s1, ext = backup(vm, work)
        assert s1.fallback_reason == "no dirty bitmap of an earlier backup of this disk (its first backup through QEMU)" and ext is None
        st = s1.change_tracking_state
        assert untokened(st["bitmap"]) == "pyvbak-gen-1" and st["persistent"] is False and st["format"] == "raw"
        bm = vm.bitmaps()
        assert set(bm) == {"pyvbak-gen-1"} and bm["pyvbak-gen-1"]["recording"] and not bm["pyvbak-gen-1"]["persistent"]
        assert_clean(vm, work)

        vm.write(2 * K64, b"x" * K64)
        vm.write(7 * MiB + 5, b"y")
        s2, ext = backup(vm, work, st)
        assert s2.fallback_reason is None and untokened(s2.dirty_bitmap) == "pyvbak-gen-1"
        assert ext == [(2 * K64, K64), (7 * MiB, K64)]
        assert set(vm.bitmaps()) == {"pyvbak-gen-2"}
        with QemuHotBackup(vm.uri, previous_state=s2.change_tracking_state, work_dir=work) as s:
            with NbdSource(s.nbd_uri) as src:
                assert src.read(2 * K64, 4) == b"xxxx" and src.read(0, 4) == b"RRRR"
            # not committed: the new generation is merged back into gen-2
        assert set(vm.bitmaps()) == {"pyvbak-gen-2"}
        assert_clean(vm, work)

        vm.stop()
        vm.start(create=False)  # the VM's QEMU restarts: in-memory bitmaps are gone
        assert vm.bitmaps() == {}
        vm.write(9 * K64, b"z" * K64)
        s3, ext = backup(vm, work, s2.change_tracking_state)
        assert ext is None and s3.dirty_bitmap is None
        assert "gone" in s3.fallback_reason and "memory" in s3.fallback_reason and "restarted" in s3.fallback_reason
        assert s3.change_tracking_state["generation"] == 3  # names are never reused
        assert set(vm.bitmaps()) == {"pyvbak-gen-3"}
        s4, ext = backup(vm, work, s3.change_tracking_state)
        assert s4.fallback_reason is None and ext == []
        assert_clean(vm, work)
    finally:
        vm.stop()


def test_format_change_is_not_trusted(vm, work):
    s1, _ = backup(vm, work)
    state = dict(s1.change_tracking_state, format="raw")
    with QemuHotBackup(vm.uri, previous_state=state, work_dir=work) as s:
        assert "format changed from 'raw' to 'qcow2'" in s.fallback_reason and s.dirty_bitmap is None
    assert_clean(vm, work)


# -- one session per VM (session_lock) -------------------------------------------------


def live_pid():
    """A process that is alive for the test's duration (not this one)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return p


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def foreign_lock(vm, pid: int, started: float) -> str:
    name = f"pyvbak-{pid}-beef-lock"
    vm.ctl.cmd("object-add", **{"qom-type": "secret", "id": name, "data": f"{started:.6f}"})
    return name


def test_a_second_session_on_the_same_vm_is_refused_whatever_its_work_dir(vm, tmp_path):
    """A session that started earlier and is alive holds the VM: a new one fails before
    touching anything, and leaves the other's lock alone."""
    import time

    other = live_pid()
    try:
        name = foreign_lock(vm, other.pid, time.time() - 5)
        before = set(vm.bitmaps())
        with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {other.pid}.*wait for it to finish"):
            with QemuHotBackup(vm.uri, previous_state=None, work_dir=tmp_path / "elsewhere"):
                pass
        assert vm.pyvbak_objects() == [name]
        assert set(vm.bitmaps()) == before and vm.pyvbak_nodes() == [] and vm.exports() == ["guest"]
    finally:
        other.kill()
        other.wait()


def test_a_later_session_that_goes_away_lets_us_in(vm, work, monkeypatch):
    """Two sessions racing: a lock that started later than ours is a session that saw ours
    and is backing off - we wait for it to go, then get in."""
    import threading
    import time

    from pyvbak.hypervisors.qemu import session_lock

    monkeypatch.setattr(session_lock, "RACE_GRACE_S", 5.0)
    other = live_pid()
    try:
        name = foreign_lock(vm, other.pid, time.time() + 3600)
        gone = threading.Timer(0.3, lambda: vm.ctl.cmd("object-del", id=name))
        gone.start()
        t = time.monotonic()
        backup(vm, work)
        assert time.monotonic() - t >= 0.25  # it waited for the other to go
        gone.join()
        assert_clean(vm, work)
    finally:
        other.kill()
        other.wait()


def test_a_later_session_that_stays_holds_the_vm(vm, work, monkeypatch):
    """A lock that started later than ours but stays was made by a session that listed the
    locks before ours existed: it is in, so we are refused (after the grace period) and
    leave its lock alone."""
    import time

    from pyvbak.hypervisors.qemu import session_lock

    monkeypatch.setattr(session_lock, "RACE_GRACE_S", 0.3)
    other = live_pid()
    try:
        name = foreign_lock(vm, other.pid, time.time() + 3600)
        with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {other.pid}, .*wait for it to finish"):
            backup(vm, work)
        assert vm.pyvbak_objects() == [name]  # ours released, theirs untouched
        assert vm.pyvbak_nodes() == [] and vm.jobs() == []
    finally:
        other.kill()
        other.wait()


def test_an_earlier_start_does_not_prove_an_earlier_lock(tmp_path, monkeypatch):
    """The race that let two sessions in: A creates its lock and, seeing no other, is in;
    B read its start time before A's but created its lock after A's listing.  B sees A's
    later-started lock and must not go ahead of it."""
    from pyvbak.hypervisors.qemu import session_lock
    from pyvbak.hypervisors.qemu.qmp import QmpClient

    monkeypatch.setattr(session_lock, "RACE_GRACE_S", 0.3)
    (tmp_path / "vm").mkdir()
    vm = FakeVM(tmp_path / "vm", extra_monitors=1).start()
    qa = QmpClient(vm.qmp_path).connect()
    qb = QmpClient(vm.extra_qmp_paths[0]).connect()
    clock = iter([1000.0, 500.0])  # A's start time, then B's (earlier)
    monkeypatch.setattr(session_lock.time, "time", lambda: next(clock))
    try:
        me = os.getpid()  # both runs "alive": this process holds them
        a = session_lock.acquire(qa, f"{me}-aaaa")
        with pytest.raises(SourceError, match=f"another pyvbak session .*run {me}-aaaa"):
            session_lock.acquire(qb, f"{me}-bbbb")
        assert session_lock.session_locks(qa) == [a]  # B removed its own lock
        session_lock.release(qa, a)
        assert session_lock.session_locks(qa) == []
    finally:
        qa.close()
        qb.close()
        vm.stop()


def test_sessions_racing_within_a_microsecond_agree_on_one(tmp_path, monkeypatch):
    """Both sessions create their lock before either lists them, with start times half a
    microsecond apart (they are stored rounded to 6 decimals): both must compare the same
    numbers, so exactly one gets in.  Comparing its unrounded time with the other's
    rounded one, each found the other later and both gave up (seen ~1 in 100 races)."""
    from pyvbak.hypervisors.qemu import session_lock
    from pyvbak.hypervisors.qemu.qmp import QmpClient

    # the winner waits for the loser's lock to go: a grace far beyond a loaded machine's
    # stalls (1 s let a stalled loser make both give up)
    monkeypatch.setattr(session_lock, "RACE_GRACE_S", 10.0)
    (tmp_path / "vm").mkdir()
    vm = FakeVM(tmp_path / "vm", extra_monitors=1).start()
    clients = {"A": QmpClient(vm.qmp_path).connect(), "B": QmpClient(vm.extra_qmp_paths[0]).connect()}
    base = 1764100000.0
    clock = {"A": base + 0.1234566, "B": base + 0.1234568}
    monkeypatch.setattr(session_lock.time, "time", lambda: clock[threading.current_thread().name])
    both_added = threading.Barrier(2)
    listed_once: set[str] = set()
    real_locks = session_lock.session_locks

    def after_both_added(qmp):
        name = threading.current_thread().name
        if name not in listed_once:
            listed_once.add(name)
            both_added.wait(timeout=10)
        return real_locks(qmp)

    monkeypatch.setattr(session_lock, "session_locks", after_both_added)
    results: dict[str, object] = {}
    me = os.getpid()

    def run(name):
        try:
            results[name] = session_lock.acquire(clients[name], f"{me}-{name.lower() * 4}")
        except SourceError as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("A", "B")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        won = [n for n, r in results.items() if isinstance(r, str)]
        lost = [n for n, r in results.items() if isinstance(r, SourceError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert real_locks(clients["A"]) == [results[won[0]]]
        session_lock.release(clients[won[0]], results[won[0]])
    finally:
        for c in clients.values():
            c.close()
        vm.stop()


def test_the_lock_of_a_killed_run_is_removed_and_reported(vm, work):
    import time

    name = foreign_lock(vm, dead_pid(), time.time() - 60)
    with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
        assert any(name in line and "dead run" in line for line in s.cleaned_leftovers)
        s.commit()
    assert_clean(vm, work)


# -- whose run is it: the owner identity a lock (or journal) records --------------------

KILLED_AS = r"""
import sys, time
from pyvbak.hypervisors.qemu import QemuHotBackup, hot
uri, work, run_pid = sys.argv[1:]
if run_pid:  # the run id of a process whose pid another one got since
    hot.new_run_id = lambda: f"{run_pid}-beef"
with QemuHotBackup(uri, previous_state=None, work_dir=work) as s:
    print("READY", s.run, flush=True)
    time.sleep(60)
"""


def killed_session(vm, work, run_pid: int | None = None) -> str:
    """A session killed with SIGKILL once its fleecing view and export were up; returns
    its run id (the child's pid, or ``run_pid``).  No watchdog: the leftovers stay."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="0")
    p = subprocess.Popen([sys.executable, "-c", KILLED_AS, vm.uri, str(work), str(run_pid or "")],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("READY"), line
    finally:
        p.kill()
        p.wait(10)
        p.stdout.close()
    return line.split()[1]


def lock_of(vm, run: str) -> str:
    return vm.ctl.cmd("qom-get", path=f"/objects/pyvbak-{run}-lock", property="data")


def replace_lock(vm, run: str, data: str) -> None:
    name = f"pyvbak-{run}-lock"
    vm.ctl.cmd("object-del", id=name)
    vm.ctl.cmd("object-add", **{"qom-type": "secret", "id": name, "data": data})


def edit_journal(work, run: str, **owner) -> None:
    """Change the owner the killed run's journal records (none given: drop it, as pyvbak
    before it wrote)."""
    import json

    path = work / f"pyvbak-{run}.json"
    journal = json.loads(path.read_text())
    if owner:
        journal["owner"].update(owner)
    else:
        del journal["owner"]
    path.write_text(json.dumps(journal))


def vm_state(vm) -> tuple:
    """What pyvbak has in the VM: exports, nodes, jobs, lock objects, bitmaps."""
    return (vm.exports(), vm.pyvbak_nodes(), vm.jobs(), vm.pyvbak_objects(),
            {name: (b["recording"], b.get("busy")) for name, b in vm.bitmaps().items()})


def assert_refused_leaving_everything(vm, work, run: str, elsewhere) -> None:
    """Neither a new session (whatever its work dir) nor leftover cleanup touches run's
    resources: both fail with the one-line 'another pyvbak session' error."""
    from pyvbak.hypervisors.qemu import cleanup

    pid = run.split("-")[0]
    before, files = vm_state(vm), sorted(os.listdir(work))
    assert len(before[0]) == 2 and before[1] and before[2] and before[3] == [f"pyvbak-{run}-lock"]
    for work_dir in (work, elsewhere):
        with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {pid}, run {run}\) is backing up "
                                              r"this VM since .*wait for it to finish") as e:
            with QemuHotBackup(vm.uri, previous_state=None, work_dir=work_dir):
                pass
        assert len(str(e.value).splitlines()) == 1
        assert vm_state(vm) == before and sorted(os.listdir(work)) == files
    with QmpClient(vm.qmp_path).connect() as q:
        with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {pid}, run {run}\) is active on this "
                                              r"VM or work dir .*wait for it to finish") as e:
            cleanup.clean_leftovers(q, work, "disk0", None, own_run=None)
    assert len(str(e.value).splitlines()) == 1
    assert vm_state(vm) == before and sorted(os.listdir(work)) == files


@pytest.mark.parametrize("foreign", ["pidns", "machine"])
def test_a_run_of_another_pid_namespace_or_machine_is_live(vm, work, tmp_path, monkeypatch, foreign):
    """A pyvbak in another container (pid namespace) or on another machine sharing the QMP
    socket: its pid means nothing here (dead in this namespace), so its session is live -
    its lock holds the VM and its fleecing node, export and job are left alone."""
    import json

    from pyvbak import processes
    from pyvbak.hypervisors.qemu import session_lock

    monkeypatch.setattr(session_lock, "RACE_GRACE_S", 0.3)
    run = killed_session(vm, work)
    assert not processes.pid_alive(int(run.split("-")[0]))
    data = json.loads(lock_of(vm, run))
    assert data["pidns"] == processes.pid_namespace() and data["machine"] == processes.machine_id()
    other = {"pidns": "pid:[1]"} if foreign == "pidns" else {"machine": "0" * 32}
    assert other[foreign] != data[foreign]
    replace_lock(vm, run, json.dumps({**data, **other}))
    edit_journal(work, run, **other)
    assert_refused_leaving_everything(vm, work, run, tmp_path / "elsewhere")


def test_a_foreign_run_whose_lock_is_gone_is_judged_by_its_journal(vm, work):
    """Without its lock in the VM, the identity the run's journal recorded decides: another
    pid namespace's run is live, and the session's leftover cleanup refuses, removing
    nothing (the session releases only its own lock)."""
    run = killed_session(vm, work)
    vm.ctl.cmd("object-del", id=f"pyvbak-{run}-lock")
    edit_journal(work, run, pidns="pid:[1]")
    before, files = vm_state(vm), sorted(os.listdir(work))
    with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {run.split('-')[0]}, run {run}\) is active "
                                          r"on this VM or work dir") as e:
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work):
            pass
    assert len(str(e.value).splitlines()) == 1
    assert vm_state(vm) == before and sorted(os.listdir(work)) == files


def test_a_run_whose_pid_went_to_another_python_process_is_cleaned(vm, work):
    """The run id's pid runs a Python process again, but not the one that made the run:
    the start time its lock recorded differs, so the run is dead and cleaned."""
    import json
    import time

    from pyvbak import processes

    sleeper = live_pid()  # the Python process that "got the pid"
    try:
        time.sleep(0.05)  # a later clock tick: the killed run's start time differs
        run = killed_session(vm, work, run_pid=sleeper.pid)
        assert run == f"{sleeper.pid}-beef" and processes.pid_alive(sleeper.pid)
        assert json.loads(lock_of(vm, run))["start"] != processes.start_time(sleeper.pid)
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
            cleaned = " | ".join(s.cleaned_leftovers)
            assert f"session lock pyvbak-{run}-lock of a dead run" in cleaned
            assert f"NBD export pyvbak-{run}" in cleaned and f"fleecing backup job pyvbak-{run}-job" in cleaned
            assert f"fleecing node pyvbak-{run}-fl" in cleaned and f"pyvbak-{run}.json" in cleaned
            s.commit()
        assert_clean(vm, work)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("form", ["identity with its start", "bare float"])
def test_a_live_python_pid_holds_its_run_when_nothing_says_otherwise(vm, work, tmp_path, monkeypatch, form):
    """The same leftovers, but the lock records the start time the pid's process has (it
    is the owner), or is an old bare-float lock with a journal without identity (pyvbak
    before it recorded one: judged by the pid, as then): the run is live."""
    import json
    import time

    from pyvbak import processes
    from pyvbak.hypervisors.qemu import session_lock

    monkeypatch.setattr(session_lock, "RACE_GRACE_S", 0.3)
    sleeper = live_pid()
    try:
        time.sleep(0.05)
        run = killed_session(vm, work, run_pid=sleeper.pid)
        data = json.loads(lock_of(vm, run))
        if form == "bare float":
            replace_lock(vm, run, f"{data['started']:.6f}")
            edit_journal(work, run)
        else:
            replace_lock(vm, run, json.dumps({**data, "start": processes.start_time(sleeper.pid)}))
            edit_journal(work, run, start=processes.start_time(sleeper.pid))
        assert_refused_leaving_everything(vm, work, run, tmp_path / "elsewhere")
    finally:
        sleeper.kill()
        sleeper.wait()
    # once the pid is gone the same leftovers are a dead run's: cleaned (the old form too)
    with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
        cleaned = " | ".join(s.cleaned_leftovers)
        assert f"session lock pyvbak-{run}-lock of a dead run" in cleaned and f"NBD export pyvbak-{run}" in cleaned
        s.commit()
    assert_clean(vm, work)


def test_concurrent_sessions_exactly_one_wins(tmp_path):
    """Two processes, each on its own QMP monitor of the same VM and with its own work
    dir, start a session at the same moment; a session that gets in stays in until the
    test releases it.  Exactly one gets in, the other is refused with the one-line
    message, and nothing is left afterwards.  (On one monitor QEMU itself serialises
    them: it serves one QMP client at a time.)"""
    (tmp_path / "vm").mkdir()
    vm = FakeVM(tmp_path / "vm", extra_monitors=1).start()
    try:
        _concurrent_sessions(vm, tmp_path, [vm.uri, f"qemu://{vm.extra_qmp_paths[0]}?node=disk0"])
    finally:
        vm.stop()


def _concurrent_sessions(vm, tmp_path, uris):
    script = (
        "import os, sys, time; from pyvbak.hypervisors.qemu import QemuHotBackup, session_lock\n"
        "from pyvbak.errors import SourceError\n"
        "session_lock.RACE_GRACE_S = 10.0  # (beyond a loaded machine's stalls; see the microsecond test)\n"
        "uri, work, flag, release = sys.argv[1:]\n"
        "try:\n"
        "    with QemuHotBackup(uri, previous_state=None, work_dir=work) as s:\n"
        "        open(flag, 'w').close()\n"
        "        deadline = time.monotonic() + 60\n"
        "        while not os.path.exists(release) and time.monotonic() < deadline:\n"
        "            time.sleep(0.01)\n"
        "        s.commit()\n"
        "    print('OK')\n"
        "except SourceError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for attempt in range(3):
        d = tmp_path / f"a{attempt}"
        d.mkdir()
        release = d / "release"
        flags = [d / f"in-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", script, uris[i], str(d / f"work{i}"), str(flags[i]), str(release)],
                                  stdout=subprocess.PIPE, text=True, env=env) for i in range(2)]
        try:
            # one is in and the other has given up: the refused one exits on its own
            wait_until(lambda: sum(f.exists() for f in flags) >= 1 and any(p.poll() is not None for p in procs),
                       timeout=60, what="one session in, the other refused")
            assert sum(f.exists() for f in flags) == 1  # never both at once
        finally:
            release.touch()
            outs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert sorted(o.split()[0] for o in outs) == ["OK", "REFUSED"], outs
        refused = next(o for o in outs if o.startswith("REFUSED"))
        assert "another pyvbak session" in refused and len(refused.splitlines()) == 1, refused
        assert vm.pyvbak_objects() == [] and vm.pyvbak_nodes() == [] and vm.exports() == ["guest"]


# -- fleecing never fails a guest write (fleece_guard) ---------------------------------


def low_space_switch(monkeypatch, low: bool):
    from pyvbak.hypervisors.qemu import fleece_guard

    state = {"low": low}
    real = fleece_guard.free_bytes

    def fake(path):
        free, size = real(path)
        return (0 if state["low"] else free), size

    monkeypatch.setattr(fleece_guard, "free_bytes", fake)
    return state


def test_work_dir_running_out_of_space_breaks_the_backup_not_the_guest(vm, work, monkeypatch, fleecing):
    from pyvbak.hypervisors import SessionSource

    s1, _ = backup(vm, work)
    state = low_space_switch(monkeypatch, low=False)
    with pytest.raises(SourceError, match=r"stopped the backup: work dir .* the VM was not affected"):
        with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
            with s.open_source() as nbd:
                src = SessionSource(s, nbd)
                assert len(src.read(0, K64)) == K64  # fine while there is room
                vm.write(0, b"a" * K64)  # copied into the fleecing file first
                state["low"] = True
                wait_until(lambda: s.broken, timeout=10, what="the guard to break the backup")
                wait_until(lambda: vm.jobs() == [], timeout=10, what="the fleecing job to be cancelled")
                vm.write(MiB, b"b" * K64)  # the guest keeps writing, straight to its disk
                src.read(0, K64)  # the view is no longer frozen: refused
    assert_clean(vm, work)
    assert vm.read(0, K64) == b"a" * K64 and vm.read(MiB, K64) == b"b" * K64
    bm = vm.bitmaps()
    # both writes are in the bitmap the last good backup recorded: the next one sees them
    assert set(bm) == {"pyvbak-gen-1"} and bm["pyvbak-gen-1"]["recording"] and bm["pyvbak-gen-1"]["count"] == 2 * K64


def test_no_backup_starts_without_room_for_the_copies(vm, work, monkeypatch):
    s1, _ = backup(vm, work)
    low_space_switch(monkeypatch, low=True)
    before = vm.bitmaps()
    with pytest.raises(SourceError, match=r"cannot start the backup: work dir .* free space there or set PYVBAK_WORK_DIR"):
        with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work):
            pass
    assert_clean(vm, work)
    assert vm.bitmaps() == before


def test_a_lock_this_process_leaked_does_not_block_its_next_session(vm, work):
    """A lock with this process's pid whose session is not running here (leaked, e.g. a
    signal right after object-add) is stale: the next session cleans it and proceeds."""
    import time

    from pyvbak.hypervisors.qemu import session_lock

    name = foreign_lock(vm, os.getpid(), time.time() - 60)
    with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
        assert any(name in line for line in s.cleaned_leftovers)
        s.commit()
    assert_clean(vm, work)
    # releasing an already-released lock is fine
    from pyvbak.hypervisors.qemu.qmp import QmpClient

    with QmpClient(vm.qmp_path).connect() as q:
        session_lock.release(q, name)


def test_a_backing_file_written_while_the_vm_was_off_is_not_trusted_to_the_bitmap(tmp_path, work):
    """An overlay's persistent bitmap records the writes to the overlay alone: a backing
    file written between two runs of the VM changed the disk without it."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    v = FakeVM(tmp_path / "vm", size=8 * MiB)
    v.dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(v.image)],
                   check=True)
    v.start(create=False)
    try:
        s1, _ = backup(v, work)
        assert [b["file"] for b in s1.change_tracking_state["backing_chain"]] == [str(base)]
        v.write(0, b"a" * K64)
        s2, ext = backup(v, work, s1.change_tracking_state)
        assert s2.fallback_reason is None and ext == [(0, K64)]  # the chain as recorded: trusted
        v.stop()
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 4M 64k", str(base)], check=True,
                       capture_output=True)
        v.start(create=False)
        s3, ext = backup(v, work, s2.change_tracking_state)
        assert s3.fallback_reason and "backing chain" in s3.fallback_reason and ext is None
        assert_clean(v, work)
    finally:
        v.stop()


def test_a_killed_run_does_not_enable_a_bitmap_someone_else_disabled(vm, work):
    """The previous bitmap was disabled by someone else (it missed the writes since) and a
    backup - a full scan for that reason - was killed after its rotation: the next run
    merged the killed run's generation back, enabled the disabled bitmap and trusted it,
    and the write made while it was disabled was never read.  A
    bitmap is enabled again only when the dead run's journal says it disabled it."""
    s1, _ = backup(vm, work)
    vm.ctl.cmd("block-dirty-bitmap-disable", node="disk0", name=vm.bitmaps()["pyvbak-gen-1"]["name"])
    vm.write(0, b"m" * K64)  # missed by the disabled bitmap
    killed_run(vm, work, s1.change_tracking_state)
    assert set(vm.bitmaps()) == {"pyvbak-gen-1", "pyvbak-gen-2"}
    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
        assert "re-enabled" not in " | ".join(s.cleaned_leftovers)
        assert s.fallback_reason and "disabled" in s.fallback_reason and s.dirty_bitmap is None
        s.commit()
    assert_clean(vm, work)


def test_a_disabled_bitmap_is_enabled_again_only_on_evidence_of_that_disk_and_run(vm):
    """The evidence that a dead run disabled the previous bitmap itself must name one of
    the generations merged back now (its random token names the disk and the run): a
    stale journal (another run, long merged) or another disk's bitmap of the same old,
    token-less name enabled a bitmap that had missed writes."""
    from pyvbak.hypervisors.qemu import cleanup

    vm.ctl.cmd("block-dirty-bitmap-add", node="disk0", name="pyvbak-gen-1", persistent=True)
    vm.ctl.cmd("block-dirty-bitmap-disable", node="disk0", name="pyvbak-gen-1")
    qmp = QmpClient(vm.qmp_path).connect()
    try:
        for evidence in ({("pyvbak-gen-1", "pyvbak-gen-2-00000000")},  # a stale journal's, or another disk's
                         {("pyvbak-gen-1-99999999", "pyvbak-gen-2-0a1b2c3d")}):  # of another bitmap
            vm.ctl.cmd("block-dirty-bitmap-add", node="disk0", name="pyvbak-gen-2-0a1b2c3d", persistent=True)
            cleaned = cleanup.settle_bitmaps(qmp, "disk0", "pyvbak-gen-1", None, evidence)
            assert "merged back" in " ".join(cleaned) and "re-enabled" not in " ".join(cleaned)
            assert set(vm.bitmaps()) == {"pyvbak-gen-1"} and not vm.bitmaps()["pyvbak-gen-1"]["recording"]
        vm.ctl.cmd("block-dirty-bitmap-add", node="disk0", name="pyvbak-gen-2-0a1b2c3d", persistent=True)
        cleaned = cleanup.settle_bitmaps(qmp, "disk0", "pyvbak-gen-1", None,
                                         {("pyvbak-gen-1", "pyvbak-gen-2-0a1b2c3d")})
        assert "re-enabled" in " ".join(cleaned) and vm.bitmaps()["pyvbak-gen-1"]["recording"]
    finally:
        qmp.close()


def test_another_vms_backup_leaves_a_killed_runs_journal_for_its_own_vm(vm, work, tmp_path):
    """One work dir serves every VM: VM b's backup removed the files of VM a's killed run,
    its journal too - the evidence that the run disabled a's bitmap - and a's next backup
    became a full scan.  b's backup now leaves a's journal for a's next run."""
    s1, _ = backup(vm, work)
    vm.write(0, b"a" * K64)
    killed_run(vm, work, s1.change_tracking_state)
    other = FakeVM(tmp_path / "vm-b").start()
    try:
        backup(other, work)  # VM b, same work dir
    finally:
        other.stop()
    assert [f.name for f in work.iterdir() if f.name.endswith(".json")], "a's journal is gone"
    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
        assert s.fallback_reason is None, s.fallback_reason
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            assert src.change_tracking(s1.change_tracking_state).extents == [(0, K64)]
        s.commit()
    assert_clean(vm, work)


def test_an_offline_backup_leaves_a_killed_hot_runs_journal(vm, work, tmp_path):
    """The same work dir serves offline images: their cleanup removed a running VM's
    killed run's journal, and the VM's next backup scanned the whole disk."""
    from pyvbak.hypervisors.qemu import QemuOfflineImage

    s1, _ = backup(vm, work)
    vm.write(0, b"o" * K64)
    killed_run(vm, work, s1.change_tracking_state)
    img = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    with QemuOfflineImage(img, previous_state=None, work_dir=work) as o:
        o.commit()
    with QemuHotBackup(vm.uri, previous_state=s1.change_tracking_state, work_dir=work) as s:
        assert s.fallback_reason is None, s.fallback_reason
        s.commit()
    assert_clean(vm, work)


def test_a_kept_journal_of_another_containers_run_blocks_no_backup(vm, work):
    """A dead run's journal of another VM stays in the shared work dir for that VM's next
    run; written in another container, it cannot be judged from here, and every backup
    refused as if that run were active on this VM."""
    import json

    from pyvbak import processes

    work.mkdir(parents=True, exist_ok=True)
    run = "4194301-abcd"
    journal = {"run": run, "pid": 4194301, "owner": {**processes.identity(), "pidns": "pid:[1]"},
               "qmp": "/elsewhere/other-vm/qmp.sock",
               "disks": [{"node": "disk0", "disables": "pyvbak-gen-1-00000000", "new_bitmap": "pyvbak-gen-2-00000000"}]}
    kept = work / f"pyvbak-{run}.json"
    kept.write_text(json.dumps(journal))
    s1, _ = backup(vm, work)  # refused before
    assert s1.change_tracking_state["bitmap"]
    assert kept.exists()  # still there for its own VM's next run
    # an offline backup in the same work dir is not refused either
    from pyvbak.hypervisors.qemu import QemuOfflineImage

    img = work.parent / "offline.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    with QemuOfflineImage(img, previous_state=None, work_dir=work) as o:
        o.commit()
    assert kept.exists()
    # once 30 days old it goes, and is no reason to refuse on the way
    import time

    old = time.time() - 31 * 86400
    os.utime(kept, (old, old))
    backup(vm, work)
    backup(vm, work)
    assert not kept.exists()


def _settle(bitmaps: dict, previous: str, evidence) -> tuple[list, list]:
    """cleanup.settle_bitmaps against a node holding ``bitmaps`` (name -> flags): (the
    QMP commands it sent, the lines it returned)."""
    from pyvbak.hypervisors.qemu import cleanup

    sent = []

    class Recorder:
        def execute(self, cmd, **args):
            sent.append((cmd, args))

    info = {"node-name": "disk0", "dirty-bitmaps": [{"name": n, **f} for n, f in bitmaps.items()]}
    return sent, cleanup.settle_bitmaps(Recorder(), "disk0", previous, info, evidence)


def test_a_killed_runs_bitmap_that_stopped_recording_keeps_the_previous_one_disabled():
    """The killed run disabled X and made Y; someone then disabled Y: merged back, X
    was enabled and trusted, and the writes while Y was disabled were missing."""
    ev = {("pyvbak-gen-1-aaaaaaaa", "pyvbak-gen-2-bbbbbbbb")}
    sent, _ = _settle({"pyvbak-gen-1-aaaaaaaa": {"recording": False}, "pyvbak-gen-2-bbbbbbbb": {"recording": False}},
                      "pyvbak-gen-1-aaaaaaaa", ev)
    actions = [a["type"] for cmd, args in sent if cmd == "transaction" for a in args["actions"]]
    assert "block-dirty-bitmap-merge" in actions and "block-dirty-bitmap-enable" not in actions
    sent, _ = _settle({"pyvbak-gen-1-aaaaaaaa": {"recording": False}, "pyvbak-gen-2-bbbbbbbb": {"recording": True}},
                      "pyvbak-gen-1-aaaaaaaa", ev)
    actions = [a["type"] for cmd, args in sent if cmd == "transaction" for a in args["actions"]]
    assert "block-dirty-bitmap-enable" in actions  # it kept recording: the evidence holds


def test_inconsistent_bitmaps_are_not_merged():
    """After a QEMU crash both bitmaps came back inconsistent: QEMU refuses the merge, and
    every backup of the VM failed on it.  The newer ones are removed instead."""
    for flags in ({"pyvbak-gen-1-aaaaaaaa": {"inconsistent": True}, "pyvbak-gen-2-bbbbbbbb": {"inconsistent": True}},
                  {"pyvbak-gen-1-aaaaaaaa": {"recording": True}, "pyvbak-gen-2-bbbbbbbb": {"inconsistent": True}}):
        sent, _ = _settle(flags, "pyvbak-gen-1-aaaaaaaa", set())
        assert [cmd for cmd, _ in sent] == ["block-dirty-bitmap-remove"]
        assert sent[0][1]["name"] == "pyvbak-gen-2-bbbbbbbb"


def test_garbage_journals_in_the_work_dir_are_no_traceback(vm, work):
    work.mkdir(parents=True, exist_ok=True)
    (work / "pyvbak-4194302-abcd.json").write_text('{"disks": 5, "qmp": 7}')
    (work / "pyvbak-4194303-abcd.json").write_text('{"disks": [{"node": [1], "disables": 3}], "qmp": "%s"}'
                                                   % vm.qmp_path)
    (work / "pyvbak-4194304-abcd.json").write_text("not json")
    backup(vm, work)


def test_live_sessions_of_two_vms_share_a_work_dir(vm, work, tmp_path):
    """A nightly job backs up several VMs at once, all with the default work dir: the
    second VM's session refused while the first one ran ("another pyvbak session is
    active on this VM or work dir"), though they share nothing but the folder."""
    from pyvbak.hypervisors.qemu import QemuOfflineImage

    other = FakeVM(tmp_path / "vm-b").start()
    img = tmp_path / "powered-off.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    try:
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as a:
            b_state, _ = backup(other, work)  # VM b while a's view, export and journal exist
            assert b_state.change_tracking_state["bitmap"]
            with QemuOfflineImage(img, previous_state=None, work_dir=work) as o:  # and an image
                with QemuHotBackup(other.uri, previous_state=b_state.change_tracking_state, work_dir=work) as b:
                    assert b.fallback_reason is None, b.fallback_reason
                    b.commit()
                o.commit()
            assert a.nbd_uri and os.path.exists(a.names.nbd_socket)  # a's session untouched
            a.commit()
        assert_clean(other, work)
        assert_clean(vm, work)
    finally:
        other.stop()


def test_a_live_session_in_another_process_lets_other_disks_back_up(vm, work, tmp_path):
    """The same across processes (two cron jobs, a parallel job runner): the second one
    refused while the first one held its view.  (A live session of the same VM still holds
    it, whatever the work dir: test_a_second_session_on_the_same_vm_is_refused_whatever_its_work_dir.)"""
    from pyvbak.hypervisors.qemu import QemuOfflineImage

    child = start_child(vm, work, None)  # VM a's session, live in another process
    other = FakeVM(tmp_path / "vm-b").start()
    img = tmp_path / "powered-off.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    try:
        a_files = sorted(f.name for f in work.iterdir())
        backup(other, work)
        with QemuOfflineImage(img, previous_state=None, work_dir=work) as o:
            o.commit()
        assert sorted(f.name for f in work.iterdir()) == a_files  # a's files untouched
        assert other.pyvbak_nodes() == [] and other.pyvbak_objects() == []
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(20)
        child.stdout.close()
        other.stop()
    assert_clean(vm, work)


def test_reads_across_blocks_the_guest_overwrote_are_the_instants(vm, work):
    """QEMU 7.2's snapshot-access view served a read that starts in a block the guest
    overwrote after the instant (copied aside) and goes on past it from the live disk:
    the guest's new data, zeroes or discards got into the backup.  The view QEMU 7.2 gets
    reads it right, with reads of any size."""
    pattern = os.urandom(1 << 20)
    vm.write(0, pattern)
    with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
        vm.write(640 * 1024, b"B" * K64)  # the guest, after the instant
        zero_range(vm.guest_path, 320 * 1024, K64)
        vm.write(900 * 1024, b"b" * 1000)
        with NbdSource(s.nbd_uri) as src:
            assert src.read(0, 1 << 20) == pattern
            assert src.read(640 * 1024, 3 * K64) == pattern[640 * 1024:832 * 1024]
            assert src.read(320 * 1024, 2 * K64) == pattern[320 * 1024:448 * 1024]
            zero = src.zero_ranges()
            assert not any(o < 1 << 20 for o, _ in zero.tolist()), zero
        s.commit()
    assert vm.read(640 * 1024, 4) == b"BBBB" and vm.read(320 * 1024, 4) == bytes(4)
    assert_clean(vm, work)


def test_a_view_whose_job_qemu_ended_makes_no_snapshot(vm, work, monkeypatch):
    """The qcow2 view reads what the filter did not copy from the live disk: once QEMU
    ends the job (an error writing the fleecing image), later guest writes would be read
    as the instant's.  The backup fails instead of committing them."""
    monkeypatch.setattr(hot, "SNAPSHOT_ACCESS_SINCE", (99, 0))
    vm.write(0, b"A" * K64)
    with pytest.raises(SourceError, match="ended before the backup had read it"):
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
            with NbdSource(s.nbd_uri) as src:
                vm.ctl.cmd("block-job-cancel", device=s.disks[0].names.job, force=True)
                wait_until(lambda: not [j for j in vm.ctl.cmd("query-jobs") if j.get("status") != "concluded"],
                           what="the job to end")
                vm.write(0, b"B" * K64)
                assert src.read(0, K64) == b"B" * K64  # what the qcow2 view reads now
            s.disks[0].release_view()
    assert_clean(vm, work)


def test_another_vms_run_seen_as_it_writes_its_first_journal_is_no_reason_to_refuse(vm, work):
    """A run's first journal is written as pyvbak-<run>.tmp and renamed: a backup of
    another VM that listed the work dir in that instant refused ("another pyvbak session
    is active") - two nightly jobs started in the same second."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    other = live_pid()
    try:
        tmp = work / f"pyvbak-{other.pid}-abcd.tmp"
        tmp.write_text(json.dumps({"run": f"{other.pid}-abcd", "pid": other.pid,
                                   "qmp": "/elsewhere/other-vm/qmp.sock", "disks": []}))
        backup(vm, work)
        assert tmp.exists()  # a live run's: left alone
    finally:
        other.kill()
        other.wait()


def test_another_vms_live_session_never_stops_this_vms_nbd_server(vm, work, tmp_path):
    """VM a's live backup left its NBD socket in the shared work dir, and VM b's backup took
    it for a leftover of b's: it stopped b's NBD server - an admin's - and said "NBD server
    started by pyvbak".  b's server is not pyvbak's: b's backup is
    refused as for any NBD server already running, and the admin's export stays."""
    other = FakeVM(tmp_path / "vm-b").start()
    try:
        admin = tmp_path / "admin-nbd.sock"
        other.ctl.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(admin)}})
        other.ctl.cmd("blockdev-add", driver="null-co", **{"node-name": "admin-null"}, size=1 << 20)
        other.ctl.cmd("block-export-add", type="nbd", id="admin-export", **{"node-name": "admin-null"},
                      writable=False)
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as a:
            with pytest.raises(SourceError, match="already runs an NBD server"):
                backup(other, work)
            a.commit()
        assert "admin-export" in other.exports()
        from pyvbak.hypervisors.qemu.cleanup import socket_listening

        assert socket_listening(admin)
    finally:
        other.stop()
    assert_clean(vm, work)


def test_a_journal_is_written_where_no_other_session_looks_until_it_is_whole(vm, work):
    """A run's journal was written as pyvbak-<run>.tmp and renamed: another VM's session
    that found it empty or half-written refused.  It is written as
    .pyvbak-<run>.json.tmp now, which no scan of pyvbak-* sees; a killed run's goes with
    the next session, a live run's stays."""
    from pyvbak.hypervisors.qemu import hot as hot_mod

    seen = []
    real = hot_mod.os.replace

    def replace(src, dst, **kw):
        seen.append((os.path.basename(src), sorted(p.name for p in work.glob("pyvbak-*"))))
        return real(src, dst, **kw)
    work.mkdir(parents=True, exist_ok=True)
    other = live_pid()
    try:
        live_tmp = work / f".pyvbak-{other.pid}-abcd.json.tmp"
        live_tmp.write_text("{")
        p = subprocess.Popen(["true"])
        p.wait()
        dead_tmp = work / f".pyvbak-{p.pid}-abcd.json.tmp"
        dead_tmp.write_text("{")
        hot_mod.os.replace = replace
        try:
            backup(vm, work)
        finally:
            hot_mod.os.replace = real
        journals = [(src, names) for src, names in seen if ".json" in src]  # (os.replace is everyone's)
        assert journals and all(src.startswith(".pyvbak-") and not any(n.endswith(".tmp") for n in names)
                                for src, names in journals), journals
        assert live_tmp.exists() and not dead_tmp.exists()
    finally:
        other.kill()
        other.wait()


def test_a_view_qemu_cannot_say_is_running_makes_no_snapshot(vm, work, monkeypatch):
    """The check after the last read took "QEMU did not answer" for "the job runs": a
    snapshot holding the guest's later writes was committed.
    Not known to run is not running."""
    from pyvbak.errors import SourceError as SE
    from pyvbak.hypervisors.qemu.qmp import QmpClient

    monkeypatch.setattr(hot, "SNAPSHOT_ACCESS_SINCE", (99, 0))
    real = QmpClient.execute

    def execute(self, command, **args):
        if command == "query-jobs" and getattr(self, "_fail_jobs", False):
            raise SE("timed out after 3.0s waiting for the reply to 'query-jobs'")
        return real(self, command, **args)
    monkeypatch.setattr(QmpClient, "execute", execute)
    with pytest.raises(SourceError, match="could not be confirmed whole .* could not be asked whether its copy-before-write"):
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=work) as s:
            s._qmp._fail_jobs = True
            try:
                s.disks[0].release_view()
            finally:
                s._qmp._fail_jobs = False
    assert_clean(vm, work)


def test_a_relative_work_dir_is_taken_from_pyvbaks_directory(vm, tmp_path, monkeypatch):
    """QEMU opened the fleecing file named relative to its own working directory: a
    relative PYVBAK_WORK_DIR failed with "Could not open 'relwork/...'"."""
    from pyvbak.hypervisors import default_work_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYVBAK_WORK_DIR", "relwork")
    assert default_work_dir() == str(tmp_path / "relwork")
    for fleecing in ((99, 0), (7, 1)):
        monkeypatch.setattr(hot, "SNAPSHOT_ACCESS_SINCE", fleecing)
        backup(vm, Path("relwork"))
    assert_clean(vm, tmp_path / "relwork")
