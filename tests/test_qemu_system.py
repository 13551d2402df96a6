"""Hot backups of a real QEMU VM's guest disks, named the way users know them.

``qemu:///SOCK`` backs up every disk of the VM (its guest block devices that hold a
medium and are not removable), ``?device=ID`` one guest device; a device is resolved to
its block node by every run, so disks whose nodes have generated names (``-drive``)
can be backed up, and their dirty bitmaps still found after a restart renames the nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvbak.cli.main import main
from pyvbak.errors import SourceError
from pyvbak.hypervisors import disk_names
from qemu_system import MiB, QemuSystemVM

K64 = 64 * 1024


@pytest.fixture
def vm(tmp_path):
    (tmp_path / "vm").mkdir()
    v = QemuSystemVM(tmp_path / "vm").start()
    try:
        yield v
    finally:
        v.stop()



def _run(capsys, argv) -> tuple[int, object, str]:
    capsys.readouterr()
    code = main(argv + ["--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.strip() else None), err


def assert_clean(vm: QemuSystemVM, cli_work_dir: Path):
    assert vm.pyvbak_traces() == []
    assert not cli_work_dir.exists() or list(cli_work_dir.iterdir()) == []


def test_every_disk_of_the_vm_by_default(vm, cli_work_dir, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write_pattern("virtio-disk0", 0, MiB, 0x11)
    vm.write_pattern("data", 2 * MiB, MiB, 0x22)
    vm.write_pattern("pflash1", 0, 4096, 0x5A)
    # neither the CD-ROM drive nor the read-only firmware flash is a disk to back up; the
    # writable UEFI variable store is (VM state)
    assert disk_names(vm.uri) == ["data", "pflash1", "virtio-disk0"]

    code, first, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    assert [r["disk"] for r in first] == ["data", "pflash1", "virtio-disk0"]
    assert len({r["consistency_group"]["id"] for r in first}) == 1
    assert all(not r["cbt"] for r in first)
    assert_clean(vm, cli_work_dir)
    # each disk now carries exactly one generation of pyvbak's bitmap, recording; the raw
    # flash's lives in QEMU's memory (it cannot be stored in a raw image)
    assert all(list(vm.bitmaps(d)) == ["pyvbak-gen-1"] for d in ("virtio-disk0", "data", "pflash1"))
    assert vm.bitmaps("data")["pyvbak-gen-1"]["persistent"] and not vm.bitmaps("pflash1")["pyvbak-gen-1"]["persistent"]

    vm.write_pattern("virtio-disk0", 4 * MiB, K64, 0x33)
    vm.write_pattern("data", 0, 2 * K64, 0x44)
    vm.write_pattern("pflash1", 128 * 1024, 100, 0x6B)
    code, second, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    assert [(r["disk"], r["cbt"], r["changed_blocks"], r["bytes_read"]) for r in second] == [
        ("data", True, 2, 2 * K64), ("pflash1", True, 1, K64), ("virtio-disk0", True, 1, K64)]
    assert_clean(vm, cli_work_dir)

    out = tmp_path / "restored"
    code, restored, err = _run(capsys, ["restore", "web@latest", f"{out}/", "--repo", repo])
    assert code == 0, err
    for device in ("virtio-disk0", "data", "pflash1"):
        assert (out / f"{device}.img").read_bytes() == vm.read_disk(device, tmp_path / f"{device}.now")


def test_one_device_and_what_a_wrong_name_gets(vm, cli_work_dir, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write_pattern("data", 0, MiB, 0x55)
    # a -drive disk: its node has a generated name, which a URI cannot even spell
    assert vm.node_of("data").startswith("#")
    code, res, err = _run(capsys, ["backup", f"{vm.uri}?device=data", "--repo", repo, "--vm", "web"])
    assert code == 0, err
    assert res["disk"] == "data"
    code, _, err = _run(capsys, ["backup", f"{vm.uri}?device=data", "--repo", repo, "--vm", "web", "--disk", "vdb"])
    assert code == 0, err

    for uri, needle in ((f"{vm.uri}?device=nope", "has no disk device 'nope'; its block devices: cd0, data, pflash0, pflash1, virtio-disk0"),
                        (f"{vm.uri}?device=cd0", "has no medium inserted"),
                        (f"{vm.uri}?node=nope", "no block node named 'nope'")):
        code, _, err = _run(capsys, ["backup", uri, "--repo", repo, "--vm", "web"])
        assert code != 0 and needle in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, ["backup", f"{vm.uri}?node=%23block1", "--repo", repo, "--vm", "web"])
    assert code != 0 and "no block node named '#block1'" in err and "?device=ID" in err
    # a read-only device is backed up when named; its bitmap (raw: in QEMU's memory) then
    # tracks it like any other (a firmware update through QEMU would show up)
    code, res, err = _run(capsys, ["backup", f"{vm.uri}?device=pflash0", "--repo", repo, "--vm", "web"])
    assert code == 0 and res["disk"] == "pflash0" and res["size"] == 2 * MiB and not res["cbt"], err
    code, res, err = _run(capsys, ["backup", f"{vm.uri}?device=pflash0", "--repo", repo, "--vm", "web"])
    assert code == 0 and res["cbt"] and res["changed_blocks"] == 0 and res["bytes_read"] == 0, (res, err)
    code, _, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web", "--disk", "x"])
    assert code == 2 and "drop --disk" in err
    assert_clean(vm, cli_work_dir)


def test_bitmaps_are_found_again_after_a_restart_renames_the_nodes(vm, cli_work_dir, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write_pattern("data", 0, MiB, 0x66)
    code, first, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    node_before = vm.node_of("data")

    vm.quit()  # an orderly shutdown stores the persistent bitmaps in the qcow2 images
    vm.start(create=False, spare_drives=2)  # a changed definition: other generated names
    assert vm.node_of("data") != node_before
    vm.write_pattern("data", 3 * MiB, K64, 0x77)
    code, second, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    assert [r["disk"] for r in second] == ["data", "pflash1", "virtio-disk0"]  # not the spare drives no device uses
    by_disk = {r["disk"]: r for r in second}
    assert by_disk["data"]["cbt"] and by_disk["data"]["changed_blocks"] == 1, by_disk["data"]
    assert by_disk["virtio-disk0"]["cbt"] and by_disk["virtio-disk0"]["changed_blocks"] == 0
    # the raw flash's bitmap lived in the QEMU that quit: read whole once, and why
    assert not by_disk["pflash1"]["cbt"] and "QEMU was restarted" in by_disk["pflash1"]["fallback_reason"]
    assert_clean(vm, cli_work_dir)

    out = tmp_path / "data.img"
    assert main(["restore", "web/data@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read_disk("data", tmp_path / "data.now")


def test_a_vm_without_guest_disks_is_told_to_name_nodes(tmp_path, cli_work_dir, capsys):
    from qemu_vm import FakeVM

    (tmp_path / "sd").mkdir()
    v = FakeVM(tmp_path / "sd").start()
    try:
        with pytest.raises(SourceError, match=r"no guest disks to back up .*\?node=NODE \(named nodes: .*disk0"):
            disk_names(f"qemu://{v.qmp_path}")
    finally:
        v.stop()


def test_the_backup_is_the_disks_at_one_instant_while_the_guest_writes(vm, tmp_path):
    """Writes through the devices after the session froze the disks reach the live disks
    and not the frozen views; afterwards the live disks hold every write."""
    from pyvbak.hypervisors.qemu import QemuHotBackup
    from pyvbak.sources.nbd import NbdSource

    vm.write_pattern("virtio-disk0", 0, MiB, 0xA1)
    vm.write_pattern("data", 0, MiB, 0xA2)
    with QemuHotBackup(vm.uri, previous_states={}, work_dir=tmp_path / "work") as s:
        vm.write_pattern("virtio-disk0", 0, K64, 0xB1)   # over frozen data: copied before written
        vm.write_pattern("data", 5 * MiB, K64, 0xB2)     # over a never-written area
        views = {}
        for d in s.disks:
            with NbdSource(d.nbd_uri) as src:
                views[d.name] = src.read(0, vm.size)
    assert views["virtio-disk0"][:MiB] == b"\xa1" * MiB
    assert views["data"][:MiB] == b"\xa2" * MiB and views["data"][5 * MiB : 5 * MiB + K64] == bytes(K64)
    now = vm.read_disk("virtio-disk0", tmp_path / "d0.now")
    assert now[:K64] == b"\xb1" * K64 and now[K64:MiB] == b"\xa1" * (MiB - K64)
    assert vm.read_disk("data", tmp_path / "data.now")[5 * MiB : 5 * MiB + K64] == b"\xb2" * K64
    assert vm.pyvbak_traces() == []


KILLED_CHILD = """
import sys
from pyvbak.hypervisors.qemu import QemuHotBackup
from pyvbak.repo.repository import Repository
repo = Repository.open(sys.argv[3])
states = {d: repo.latest("web", d).meta["change_tracking"]["state"] for d in ("data", "pflash1", "virtio-disk0")}
with QemuHotBackup(sys.argv[1], previous_states=states, work_dir=sys.argv[2]) as s:
    print("READY", flush=True)
    sys.stdin.read()
"""


def test_after_a_kill9_the_next_run_finds_the_devices_under_the_leftover_filters(vm, cli_work_dir, tmp_path, capsys):
    """A killed run leaves its copy-before-write filters as the root nodes of the devices'
    drives; the next run must clean them before it asks which node each device reads."""
    import os
    import signal
    import subprocess
    import sys

    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write_pattern("data", 0, MiB, 0x31)
    code, first, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    p = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, vm.uri, str(cli_work_dir), repo], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYVBAK_WATCHDOG="0"))
    try:
        assert p.stdout.readline().startswith("READY")
        assert vm.node_of("virtio-disk0").startswith("pyvbak-")  # the filter stands above the disk
        vm.write_pattern("virtio-disk0", 2 * MiB, K64, 0x32)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdin.close()
        p.stdout.close()

    code, second, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    # the killed run's new bitmap generation was merged back: no write was lost from tracking
    assert [(r["disk"], r["cbt"], r["changed_blocks"], r["fallback_reason"]) for r in second] == [
        ("data", True, 0, None), ("pflash1", True, 0, None), ("virtio-disk0", True, 1, None)]
    assert any("fleecing node" in line for line in second[0]["cleaned_leftovers"])
    assert vm.node_of("virtio-disk0") == "disk0" and vm.pyvbak_traces() == []
    out = tmp_path / "restored"
    assert main(["restore", "web@latest", f"{out}/", "--repo", repo]) == 0
    for device in ("data", "pflash1", "virtio-disk0"):
        assert (out / f"{device}.img").read_bytes() == vm.read_disk(device, tmp_path / f"{device}.now")


def test_a_device_named_by_its_id_or_by_its_qom_path_keeps_one_change_tracking_chain(vm, cli_work_dir, tmp_path,
                                                                                   capsys):
    """Both spellings name one device and one disk name, but each switch between them
    fell back to a full scan: "the previous backup was of device 'virtio-disk0', not
    '/machine/peripheral/virtio-disk0/virtio-backend'" (session 26's audit)."""
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    qom = "/machine/peripheral/virtio-disk0/virtio-backend"
    code, res, err = _run(capsys, ["backup", f"{vm.uri}?device=virtio-disk0", "--repo", repo, "--vm", "web"])
    assert code == 0 and res["disk"] == "virtio-disk0", err
    for spelling in (qom, "virtio-disk0", qom):
        code, res, err = _run(capsys, ["backup", f"{vm.uri}?device={spelling}", "--repo", repo, "--vm", "web"])
        assert code == 0 and res["disk"] == "virtio-disk0", err
        assert res["cbt"] and res["fallback_reason"] is None and res["bytes_read"] == 0, (spelling, res)
    assert_clean(vm, cli_work_dir)
