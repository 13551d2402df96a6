"""`pyvbak cbt-off`: pyvbak's dirty bitmaps removed from a running VM's disks and from a
qcow2 image, the next backup then reading the disk whole; what it refuses."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from images import untokened
from pyvbak.cli.main import main
from qemu_vm import MiB, FakeVM


@pytest.fixture
def vm(tmp_path):
    with FakeVM(tmp_path / "vm", size=16 * MiB, disks=2) as v:
        yield v


def _run(capsys, argv) -> tuple[int, object, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else out), err


def test_off_on_a_running_vm_then_the_next_backup_reads_whole(vm, tmp_path, capsys, cli_work_dir):
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(MiB))
    code, first, err = _run(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "web", "--json"])
    assert code == 0, err
    assert set(vm.bitmaps("disk0")) == set(vm.bitmaps("disk1")) == {"pyvbak-gen-1"}

    # one disk, by node
    code, out, err = _run(capsys, ["cbt-off", f"{vm.uri}", "--json"])
    assert code == 0, err
    assert untokened(out["removed"]) == ["removed dirty bitmap pyvbak-gen-1 from disk disk0 (node 'disk0')"]
    assert vm.bitmaps("disk0") == {} and set(vm.bitmaps("disk1")) == {"pyvbak-gen-1"}
    assert vm.pyvbak_nodes() == [] and vm.pyvbak_objects() == []  # the session lock is released

    vm.write(4 * MiB, os.urandom(64 * 1024))
    code, second, err = _run(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "web", "--json"])
    assert code == 0, err
    by_disk = {r["disk"]: r for r in second}
    assert not by_disk["disk0"]["cbt"] and "gone" in by_disk["disk0"]["fallback_reason"]
    assert by_disk["disk1"]["cbt"]  # the other disk kept its tracking
    out_img = tmp_path / "disk0.img"
    assert main(["restore", "web/disk0@latest", str(out_img), "--repo", repo]) == 0
    assert out_img.read_bytes() == vm.read(0, vm.size)

    # nothing left to remove says so
    code, out, err = _run(capsys, ["cbt-off", vm.uri])
    assert code == 0 and "removed dirty bitmap pyvbak-gen-2" in untokened(out)
    code, out, err = _run(capsys, ["cbt-off", vm.uri])
    assert code == 0 and "no dirty bitmap of pyvbak's" in out


@pytest.mark.parametrize("name", ["disk.qcow2", "disk.img"])  # by its name, or --format qcow2
def test_off_on_a_qcow2_image(tmp_path, capsys, name):
    img = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    for bitmap in ("pyvbak-gen-3", "pyvbak-gen-4", "someone-elses"):
        subprocess.run(["qemu-img", "bitmap", "--add", "-f", "qcow2", str(img), bitmap], check=True)
    before = img.read_bytes()
    if name == "disk.img":  # a header alone is no qcow2: a guest's raw disk may hold one
        code, _, err = _run(capsys, ["cbt-off", str(img)])
        assert code != 0 and "pass --format qcow2" in err and len(err.strip().splitlines()) == 1, err
        assert img.read_bytes() == before
    code, out, err = _run(capsys, ["cbt-off", str(img), "--json"] + (["--format", "qcow2"] if name == "disk.img" else []))
    assert code == 0, err
    assert out["removed"] == [f"removed dirty bitmap pyvbak-gen-3 from {img}", f"removed dirty bitmap pyvbak-gen-4 from {img}"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)], check=True,
                                     capture_output=True, text=True).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["someone-elses"]


def test_off_on_a_qcow2_named_relatively_with_a_colon(tmp_path, capsys, monkeypatch):
    """``a:b.qcow2`` handed to qemu-img as given is protocol 'a' to QEMU ("Unknown
    protocol"), and ``./a:b.qcow2`` too once pathlib dropped its "./";
    backups already named it absolutely."""
    monkeypatch.chdir(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "./a:b.qcow2", "4M"], check=True)
    for name in ("a:b.qcow2", "./a:b.qcow2"):
        subprocess.run(["qemu-img", "bitmap", "--add", "-f", "qcow2", "./a:b.qcow2", "pyvbak-gen-1"], check=True)
        code, out, err = _run(capsys, ["cbt-off", name])
        assert code == 0 and "removed dirty bitmap pyvbak-gen-1" in untokened(out), err


@pytest.mark.parametrize("source, needle", [
    ("/nonexistent/disk.qcow2", "does not exist"),
    ("/dev/null", "has no change tracking of pyvbak's"),
    ("qemu:///nonexistent/qmp.sock", "nonexistent/qmp.sock"),
    # a URI of a scheme pyvbak does not read, refused as a backup refuses it (it was taken
    # for a missing image file: "image http:/h/disk.qcow2 does not exist")
    ("http://h/disk.qcow2", "unsupported source 'http://'"),
    ("nbd://h/export", "has no change tracking of pyvbak's"),
])
def test_what_it_refuses(capsys, source, needle):
    code, _, err = _run(capsys, ["cbt-off", source])
    assert code != 0 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_raw_image_named_qcow2_is_refused(tmp_path, capsys):
    img = tmp_path / "disk.qcow2"
    img.write_bytes(bytes(MiB))
    code, _, err = _run(capsys, ["cbt-off", str(img)])
    assert code != 0 and "is not a qcow2 image" in err, err


def test_refused_while_a_backup_session_holds_the_vm(tmp_path, capsys, cli_work_dir):
    """Through a second monitor (QEMU serves one client per QMP socket): the VM's session
    lock stops it, and the running session's bitmap is untouched."""
    from pyvbak.hypervisors.qemu import QemuHotBackup

    with FakeVM(tmp_path / "vm", extra_monitors=1) as vm:
        with QemuHotBackup(vm.uri, previous_state=None, work_dir=tmp_path / "other-work"):
            code, _, err = _run(capsys, ["cbt-off", f"qemu://{vm.extra_qmp_paths[0]}?node=disk0"])
            assert code != 0 and "another pyvbak session" in err and "Traceback" not in err, err
            assert len(err.strip().splitlines()) == 1
            assert set(vm.bitmaps("disk0")) == {"pyvbak-gen-1"}  # untouched
        assert vm.pyvbak_nodes() == [] and vm.pyvbak_objects() == []


def test_messages_of_a_multi_disk_backup_name_their_disk_and_cbt_off_advice_fits(vm, tmp_path, capsys, cli_work_dir):
    """Found by a user walk-through: two identical fallback warnings of a two-disk backup
    did not say which disk each was about; cbt-off of the running VM's locked qcow2 advised
    a backup URI; --verify-cbt said nothing when the bitmap had missed nothing; a regular
    file given as the QMP socket was "a stopped VM's stale socket"."""
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(MiB))
    code, out, err = _run(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "web"])
    assert code == 0 and "warning:" not in err, err  # (a disk's first backup reads it all: no warning)
    code, out, err = _run(capsys, ["cbt-off", vm.all_disks_uri])
    assert code == 0, err
    code, out, err = _run(capsys, ["backup", vm.all_disks_uri, "--repo", repo, "--vm", "web"])
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert sorted(w.split(":")[1].strip() for w in warnings) == ["web/disk0", "web/disk1"], err
    vm.write(64 * 1024, os.urandom(64 * 1024))
    code, out, err = _run(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web", "--verify-cbt"])
    assert code == 0 and "change tracking verified: the full scan found no block it had missed" in err, err

    code, out, err = _run(capsys, ["cbt-off", str(vm.image)])
    assert code != 0 and "pyvbak cbt-off 'qemu:///" in err and "back up" not in err, err

    not_a_socket = tmp_path / "qsd.log"
    not_a_socket.write_text("log")
    code, out, err = _run(capsys, ["backup", f"qemu://{not_a_socket}?node=disk0", "--repo", repo, "--vm", "x"])
    assert code != 0 and "is a regular file, not a socket" in err and "not running" not in err, err
