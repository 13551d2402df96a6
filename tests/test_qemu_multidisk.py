"""Several disks of one running VM frozen at one instant (`qemu:///SOCK?node=A&node=B`).

A VM whose database keeps its data on one disk and its log on another is only
crash-consistent if both disks are read as they were at the same instant; two separate
hot backups would freeze them at two different instants.
"""

from __future__ import annotations

import json
import os
import stat
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from images import untokened

from conftest import cli_json, wait_until
from pyvbak.cli.main import main
from pyvbak.errors import SourceError, UsageError
from pyvbak.hypervisors import disk_names
from pyvbak.hypervisors.qemu import QemuHotBackup
from pyvbak.hypervisors.qemu.vm_disks import DiskSelector, parse_qemu_uri_disks
from pyvbak.sources.nbd import NbdSource
from qemu_vm import MiB, FakeVM, hard_kill

ROOT = Path(__file__).resolve().parents[1]
K64 = 64 * 1024


@pytest.fixture
def vm(tmp_path):
    (tmp_path / "vm").mkdir()
    v = FakeVM(tmp_path / "vm", disks=2).start()
    try:
        yield v
    finally:
        v.stop()


def assert_clean(vm: FakeVM, work: Path):
    assert sorted(vm.exports()) == ["guest", "guest1"]
    assert vm.pyvbak_nodes() == [] and vm.pyvbak_objects() == [] and vm.jobs() == []
    assert not work.exists() or list(work.iterdir()) == []



def test_uri_with_several_disks():
    assert parse_qemu_uri_disks("qemu:///run/q.sock?node=a&node=b") == (
        "/run/q.sock", [DiskSelector("node", "a"), DiskSelector("node", "b")])
    # nodes and devices mixed keep the URI's order; no parameter means every disk
    assert parse_qemu_uri_disks("qemu:///q.sock?device=vda&node=b&device=vdc")[1] == [
        DiskSelector("device", "vda"), DiskSelector("node", "b"), DiskSelector("device", "vdc")]
    assert parse_qemu_uri_disks("qemu:///q.sock") == ("/q.sock", [])
    assert disk_names("qemu:///run/q.sock?node=a&node=b") == ["a", "b"]
    assert disk_names("qemu:///run/q.sock?device=virtio-disk0&node=b") == ["virtio-disk0", "b"]
    assert disk_names("qemu:///run/q.sock?node=a", "sda") == ["sda"]
    for bad in ("qemu:///q.sock?node=a&node=a", "qemu:///q.sock?node=a&node=", "qemu:///q.sock?device=",
                "qemu:///q.sock?node=#block12", "qemu:///q.sock?disk=a"):
        with pytest.raises(UsageError):
            parse_qemu_uri_disks(bad)
    with pytest.raises(UsageError, match="drop --disk"):
        disk_names("qemu:///run/q.sock?node=a&node=b", "sda")


def test_the_disks_are_frozen_at_one_instant(vm, tmp_path):
    """The guest writes a counter to disk0 and then to disk1, over and over, while the
    session is set up.  Whatever instant the views are taken at, disk1 can never be
    ahead of disk0 nor behind it by more than the one write in flight."""
    work = tmp_path / "work"
    stop = threading.Event()
    count = [0]

    def guest():
        k = 0
        while not stop.is_set():
            k += 1
            vm.write(0, struct.pack("<Q", k) * (4096 // 8), disk=0)
            vm.write(0, struct.pack("<Q", k) * (4096 // 8), disk=1)
            count[0] = k

    t = threading.Thread(target=guest)
    t.start()
    try:
        wait_until(lambda: count[0] >= 3, what="guest writes")
        with QemuHotBackup(vm.all_disks_uri, previous_states={}, work_dir=work) as s:
            assert [d.node for d in s.disks] == ["disk0", "disk1"]
            at_entry = count[0]
            wait_until(lambda: count[0] >= at_entry + 5, what="guest writes after the instant")
            seen = []
            for d in s.disks:
                with NbdSource(d.nbd_uri) as src:
                    seen.append(struct.unpack("<Q", src.read(0, 8))[0])
                d.commit()
    finally:
        stop.set()
        t.join()
    k0, k1 = seen
    assert k1 in (k0, k0 - 1), seen
    assert k0 <= at_entry + 1  # frozen before the writes made after the set-up
    assert struct.unpack("<Q", vm.read(0, 8, disk=1))[0] == count[0]  # the guest lost nothing
    assert_clean(vm, work)


def test_cli_backs_up_every_disk_with_its_own_bitmap(vm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(2 * MiB), disk=0)
    vm.write(4 * MiB, os.urandom(MiB), disk=1)

    first = cli_json(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db"])
    assert [r["disk"] for r in first] == ["disk0", "disk1"]
    group = first[0]["consistency_group"]
    assert group["disks"] == ["disk0", "disk1"] and first[1]["consistency_group"] == group
    assert all(r["cbt"] is False for r in first)

    vm.write(K64, os.urandom(K64), disk=0)
    vm.write(8 * MiB, os.urandom(2 * K64), disk=1)
    second = cli_json(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db"])
    assert [(r["cbt"], r["changed_blocks"], r["bytes_read"]) for r in second] == [(True, 1, K64), (True, 2, 2 * K64)]
    assert second[0]["consistency_group"]["id"] != group["id"]

    snaps = cli_json(capsys, ["snapshots", "--repo", repo, "--vm", "db"])
    assert sorted(s["disk"] for s in snaps) == ["disk0", "disk0", "disk1", "disk1"]
    assert sorted(s["id"] for s in snaps if s["consistency_group"]["id"] == group["id"]) == sorted(r["id"] for r in first)
    capsys.readouterr()
    assert main(["snapshots", "--repo", repo, "--vm", "db"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].endswith("GROUP") and sum(group["id"].rsplit("-", 1)[1] in line for line in listing) == 2
    import subprocess

    for i, disk in enumerate(("disk0", "disk1")):
        out = tmp_path / f"{disk}.img"
        assert main(["restore", f"db/{disk}@latest", str(out), "--repo", repo]) == 0
        assert out.read_bytes() == vm.read(0, vm.size, disk=i)
        sh_out = tmp_path / f"{disk}-sh.img"  # and without pyvbak (group metadata and all)
        p = subprocess.run(["sh", os.path.join(repo, "restore.sh"), f"db/{disk}@latest", str(sh_out)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert sh_out.read_bytes() == out.read_bytes()
    assert_clean(vm, tmp_path / "work")

    # a group restore over an older one (--force) that cannot read its second disk's index
    # changes nothing: it once replaced disk0 and left disk1 from the other instant
    outdir = tmp_path / "group"
    assert main(["restore", first[0]["id"], f"{outdir}/", "--repo", repo]) == 0
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}
    index1 = os.path.join(repo, "snapshots", f"{second[1]['id']}.index")
    saved = open(index1, "rb").read()
    os.chmod(index1, 0o644)
    os.truncate(index1, 10)
    capsys.readouterr()
    assert main(["restore", "db@latest", f"{outdir}/", "--repo", repo, "--force"]) != 0
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before
    open(index1, "wb").write(saved)
    # nor does one whose second disk fails while it is written: the first disk's complete
    # file once replaced the old one before the second failed
    import pyvbak.repo.restore as restore_mod
    from pyvbak.errors import IntegrityError

    real, calls = restore_mod.restore_snapshot, []

    def second_fails(repo_, snap, *a, **kw):
        calls.append(snap.disk)
        if len(calls) == 2:
            raise IntegrityError("restore of snapshot x failed: block in pack y… does not match its digest")
        return real(repo_, snap, *a, **kw)

    monkeypatch.setattr(restore_mod, "restore_snapshot", second_fails)
    assert main(["restore", "db@latest", f"{outdir}/", "--repo", repo, "--force"]) == IntegrityError.exit_code
    assert calls == ["disk0", "disk1"] and {p.name: p.read_bytes() for p in outdir.iterdir()} == before
    monkeypatch.setattr(restore_mod, "restore_snapshot", real)
    os.chmod(outdir / "disk0.img", 0o640)  # what the files were stays: mode (and owner)
    assert main(["restore", "db@latest", f"{outdir}/", "--repo", repo, "--force"]) == 0
    assert [(outdir / f"disk{i}.img").read_bytes() == vm.read(0, vm.size, disk=i) for i in (0, 1)] == [True, True]
    assert stat.S_IMODE(os.stat(outdir / "disk0.img").st_mode) == 0o640

    capsys.readouterr()
    assert main(["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db", "--disk", "x"]) == UsageError.exit_code
    assert "drop --disk" in capsys.readouterr().err

    # forgetting one disk's half of a group says what that breaks; both halves: nothing to say
    assert main(["forget", first[0]["id"], "--repo", repo]) == 0
    err = capsys.readouterr().err
    assert f"consistency group {group['id']} keeps db/disk1" in err and "db@latest DIR/" in err
    assert main(["forget", second[0]["id"], second[1]["id"], "--repo", repo]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_failing_disk_keeps_the_ones_before_it_and_loses_no_write(vm, tmp_path, capsys, monkeypatch):
    """disk1's backup fails after disk0's snapshot was committed: disk0 keeps its new
    bitmap generation (its snapshot is durable), disk1's bits are merged back, the
    output names what was kept, and the next run is incremental on both."""
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    first = cli_json(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db"])
    at_first = [vm.read(0, vm.size, disk=i) for i in (0, 1)]
    vm.write(0, os.urandom(K64), disk=0)
    vm.write(MiB, os.urandom(K64), disk=1)

    import pyvbak.engine.backup as engine

    real = engine.run_backup

    def failing_on_disk1(repo_, src, **kw):
        if kw["disk"] == "disk1":
            vm.write(2 * MiB, os.urandom(K64), disk=1)  # a guest write during the failed backup
            raise SourceError("simulated read failure on disk1")
        return real(repo_, src, **kw)

    monkeypatch.setattr(engine, "run_backup", failing_on_disk1)
    capsys.readouterr()
    assert main(["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db"]) == 4
    err = capsys.readouterr().err
    assert "simulated read failure" in err and "db/disk0 snapshot" in err
    assert_clean(vm, tmp_path / "work")
    monkeypatch.setattr(engine, "run_backup", real)

    # the VM's newest complete group is still the first one: disk0's newer snapshot was
    # frozen with a disk1 that has none, so restoring the VM takes the first group whole
    vmdir = tmp_path / "vm-restore"
    restored = cli_json(capsys, ["restore", "db@latest", f"{vmdir}/", "--repo", repo])
    assert [r["snapshot"] for r in restored] == [r["id"] for r in first]
    assert {r["consistency_group"] for r in restored} == {first[0]["consistency_group"]["id"]}
    assert [(vmdir / f"disk{i}.img").read_bytes() for i in (0, 1)] == at_first
    capsys.readouterr()
    assert main(["restore", "db@latest", str(vmdir), "--repo", repo]) == 7  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["restore", "db@latest", str(tmp_path / "one.img"), "--repo", repo]) == 2
    assert "DIR/" in capsys.readouterr().err
    # a snapshot id into a directory: the whole group it belongs to, or why not
    again_dir = tmp_path / "by-id"
    by_id = cli_json(capsys, ["restore", first[1]["id"], f"{again_dir}/", "--repo", repo])
    assert [r["snapshot"] for r in by_id] == [r["id"] for r in first]
    partial = [s for s in cli_json(capsys, ["snapshots", "--repo", repo, "--vm", "db", "--disk", "disk0"])
               if s["id"] not in {r["id"] for r in first}]
    assert main(["restore", partial[0]["id"], f"{tmp_path / 'partial'}/", "--repo", repo]) == 5
    assert "lacks the snapshot(s) of disk1" in capsys.readouterr().err
    # retention keeps the newest complete group even though disk0 has a newer snapshot:
    # counting per disk alone would forget disk0's half of the only consistent set
    kept = cli_json(capsys, ["forget", "--keep-last", "1", "--vm", "db", "--repo", repo])
    assert kept["forgotten"] == []

    again = cli_json(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db"])
    assert [(r["disk"], r["cbt"], r["changed_blocks"]) for r in again] == [("disk0", True, 0), ("disk1", True, 2)]
    # now a newer complete group exists: the first one and the failed run's half go
    gone = cli_json(capsys, ["forget", "--keep-last", "1", "--vm", "db", "--repo", repo])
    assert len(gone["forgotten"]) == 3 and not set(gone["forgotten"]) & {r["id"] for r in again}
    for i, disk in enumerate(("disk0", "disk1")):
        out = tmp_path / f"{disk}.img"
        assert main(["restore", f"db/{disk}@latest", str(out), "--repo", repo]) == 0
        assert out.read_bytes() == vm.read(0, vm.size, disk=i)


def test_qemu_gone_after_the_first_disk_committed_says_which_disks_got_no_snapshot(vm, tmp_path, capsys, monkeypatch):
    """The error line said "no snapshot was made" right below the line naming disk0's
    kept snapshot (session 26's audit)."""
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(K64), disk=0)
    disk0 = vm.read(0, vm.size, disk=0)

    import pyvbak.engine.backup as engine

    real = engine.run_backup

    def qemu_dies_before_disk1(repo_, src, **kw):
        if kw["disk"] == "disk1":
            hard_kill(vm.proc.pid)
            vm.proc.wait(10)
        return real(repo_, src, **kw)

    monkeypatch.setattr(engine, "run_backup", qemu_dies_before_disk1)
    capsys.readouterr()
    assert main(["backup", vm.all_disks_uri, "--repo", repo, "--vm", "db"]) == 4
    kept, error = capsys.readouterr().err.splitlines()
    assert kept.startswith("backed up and kept before the failure: db/disk0 snapshot "), kept
    assert "went away during the backup" in error and ": no snapshot of disk1 was made;" in error, error
    assert "no snapshot was made" not in error, error
    monkeypatch.setattr(engine, "run_backup", real)
    assert main(["restore", "db/disk0@latest", str(tmp_path / "d0.img"), "--repo", repo]) == 0
    assert (tmp_path / "d0.img").read_bytes() == disk0


CHILD = """
import sys, json
from pyvbak.hypervisors.qemu import QemuHotBackup
uri, work = sys.argv[1], sys.argv[2]
with QemuHotBackup(uri, previous_states=json.loads(sys.argv[3]), work_dir=work) as s:
    print("READY", flush=True)
    sys.stdin.read()
"""


def test_kill9_of_a_multi_disk_run_is_cleaned_by_the_next_one(vm, tmp_path):
    work = tmp_path / "work"
    with QemuHotBackup(vm.all_disks_uri, previous_states={}, work_dir=work) as s1:
        for d in s1.disks:
            d.commit()
    states = {d.node: d.change_tracking_state for d in s1.disks}
    vm.write(0, b"a" * K64, disk=0)
    vm.write(0, b"b" * K64, disk=1)
    p = subprocess.Popen([sys.executable, "-c", CHILD, vm.all_disks_uri, str(work), json.dumps(states)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WATCHDOG="0"))
    assert p.stdout.readline().startswith("READY")
    vm.write(MiB, b"c" * K64, disk=1)  # after the killed run's instant
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdin.close()
    p.stdout.close()
    assert len(vm.exports()) == 4 and len(vm.jobs()) == 2

    with QemuHotBackup(vm.all_disks_uri, previous_states=states, work_dir=work) as s:
        cleaned = " | ".join(s.cleaned_leftovers)
        assert cleaned.count("fleecing node") == 2 and cleaned.count("fleecing backup job") == 2
        assert "merged back into pyvbak-gen-1" in untokened(cleaned)
        extents = []
        for d in s.disks:
            assert d.fallback_reason is None
            with NbdSource(d.nbd_uri, dirty_bitmap=d.dirty_bitmap) as src:
                extents.append(src.change_tracking(states[d.node]).extents)
            d.commit()
    assert extents == [[(0, K64)], [(0, K64), (MiB, K64)]]
    assert_clean(vm, work)


class _QueryBlockOnly:
    """What resolve() asks of QEMU, for naming alone: query-block's devices."""

    def __init__(self, blocks):
        self.blocks = blocks

    def execute(self, command, **kw):
        assert command == "query-block"
        return self.blocks


def test_two_disks_that_would_share_a_name_are_refused():
    """?node=a&device=a, where device a is another node's: both were named 'a', and the
    second disk's snapshot was made on top of the first's - its data."""
    from pyvbak.errors import SourceError
    from pyvbak.hypervisors.qemu.vm_disks import resolve

    qmp = _QueryBlockOnly([
        {"device": "", "qdev": "/machine/peripheral/x/virtio-backend", "inserted": {"node-name": "a"}},
        {"device": "", "qdev": "/machine/peripheral/a/virtio-backend", "inserted": {"node-name": "b"}},
    ])
    with pytest.raises(SourceError, match="would share a name .'a': node a, node b"):
        resolve(qmp, "/q.sock", [DiskSelector("node", "a"), DiskSelector("device", "a")], {"a", "b"})
    # a QOM path names the device by its id, as docs/QEMU.md says (it became the disk name,
    # slashes and all, which no disk name may hold)
    (disk,) = resolve(qmp, "/q.sock", [DiskSelector("device", "/machine/peripheral/a/virtio-backend")], {"a", "b"})
    assert disk.name == "a" and disk.node == "b"
    # the default (every guest disk): a drive id and another device's id colliding
    clash = _QueryBlockOnly([
        {"device": "vd", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend", "inserted": {"node-name": "n1"}},
        {"device": "", "qdev": "/machine/peripheral/vd/virtio-backend", "inserted": {"node-name": "n2"}},
    ])
    with pytest.raises(SourceError, match="would share a name"):
        resolve(clash, "/q.sock", [], {"n1", "n2"})


KILLED_MULTIDISK_RUN = r"""
import json, sys, time
from pyvbak.hypervisors.qemu import QemuHotBackup
with QemuHotBackup(sys.argv[1], previous_states=json.loads(sys.argv[3]), work_dir=sys.argv[2]) as s:
    print("READY", flush=True)
    time.sleep(60)
"""


def test_a_backup_of_some_disks_leaves_the_killed_runs_evidence_for_the_others(tmp_path):
    """A two-disk run killed after its rotation, then a backup of disk0 alone (a data disk
    on its own schedule): its cleanup removed the killed run's journal, the only evidence
    that the run disabled disk1's bitmap itself, and disk1's next backup scanned the whole
    disk.  The journal now stays until every disk it names is
    settled."""
    work = tmp_path / "work"
    vm = FakeVM(tmp_path / "vm", disks=2).start()
    try:
        with QemuHotBackup(vm.all_disks_uri, previous_states={}, work_dir=work) as s:
            for d in s.disks:
                d.commit()
        states = {d.name: dict(d.change_tracking_state) for d in s.disks}
        p = subprocess.Popen([sys.executable, "-c", KILLED_MULTIDISK_RUN, vm.all_disks_uri, str(work),
                              json.dumps(states)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
                                      PYVBAK_WATCHDOG="0"))
        assert p.stdout.readline().startswith("READY")
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
        with QemuHotBackup(vm.all_disks_uri.split("?")[0] + "?node=disk0", previous_state=states["disk0"],
                           work_dir=work) as s:
            assert s.fallback_reason is None, s.fallback_reason
            s.commit()
        states["disk0"] = s.change_tracking_state
        assert [f for f in work.iterdir() if f.name.endswith(".json")], "the killed run's journal is gone"
        with QemuHotBackup(vm.all_disks_uri, previous_states=states, work_dir=work) as s:
            assert [d.fallback_reason for d in s.disks] == [None, None]
            for d in s.disks:
                d.commit()
        assert not list(work.iterdir())  # used, the journal went
    finally:
        vm.stop()
