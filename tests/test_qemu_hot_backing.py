"""A running VM's disk with a backing image: one QEMU opened under another path than the
overlay's header names (libvirt's -blockdev by node; here a symlinked directory), whose
node must still be found, or a write into its flat extent goes unseen; one whose data
file QEMU found relative to its own working directory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import cli_json, require_tool, wait_until
from pyvbak.cli.main import main
from qemu_vm import MiB, Qmp, stop_qemu


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@contextlib.contextmanager
def running_vm(tmp_path: Path, base_driver: str, base_path: Path, disk_path: Path, cwd: Path, *,
               base_options: str = "", extra: tuple[str, ...] = (), top_filter: str | None = None,
               above: tuple[str, ...] = (), guest_node: str | None = None):
    """A stand-in VM (qemu-storage-daemon started in ``cwd``) whose disk ``disk_path`` (a
    qcow2, node ``disk0``) reads through the backing image ``base_path`` opened by node
    (``base_options``: more of that node's options; ``extra``: more daemon arguments, before
    it): yields (its QMP socket, the guest's writable FUSE file).  ``top_filter``: the guest
    writes through a filter node ``top`` of that driver above the disk; ``above``: more
    daemon arguments after the disk's node (nodes over it), ``guest_node`` the one the guest
    writes through then."""
    require_tool("qemu-storage-daemon", "qemu-system-common")
    require_tool("fusermount3", "fuse3")
    guest = tmp_path / "guest.img"
    guest.touch()
    qmp, ctl_sock = tmp_path / "qmp.sock", tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         *extra,
         "--blockdev", f"driver=file,node-name=base-file,filename={base_path},read-only=on",
         "--blockdev", f"driver={base_driver},node-name=base,file=base-file,read-only=on{base_options}",
         "--blockdev", f"driver=file,node-name=disk0-file,filename={disk_path}",
         "--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file,backing=base",
         *(["--blockdev", f"driver={top_filter},node-name=top,file=disk0"] if top_filter else []),
         *above,
         "--chardev", f"socket,path={qmp},server=on,wait=off,id=q0", "--monitor", "chardev=q0",
         "--chardev", f"socket,path={ctl_sock},server=on,wait=off,id=c0", "--monitor", "chardev=c0",
         "--export", f"type=fuse,id=guest,node-name={guest_node or ('top' if top_filter else 'disk0')},mountpoint={guest},"
                     f"writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    ctl = None
    try:
        wait_until(lambda: proc.poll() is not None or (ctl_sock.exists() and _mounted(guest)), timeout=30,
                   what="qemu-storage-daemon")
        assert proc.poll() is None
        ctl = Qmp(ctl_sock)
        yield qmp, guest
    finally:
        stop_qemu(proc, ctl)
        if _mounted(guest):
            subprocess.run(["fusermount3", "-u", str(guest)], check=False)


def hot_backup(capsys, qmp: Path, repo: str, node: str = "disk0") -> dict:
    res = cli_json(capsys, ["backup", f"qemu://{qmp}?node={node}", "--repo", repo, "--vm", "hot"])
    return res[0] if isinstance(res, list) else res


def a_direct_write_is_seen(capsys, qmp: Path, repo: str, written: Path, expect: str, guest: Path, tmp_path: Path,
                           node: str = "disk0") -> None:
    """Back up, write 64 KiB of 0x33 at the start of ``written`` (a file QEMU reads for the
    disk, not through it), back up again: the second backup scans, saying ``expect``, and
    restores what the guest sees."""
    hot_backup(capsys, qmp, repo, node)
    with open(written, "r+b") as f:
        f.write(b"\x33" * 65536)
    res = hot_backup(capsys, qmp, repo, node)
    assert res["cbt"] is False and expect in res["fallback_reason"], res
    out = tmp_path / "out.raw"
    assert main(["restore", res["id"], str(out), "--repo", repo]) == 0
    assert out.read_bytes() == guest.read_bytes()


def test_a_write_into_a_backing_vmdks_extent_opened_by_another_path_is_seen(tmp_path, capsys, cli_work_dir):
    os.symlink(tmp_path, tmp_path / "lnk")
    run = lambda *a: subprocess.run(a, check=True, cwd=tmp_path, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "base.vmdk", "16M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 16M", "base.vmdk")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "disk.qcow2", "16M")
    with running_vm(tmp_path, "vmdk", tmp_path / "lnk" / "base.vmdk", tmp_path / "disk.qcow2", tmp_path) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0

        def write(path, offset, data):
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)

        hot_backup(capsys, qmp, repo)
        write(guest, MiB, b"\x22" * 65536)
        assert hot_backup(capsys, qmp, repo)["cbt"] is True
        write(tmp_path / "base-flat.vmdk", 4 * MiB, b"\x33" * 262144)  # into the backing image's extent
        write(guest, 8 * MiB, b"\x44" * 65536)
        res = hot_backup(capsys, qmp, repo)
        assert res["cbt"] is False and "backing chain" in res["fallback_reason"], res
        out = tmp_path / "out.raw"
        assert main(["restore", res["id"], str(out), "--repo", repo]) == 0
        assert out.read_bytes() == guest.read_bytes()


def test_a_running_vms_backing_image_with_a_relative_data_file_is_never_vouched_for(tmp_path, capsys, cli_work_dir):
    """QEMU opens a qcow2's relative data-file from its own working directory (here not the
    images' directory, which holds a same-named file): no identity pyvbak can record is
    the file QEMU reads, so the bitmap never vouches for such a chain."""
    images, qemu_cwd = tmp_path / "images", tmp_path / "qemu-cwd"
    images.mkdir()
    qemu_cwd.mkdir()
    run = lambda *a: subprocess.run(a, check=True, cwd=images, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=base.data,data_file_raw=on", "base.qcow2", "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 16M", "base.qcow2")
    (qemu_cwd / "base.data").write_bytes((images / "base.data").read_bytes())
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2", "16M")
    with running_vm(tmp_path, "qcow2", images / "base.qcow2", images / "disk.qcow2", qemu_cwd) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        hot_backup(capsys, qmp, repo)
        with open(qemu_cwd / "base.data", "r+b") as f:  # the data file QEMU reads, written directly
            f.seek(4 * MiB)
            f.write(b"\x33" * 65536)
        res = hot_backup(capsys, qmp, repo)
        # (a running VM's backing data file is never vouched for: its configuration may
        # attach another file than the header names - the next test)
        assert res["cbt"] is False and "external data file" in res["fallback_reason"], res
        out = tmp_path / "out.raw"
        assert main(["restore", res["id"], str(out), "--repo", repo]) == 0
        assert out.read_bytes()[4 * MiB:4 * MiB + 65536] == b"\x33" * 65536
        assert out.read_bytes() == guest.read_bytes()


@pytest.mark.parametrize("header", ["names-another-file", "names-none"])
def test_the_backing_file_qemu_reads_is_watched_whatever_the_header_names(tmp_path, capsys, cli_work_dir, header):
    """libvirt's -blockdev attaches a backing node by name, whatever the overlay's header
    says; a blockdev-snapshot overlay may name none.  The chain was followed by header names:
    pyvbak watched a file QEMU did not read, or none, and a write into the one it read went
    unseen (cbt true, restore != disk)."""
    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()
    run = lambda *a: subprocess.run(a, check=True, cwd=images, capture_output=True)  # noqa: E731
    for base, pattern in ((images / "base.raw", "0x11"), (other / "base.raw", "0x77")):
        run("qemu-img", "create", "-q", "-f", "raw", str(base), "16M")
        run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 16M", str(base))
    names = ["-b", "base.raw", "-F", "raw"] if header == "names-another-file" else []
    run("qemu-img", "create", "-q", "-f", "qcow2", *names, "disk.qcow2", "16M")
    with running_vm(tmp_path, "raw", other / "base.raw", images / "disk.qcow2", images) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        a_direct_write_is_seen(capsys, qmp, repo, other / "base.raw", "backing chain", guest, tmp_path)


def test_a_vm_started_with_relative_file_names_gets_the_reason_its_chain_is_not_vouched_for(tmp_path, capsys,
                                                                                            cli_work_dir):
    """QEMU reports the names it opened, relative to its own working directory (a VM started
    by hand with -hda disk.qcow2): the reason said "not a local file"."""
    run = lambda *a: subprocess.run(a, check=True, cwd=tmp_path, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "disk.qcow2", "16M")
    with running_vm(tmp_path, "raw", Path("base.raw"), Path("disk.qcow2"), tmp_path) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        hot_backup(capsys, qmp, repo)
        res = hot_backup(capsys, qmp, repo)
        assert res["cbt"] is False and "'base.raw'" in res["fallback_reason"], res
        assert "relative to the working directory" in res["fallback_reason"] and "absolute" in res["fallback_reason"]


def test_a_backing_images_data_file_a_running_vm_may_attach_elsewhere_is_never_vouched_for(tmp_path, capsys,
                                                                                          cli_work_dir):
    """QEMU reports a qcow2's data file as its header names it, but a VM's configuration may
    attach another (libvirt's <dataStore>: "data-file": NODE): pyvbak watched the header's
    file while QEMU read the other (cbt true, restore != disk)."""
    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()
    run = lambda *a: subprocess.run(a, check=True, cwd=images, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={images}/data.raw,data_file_raw=on",
        "base.qcow2", "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 16M", "base.qcow2")
    (other / "data.raw").write_bytes((images / "data.raw").read_bytes())
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{images}/base.qcow2", "-F", "qcow2", "disk.qcow2", "16M")
    extra = ("--blockdev", f"driver=file,node-name=data,filename={other}/data.raw,read-only=on")
    with running_vm(tmp_path, "qcow2", images / "base.qcow2", images / "disk.qcow2", images,
                    base_options=",data-file=data", extra=extra) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        a_direct_write_is_seen(capsys, qmp, repo, other / "data.raw", "external data file", guest, tmp_path)


@pytest.mark.parametrize("driver", ["copy-on-read", "throttle"])
def test_a_disk_under_a_filter_node_stays_incremental(tmp_path, capsys, cli_work_dir, driver):
    """QEMU nests a filter's child as its backing-image: the disk's own image was taken for a
    backing file of the filter above it (libvirt's copy-on-read or throttle node), and every
    guest write made the next backup a full scan."""
    run = lambda *a: subprocess.run(a, check=True, cwd=tmp_path, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", "base.raw")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "disk.qcow2", "16M")
    extra = ("--object", "throttle-group,id=tg0,x-bps-total=1000000000") if driver == "throttle" else ()
    with running_vm(tmp_path, "raw", tmp_path / "base.raw", tmp_path / "disk.qcow2", tmp_path, extra=extra,
                    top_filter=driver + (",throttle-group=tg0" if driver == "throttle" else "")) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        hot_backup(capsys, qmp, repo, node="top")
        fd = os.open(guest, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x5a" * 65536, 3 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        res = hot_backup(capsys, qmp, repo, node="top")
        assert res["cbt"] is True and res["fallback_reason"] is None, res
        out = tmp_path / "out.raw"
        assert main(["restore", res["id"], str(out), "--repo", repo]) == 0
        assert out.read_bytes() == guest.read_bytes()


@pytest.mark.parametrize("top, expect", [("copy-on-read", "external data file"),
                                         ("raw", "reads through other nodes")])
def test_what_a_node_above_the_disk_hides_is_still_never_vouched_for(tmp_path, capsys, cli_work_dir, top, expect):
    """Under a filter the disk's own image was no longer checked for its external data file
    (a regression of the fix for filters above it); a raw node over the qcow2's node (or a
    quorum) nests no backing image at all, so its backing file went unseen."""
    run = lambda *a: subprocess.run(a, check=True, cwd=tmp_path, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M")
    data = ["-o", f"data_file={tmp_path}/data.raw"] if top == "copy-on-read" else []
    run("qemu-img", "create", "-q", "-f", "qcow2", *data, "-b", f"{tmp_path}/base.raw", "-F", "raw", "disk.qcow2", "16M")
    with running_vm(tmp_path, "raw", tmp_path / "base.raw", tmp_path / "disk.qcow2", tmp_path,
                    top_filter=top) as (qmp, guest):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        changed = tmp_path / ("data.raw" if top == "copy-on-read" else "base.raw")  # under the node above the disk
        a_direct_write_is_seen(capsys, qmp, repo, changed, expect, guest, tmp_path, node="top")


def test_a_disk_nodes_options_without_children_are_no_unusual_graph():
    """An encrypted qcow2's json: name carries its key's id: that is no other node."""
    from pyvbak.hypervisors.qemu.hot import _unusual_graph

    plain = {"driver": "qcow2", "file": {"driver": "file", "filename": "/vm/disk.qcow2"}}
    assert _unusual_graph({"filename": "/vm/disk.qcow2"}) is None
    assert _unusual_graph({"filename": "json:" + json.dumps({**plain, "encrypt": {"key-secret": "sec0"}})}) is None
    assert _unusual_graph({"filename": "json:" + json.dumps({**plain, "backing": {"driver": "raw"}})}) is None
    assert _unusual_graph({"filename": "json:" + json.dumps({**plain, "data-file": {"driver": "file"}})})
    assert _unusual_graph({"filename": "json:" + json.dumps({"driver": "quorum", "children": [plain]})})
    assert _unusual_graph({"filename": "blkdebug::/vm/inner.qcow2"})  # (a plain name over other nodes)


def test_a_snapshot_access_node_is_refused_for_what_it_is(tmp_path, capsys, cli_work_dir):
    """Another backup's point-in-time view (snapshot-access over copy-before-write over the
    disk) carries the disk image's file name: it was refused as "the file under the qcow2
    node", which it is not."""
    run = lambda *a: subprocess.run(a, check=True, cwd=tmp_path, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{tmp_path}/base.raw", "-F", "raw", "disk.qcow2", "16M")
    run("qemu-img", "create", "-q", "-f", "raw", "target.raw", "16M")
    above = ("--blockdev", f"driver=file,node-name=target-file,filename={tmp_path}/target.raw",
             "--blockdev", "driver=raw,node-name=target,file=target-file",
             "--blockdev", "driver=copy-before-write,node-name=cbw,file=disk0,target=target",
             "--blockdev", "driver=snapshot-access,node-name=view,file=cbw")
    with running_vm(tmp_path, "raw", tmp_path / "base.raw", tmp_path / "disk.qcow2", tmp_path, above=above,
                    guest_node="cbw") as (qmp, _):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        capsys.readouterr()
        assert main(["backup", f"qemu://{qmp}?node=view", "--repo", repo, "--vm", "hot"]) == 4
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "snapshot-access" in err and "file under" not in err, err
        assert "?node=disk0" in err, err
        # the copy-before-write filter under it, on the qcow2 too: no "file under" either
        assert main(["backup", f"qemu://{qmp}?node=cbw", "--repo", repo, "--vm", "hot"]) == 4
        err = capsys.readouterr().err
        assert "copy-before-write filter node" in err and "?node=disk0" in err and "file under" not in err, err


@pytest.mark.parametrize("middle", ["preallocate", "copy-on-read", "blkdebug"])
def test_a_node_under_the_format_node_through_a_filter_is_refused_not_backed_up_as_the_disk(tmp_path, capsys,
                                                                                         cli_work_dir, middle):
    """With a filter between a qcow2 node and its file, QEMU names both with json:
    pseudo-filenames, and ?node=<the filter> or ?node=<the file node> was backed up without
    a word: a snapshot of the qcow2 file's bytes, not the guest's disk.  blkdebug names its
    node plainly, ``blkdebug::FILE``: only QEMU's block graph shows the file node under it."""
    require_tool("qemu-storage-daemon", "qemu-system-common")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "16M"], check=True)
    qmp, ctl = tmp_path / "qmp.sock", tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=disk0-file,filename={tmp_path / 'disk.qcow2'}",
         "--blockdev", f"driver={middle},node-name=mid,{'image' if middle == 'blkdebug' else 'file'}=disk0-file",
         "--blockdev", "driver=qcow2,node-name=disk0,file=mid",
         "--chardev", f"socket,path={qmp},server=on,wait=off,id=q0", "--monitor", "chardev=q0",
         "--chardev", f"socket,path={ctl},server=on,wait=off,id=c0", "--monitor", "chardev=c0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or ctl.exists(), timeout=30, what="qemu-storage-daemon")
        assert proc.poll() is None
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        for node in ("mid", "disk0-file"):
            capsys.readouterr()
            assert main(["backup", f"qemu://{qmp}?node={node}", "--repo", repo, "--vm", "v"]) == 4, node
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "?node=disk0" in err, err
        res = hot_backup(capsys, qmp, repo)  # the guest's view itself is fine
        assert res["size"] == 16 * MiB
    finally:
        stop_qemu(proc, Qmp(ctl) if ctl.exists() else None)


def test_with_a_filter_above_the_qcow2_the_refusal_names_the_qcow2_node(tmp_path, capsys, cli_work_dir):
    """A throttle filter above the disk (libvirt's) reads through the qcow2 too, and the
    refusal of ?node=disk0-file named it as "the throttle container"."""
    run = lambda *a: subprocess.run(a, check=True, cwd=tmp_path, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{tmp_path}/base.raw", "-F", "raw", "disk.qcow2", "16M")
    extra = ("--object", "throttle-group,id=tg0,x-bps-total=1000000000")
    with running_vm(tmp_path, "raw", tmp_path / "base.raw", tmp_path / "disk.qcow2", tmp_path, extra=extra,
                    top_filter="throttle,throttle-group=tg0") as (qmp, _):
        repo = str(tmp_path / "repo")
        assert main(["init", repo]) == 0
        capsys.readouterr()
        assert main(["backup", f"qemu://{qmp}?node=disk0-file", "--repo", repo, "--vm", "v"]) == 4
        err = capsys.readouterr().err
        assert "the qcow2 node 'disk0'" in err and "?node=disk0" in err and "throttle" not in err, err
