"""Offline images: the suffix names the format (never a probed header), backing files
are never probed, a bitmap that cannot be rotated does not fail a committed backup, a
failed setup keeps what the next run needs, non-files are refused."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli_json, require_tool, run_cli, wait_until
from images import qemu_io, untokened
from pyvbak.cli.main import main
from pyvbak.errors import SourceError
from pyvbak.hypervisors.qemu import QemuOfflineImage

MiB = 1 << 20


@pytest.fixture(autouse=True)
def tools():
    require_tool("qemu-img", "qemu-utils")
    require_tool("qemu-nbd", "qemu-utils")
    require_tool("qemu-io", "qemu-utils")


@pytest.fixture
def repo(tmp_path, cli_work_dir):
    r = tmp_path / "repo"
    assert main(["init", str(r)]) == 0
    return r


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def bitmaps(img: Path) -> dict:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(img)],
                                     check=True, capture_output=True, text=True).stdout)
    return untokened({b["name"]: b["flags"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])})


def one_line_error(capsys, argv, code=4) -> str:
    got, out, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code and len(lines) == 1, (got, err)
    return lines[0]


def restored(capsys, repo, snap_id, tmp_path) -> bytes:
    out = tmp_path / f"restored-{snap_id}-{time.monotonic_ns()}.raw"
    assert main(["restore", snap_id, str(out), "--repo", str(repo)]) == 0
    capsys.readouterr()
    return out.read_bytes()


def as_raw(img: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / "ref.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(img), str(out))
    return out.read_bytes()


# ---- D2/D4: the suffix names the format -------------------------------------------------

def test_a_guest_written_qcow2_header_in_a_flat_vmdk_extent_is_not_followed(tmp_path, capsys, repo):
    """A raw VMware extent NAME-flat.vmdk whose guest wrote a qcow2 header naming a host file
    as its backing file: probed, the backup held the host file and a dirty bitmap was written
    into the guest's disk."""
    secret = tmp_path / "host-secret.txt"
    secret.write_bytes(b"HOST SECRET\n".ljust(MiB, b"\0"))
    os.chmod(secret, 0o600)
    desc = tmp_path / "guest.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(desc), "4M")
    flat = tmp_path / "guest-flat.vmdk"
    inner = tmp_path / "inner.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(inner), "1M")
    qemu_io(desc, "vmdk", f"write -s {inner} 0 {inner.stat().st_size}")  # the guest writes it
    before = flat.read_bytes()
    line = one_line_error(capsys, ["backup", str(flat), "--repo", str(repo), "--vm", "g"])
    assert str(flat) in line and "is an extent of a VMware disk" in line and "--format raw" in line, line
    assert flat.read_bytes() == before  # no bitmap written into the guest's disk
    assert not (repo / "snapshots").exists() or not os.listdir(repo / "snapshots")

    # what it is, said by the user: the guest's raw disk, header and all
    raw = cli_json(capsys, ["backup", str(flat), "--repo", str(repo), "--vm", "g", "--format", "raw"])
    assert raw["size"] == 4 * MiB and restored(capsys, repo, raw["id"], tmp_path) == before
    # and the descriptor that names the extent is the disk
    disk = cli_json(capsys, ["backup", str(desc), "--repo", str(repo), "--vm", "g", "--disk", "d"])
    assert disk["size"] == 4 * MiB and restored(capsys, repo, disk["id"], tmp_path) == before
    assert b"HOST SECRET" not in restored(capsys, repo, disk["id"], tmp_path)


@pytest.mark.parametrize("disk_size", ["512K", "4M"])  # (4M: more than QEMU reads of a descriptor)
def test_a_guest_written_vmdk_descriptor_in_a_flat_extent_is_not_followed(tmp_path, capsys, repo, disk_size):
    """Read as vmdk, a flat extent whose guest wrote a text descriptor at its start would have
    QEMU open the extents it names: any host file."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"HOST SECRET\n".ljust(512 * 1024, b"\0"))
    desc = tmp_path / "guest.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(desc), disk_size)
    text = (f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
            f'RW 1024 FLAT "{secret}" 0\nddb.virtualHWVersion = "4"\n').encode()
    staged = tmp_path / "text"
    staged.write_bytes(text)
    qemu_io(desc, "vmdk", f"write -s {staged} 0 {len(text)}")
    flat = tmp_path / "guest-flat.vmdk"
    line = one_line_error(capsys, ["backup", str(flat), "--repo", str(repo), "--vm", "g"])
    assert "is an extent of a VMware disk" in line and "--format raw" in line, line
    line = one_line_error(capsys, ["backup", str(flat), "--repo", str(repo), "--vm", "g", "--format", "vmdk"])
    assert "is an extent of a VMware disk" in line, line
    # renamed (not named as VMware names extents, no descriptor beside it): the descriptor
    # test still refuses a file larger than QEMU reads of one, or binary and over 64 KiB
    alone = tmp_path / "alone" / "disk.vmdk"
    alone.parent.mkdir()
    flat.rename(alone)
    line = one_line_error(capsys, ["backup", str(alone), "--repo", str(repo), "--vm", "g"])
    assert "not a vmdk image" in line, line


def test_vmdk_subformats_with_text_descriptors_still_back_up(tmp_path, capsys, repo):
    for sub in ("monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "monolithicSparse"):
        img = tmp_path / f"{sub}.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", f"subformat={sub}", str(img), "4M")
        qemu_io(img, "vmdk", "write -P 0x3c 1M 64k")
        res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v", "--disk", sub])
        assert res["size"] == 4 * MiB
        assert restored(capsys, repo, res["id"], tmp_path) == as_raw(img, "vmdk", tmp_path), sub


def test_a_fixed_vhd_is_read_as_vpc_by_its_suffix(tmp_path, capsys, repo):
    """QEMU's vpc probe looks at offset 0 only: a fixed VHD (Azure's) was backed up as raw
    bytes, its footer included."""
    img = tmp_path / "disk.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", str(img), "8M")
    qemu_io(img, "vpc", "write -P 0x11 0 1M")
    virtual = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(img)],
                                        check=True, capture_output=True, text=True).stdout)["virtual-size"]
    assert virtual < img.stat().st_size
    res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v"])
    assert res["size"] == virtual and "'vpc'" in res["fallback_reason"]
    assert restored(capsys, repo, res["id"], tmp_path) == as_raw(img, "vpc", tmp_path)
    # --format raw still overrides: the file's bytes
    raw = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v", "--disk", "file", "--format", "raw"])
    assert raw["size"] == img.stat().st_size


@pytest.mark.parametrize("case", ["empty", "bad magic", "qcow v1"])
def test_a_qcow2_named_file_that_is_not_one_is_refused(tmp_path, capsys, repo, case):
    """An empty or damaged .qcow2 was backed up as its raw bytes, exit 0."""
    img = tmp_path / "vm.qcow2"
    if case == "empty":
        img.write_bytes(b"")
    elif case == "bad magic":
        qemu_img("create", "-f", "qcow2", str(img), "4M")
        qemu_io(img, "qcow2", "write -P 1 0 64k")
        with open(img, "r+b") as f:
            f.write(b"XXXX")
    else:
        qemu_img("create", "-f", "qcow", str(img), "4M")
    line = one_line_error(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v"])
    assert f"{img} is not a qcow2 image" in line and "--format" in line, line
    assert not (repo / "snapshots").exists() or not os.listdir(repo / "snapshots")
    if case == "qcow v1":  # what it is, named: read so
        res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v", "--format", "qcow"])
        assert res["size"] == 4 * MiB


def test_a_backing_file_without_a_recorded_format_is_refused(tmp_path, capsys, repo):
    """QEMU probes a backing file whose format the image does not record (a qcow v1 image
    records none): a guest's raw base disk would be read as whatever its guest wrote."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x22" * MiB)
    top = tmp_path / "top.qcow"
    qemu_img("create", "-f", "qcow", "-b", str(base), "-F", "raw", str(top), "1M")
    line = one_line_error(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "v"])
    assert f"names its backing file {base} without its format" in line and "qemu-img rebase -u" in line, line
    # recorded: read in that format
    top2 = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top2), "1M")
    res = cli_json(capsys, ["backup", str(top2), "--repo", str(repo), "--vm", "v", "--disk", "t"])
    assert restored(capsys, repo, res["id"], tmp_path) == b"\x22" * MiB


# ---- D6: not a file -----------------------------------------------------------------------

def test_a_fifo_or_character_device_with_an_image_suffix_is_refused_at_once(tmp_path, capsys, repo):
    fifo = tmp_path / "fifo.qcow2"
    os.mkfifo(fifo)
    start = time.monotonic()
    line = one_line_error(capsys, ["backup", str(fifo), "--repo", str(repo), "--vm", "a"])
    assert f"{fifo} is neither a regular file nor a block device: give a disk image" in line
    assert time.monotonic() - start < 10
    zero = tmp_path / "zero.qcow2"
    zero.symlink_to("/dev/zero")
    line = one_line_error(capsys, ["backup", str(zero), "--repo", str(repo), "--vm", "a"])
    assert f"{zero} (-> /dev/zero) is neither a regular file nor a block device" in line, line
    assert not (repo / "snapshots").exists() or not os.listdir(repo / "snapshots")


def test_a_file_whose_size_cannot_be_told_is_one_line_that_names_it(capsys, repo):
    """/proc/self/mem opens as a regular file and refuses lseek: the error was a bare
    "Invalid argument", naming no file."""
    line = one_line_error(capsys, ["backup", "/proc/self/mem", "--repo", str(repo), "--vm", "a"])
    assert "cannot tell the size of disk image /proc/self/mem: Invalid argument" in line, line


# ---- D3/D7: a bitmap that cannot be rotated ----------------------------------------------

def test_a_read_only_qcow2_backs_up_with_its_bitmap_and_the_next_one_scans(tmp_path, capsys, repo):
    """The backup was made, then the teardown's 'bitmap --remove' failed: exit 4, no JSON.
    The bitmap it could not rotate is used, but not recorded again (one name
    vouching for two snapshots trusted an older copy of the image): the next one scans."""
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qemu_io(img, "qcow2", "write -P 0x11 0 4M")
    first = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "r"])
    qemu_io(img, "qcow2", "write -P 0x12 1M 64k")
    if subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here")
    try:
        assert not os.access(img, os.W_OK)
        res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "r"])
        assert res["cbt"] is True and res["changed_blocks"] == 1, res
        assert any("cannot rotate the dirty bitmap" in w and "read-only" in w and "the next one scans" in w
                   for w in res["warnings"]), res
        assert list(bitmaps(img)) == ["pyvbak-gen-1"]  # untouched
        assert restored(capsys, repo, res["id"], tmp_path) == as_raw(img, "qcow2", tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(img)], check=True)
    # writable again: the snapshot recorded no bitmap, so this one scans, and rotates
    qemu_io(img, "qcow2", "write -P 0x13 8M 64k")
    nxt = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "r"])
    assert nxt["cbt"] is False and "could not keep a dirty bitmap" in nxt["fallback_reason"], nxt
    assert "pyvbak-gen-2" in bitmaps(img)
    again = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "r"])
    assert again["cbt"] is True and again["changed_blocks"] == 0, again
    assert restored(capsys, repo, nxt["id"], tmp_path) == as_raw(img, "qcow2", tmp_path)
    assert first["cbt"] is False


def test_a_read_only_qcow2_without_a_bitmap_says_so_every_time(tmp_path, capsys, repo):
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    if subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here")
    try:
        for _ in range(2):
            res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "r"])
            assert res["cbt"] is False and "read-only" in res["fallback_reason"], res
    finally:
        subprocess.run(["chattr", "-i", str(img)], check=True)
    res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "r"])
    assert res["fallback_reason"].startswith(f"the previous backup could not keep a dirty bitmap in {img}: "
                                             "the image file is read-only"), res


def test_a_qcow2_v2_says_why_it_never_gets_a_bitmap(tmp_path, capsys, repo):
    img = tmp_path / "old.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(img), "4M")
    for _ in range(3):
        res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v"])
        assert "qcow2 v2 (compat 0.10) images cannot store dirty bitmaps" in res["fallback_reason"], res
        assert "compat=1.1" in res["fallback_reason"]


def test_a_corrupt_flagged_qcow2_backs_up_and_says_so(tmp_path, capsys, repo):
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    qemu_io(img, "qcow2", "write -P 5 0 64k")
    cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v"])
    with open(img, "r+b") as f:  # incompatible_features bit 1: corrupt
        f.seek(72)
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", features | 2))
    res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "v"])
    assert res["cbt"] is False and "marked corrupt" in res["fallback_reason"] and "qemu-img check" in res["fallback_reason"]
    assert list(bitmaps(img)) == ["pyvbak-gen-1"]


def _holds_open(pid: int, path) -> bool:
    """Process ``pid`` has ``path`` open (one of its /proc fds links to it)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def test_an_image_another_process_holds_open_read_only_backs_up(tmp_path, capsys, repo):
    """A copy job, or a VM on an external snapshot's overlay, holds the image open
    read-only: 'qemu-img bitmap --add' fails its write lock, and so did the teardown."""
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "qcow2", "write -P 1 0 1M")
    first = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "b"])
    qemu_io(img, "qcow2", "write -P 2 2M 64k")
    holder = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", "-c", "sleep 30000", str(img)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _holds_open(holder.pid, img), timeout=30, what="qemu-io's open of the image")
        res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "b"])
        assert res["cbt"] is True and res["changed_blocks"] == 1, res
        assert any("cannot rotate" in w and "another process has the image open" in w for w in res["warnings"]), res
    finally:
        holder.kill()
        holder.wait()
    assert list(bitmaps(img)) == ["pyvbak-gen-1"]
    assert restored(capsys, repo, res["id"], tmp_path) == as_raw(img, "qcow2", tmp_path)
    nxt = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "b"])
    assert nxt["cbt"] is False and "could not keep a dirty bitmap" in nxt["fallback_reason"], nxt
    assert "pyvbak-gen-2" in bitmaps(img) and first["id"] != nxt["id"]


# ---- D5: setup fails after the rotation ----------------------------------------------------

def test_a_setup_failing_after_the_rotation_keeps_the_journal_and_says_why(tmp_path, monkeypatch):
    """qemu-nbd cannot lock the image (a VM starting): the teardown could not put the bitmaps
    back, said nothing, and removed the journal - the next run scanned it all, blaming a
    bitmap that 'missed writes'."""
    img, work = tmp_path / "v.qcow2", tmp_path / "work"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    with QemuOfflineImage(img, previous_state=None, work_dir=work) as s:
        s.commit()
    state = s.change_tracking_state
    qemu_io(img, "qcow2", "write -P 2 0 64k")
    real = subprocess.run(["sh", "-c", "command -v qemu-nbd"], capture_output=True, text=True).stdout.strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    flag = tmp_path / "holding"
    # the "VM" (a qemu-io taking its commands from a FIFO, stopped cleanly with "quit")
    # takes the image, then qemu-nbd starts once it holds it
    ctl = tmp_path / "ctl"
    os.mkfifo(ctl)
    ctl_fd = os.open(ctl, os.O_RDWR)  # (a FIFO opened read-write does not wait for a reader)
    (bindir / "qemu-nbd").write_text(
        '#!/bin/sh\nfor last; do :; done\n'
        f'qemu-io -f qcow2 "$last" < "{ctl}" >/dev/null 2>&1 &\n'
        f'echo $! > "{flag}"\n'
        # (until it has the image open: a trial open here raced with its own open)
        'pid=$!; i=0; until ls -l /proc/$pid/fd 2>/dev/null | grep -qF -- "$last" || [ $i -ge 3000 ]; do\n'
        '  i=$((i+1)); sleep 0.01; done\n'
        f'exec "{real}" "$@"\n')
    (bindir / "qemu-nbd").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(SourceError) as err:
        with QemuOfflineImage(img, previous_state=state, work_dir=work):
            pass
    msg = str(err.value)
    assert "in use (locked" in msg and "cleanup was incomplete" in msg and "--merge" in msg, msg
    assert "is kept for it" in msg and "\n" not in msg
    assert [p.suffix for p in work.iterdir()] == [".json"]  # the journal: which bitmap it disabled
    monkeypatch.undo()
    wait_until(lambda: flag.exists() and flag.read_text().strip(), what="the holder")
    os.write(ctl_fd, b"quit\n")  # the "VM" stops (killed, it would leave its bitmap in-use: a crash)
    os.close(ctl_fd)
    wait_until(lambda: subprocess.run(["qemu-io", "-f", "qcow2", "-c", "", str(img)],
                                      capture_output=True).returncode == 0, timeout=30, what="the image free again")
    with QemuOfflineImage(img, previous_state=state, work_dir=work) as s:
        assert s.fallback_reason is None and s.dirty_bitmap == state["bitmap"], s.fallback_reason
        assert any("merged back" in c for c in s.cleaned_leftovers), s.cleaned_leftovers
        s.commit()
    assert not list(work.iterdir())


@pytest.mark.parametrize("base", ["vmdk-flat", "qcow2-data-file"])
def test_a_write_into_a_backing_files_own_data_files_is_seen(tmp_path, capsys, repo, base):
    """A backing vmdk keeps its data in extent files, a qcow2 may keep it in an external data
    file: a write there changes the disk, and only the backing file's own name and times were
    checked (cbt true, nothing read, restore != image)."""
    if base == "vmdk-flat":
        b, fmt = tmp_path / "base.vmdk", "vmdk"
        qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(b), "8M")
        data = tmp_path / "base-flat.vmdk"
    else:
        b, fmt = tmp_path / "base.qcow2", "qcow2"
        data = tmp_path / "base.data"
        qemu_img("create", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", str(b), "8M")
    qemu_io(b, fmt, "write -P 0x31 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", fmt, "-b", str(b), str(top))
    cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])
    qemu_io(top, "qcow2", "write -P 0x32 4M 64k")
    assert cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])["cbt"] is True
    with open(data, "r+b") as f:  # not through the backing image: straight into its data
        f.seek(1 << 20)
        f.write(b"\x33" * 65536)
    res = cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])
    assert res["cbt"] is False and "backing chain" in res["fallback_reason"], res
    assert restored(capsys, repo, res["id"], tmp_path) == as_raw(top, "qcow2", tmp_path)


def test_a_backing_files_data_file_named_relative_is_never_vouched_for(tmp_path, capsys, repo, monkeypatch):
    """QEMU 7.2 opens a qcow2's relative ``data-file`` from its own working directory, not
    the image's (checked: ``qemu-io`` of the image from another directory cannot find it):
    the file a backing image keeps its data in depends on the process that opens it, and
    pyvbak had identified the one beside the image while QEMU read another (cbt true,
    nothing read, restore != image)."""
    here, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    b = here / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "data_file=base.data,data_file_raw=on", str(b), "8M"],
                   cwd=here, check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 2M", str(b)], cwd=here, check=True,
                   capture_output=True)
    (elsewhere / "base.data").write_bytes((here / "base.data").read_bytes())  # a same-named file
    top = here / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(b), str(top))
    monkeypatch.chdir(elsewhere)  # pyvbak (and its qemu-nbd) run here: QEMU reads this base.data
    first = cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])
    qemu_io(top, "qcow2", "write -P 0x32 4M 64k")
    with open(elsewhere / "base.data", "r+b") as f:  # the data file QEMU reads, written directly
        f.seek(1 << 20)
        f.write(b"\x33" * 65536)
    res = cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])
    assert res["cbt"] is False and "base.data" in res["fallback_reason"] and "relative" in res["fallback_reason"]
    assert first["cbt"] is False
    data = restored(capsys, repo, res["id"], tmp_path)
    assert data[1 << 20:(1 << 20) + 65536] == b"\x33" * 65536 and data[4 << 20:(4 << 20) + 65536] == b"\x32" * 65536


@pytest.mark.parametrize("name", ["file:base.raw", 'json:{"driver":"raw","file":{"driver":"file","filename":"base.raw"}}'])
def test_a_backing_name_relative_inside_a_prefix_is_never_vouched_for(tmp_path, capsys, repo, monkeypatch, name):
    """QEMU opens a relative name inside ``file:`` or ``json:`` from its working directory
    and reports it as a plain relative name, which pyvbak joined with the image's directory:
    it watched another file than the one qemu-nbd read (cbt true, restore != image)."""
    images, run_dir = tmp_path / "images", tmp_path / "run"
    images.mkdir()
    run_dir.mkdir()
    for base in (images / "base.raw", run_dir / "base.raw"):
        qemu_img("create", "-f", "raw", str(base), "4M")
    qemu_io(run_dir / "base.raw", "raw", "write -P 0x11 0 1M")
    top = images / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", name, "-F", "raw", str(top), "4M")
    monkeypatch.chdir(run_dir)  # pyvbak's working directory, and its qemu-nbd's
    cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])
    qemu_io(run_dir / "base.raw", "raw", "write -P 0x22 0 64k")  # the file QEMU reads
    res = cli_json(capsys, ["backup", str(top), "--repo", str(repo), "--vm", "t"])
    assert res["cbt"] is False and "relative to the working directory" in res["fallback_reason"], res
    assert restored(capsys, repo, res["id"], tmp_path) == as_raw(top, "qcow2", tmp_path)


def test_an_image_given_through_a_symlink_reads_the_backing_file_qemu_finds_beside_the_link(tmp_path, capsys, repo):
    """QEMU resolves a relative backing name against the directory of the name it is given
    - the link's, as a VM started on that name does; pyvbak served the link's target and
    backed up the base file beside the target, or refused the
    image when there was none."""
    vm, store = tmp_path / "vm", tmp_path / "store"
    vm.mkdir()
    store.mkdir()
    for base, pattern in ((vm / "base.raw", "0x4c"), (store / "base.raw", "0x52")):
        qemu_img("create", "-f", "raw", str(base), "4M")
        qemu_io(base, "raw", f"write -P {pattern} 0 1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "disk.qcow2", "4M"],
                   cwd=store, check=True)
    (vm / "disk.qcow2").symlink_to("../store/disk.qcow2")
    res = cli_json(capsys, ["backup", str(vm / "disk.qcow2"), "--repo", str(repo), "--vm", "t"])
    assert restored(capsys, repo, res["id"], tmp_path)[:1] == b"\x4c"
    (store / "base.raw").unlink()  # nothing beside the target: still the link's base file
    res = cli_json(capsys, ["backup", str(vm / "disk.qcow2"), "--repo", str(repo), "--vm", "t"])
    assert restored(capsys, repo, res["id"], tmp_path) == as_raw(vm / "disk.qcow2", "qcow2", tmp_path)


def test_an_image_named_through_a_symlinked_directory_and_dotdot_is_the_file_the_kernel_finds(tmp_path, capsys, repo):
    """``vm/ld/../disk.qcow2`` with ``vm/ld`` a link to ``store/sub`` is ``store/disk.qcow2``;
    made absolute with normpath it became ``vm/disk.qcow2`` - another image, read and given
    a bitmap."""
    vm, store = tmp_path / "vm", tmp_path / "store"
    (store / "sub").mkdir(parents=True)
    vm.mkdir()
    (vm / "ld").symlink_to("../store/sub")
    for img, pattern in ((vm / "disk.qcow2", "0x4c"), (store / "disk.qcow2", "0x52")):
        qemu_img("create", "-f", "qcow2", str(img), "4M")
        qemu_io(img, "qcow2", f"write -P {pattern} 0 1M")
    res = cli_json(capsys, ["backup", f"{vm}/ld/../disk.qcow2", "--repo", str(repo), "--vm", "t"])
    assert restored(capsys, repo, res["id"], tmp_path)[:1] == b"\x52"
    assert bitmaps(store / "disk.qcow2") and not bitmaps(vm / "disk.qcow2")


def test_a_backing_node_qemu_names_by_a_protocol_is_no_local_file():
    """nbd+unix://, rbd:, json: ... are not paths relative to anything: "cannot be
    identified", not the advice to name a file absolutely."""
    from pyvbak.hypervisors.qemu.session import outside_data

    top = {"filename": "/vm/disk.qcow2", "format": "qcow2"}
    for name in ("nbd+unix:///x?socket=/run/nbd.sock", "rbd:pool/image", "json:{\"driver\": \"raw\"}",
                 "blkverify:/a.raw:/b.raw"):
        assert outside_data([top, {"filename": name, "format": "raw"}]) == (None, None), name
    identity, reason = outside_data([top, {"filename": "base.raw", "format": "raw"}])
    assert identity == [] and "relative to the working directory" in reason


@pytest.mark.parametrize("header", ["text", "sparse"])
def test_an_extent_a_descriptor_names_is_never_read_as_a_vmdk(tmp_path, capsys, repo, header):
    """Whatever its name, a file a descriptor beside it names as an extent holds a disk's
    bytes: its guest may have written a descriptor, or a sparse KDMV header whose embedded
    descriptor or parent names a host file, at its start."""
    disk = tmp_path / "vm.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(disk), "4M")
    extent = tmp_path / "vm-data.vmdk"  # renamed, and the descriptor edited to match
    (tmp_path / "vm-flat.vmdk").rename(extent)
    disk.write_bytes(disk.read_bytes().replace(b'"vm-flat.vmdk"', b'"vm-data.vmdk"'))
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST SECRET".ljust(512, b"\0"))
    if header == "text":
        guest = (f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                 f'RW 1 FLAT "{secret}" 0\n').encode()
    else:
        sparse = tmp_path / "sparse.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(sparse), "1M")
        guest = sparse.read_bytes()[:65536]
        sparse.unlink()
    with open(extent, "r+b") as f:  # the guest writing at the start of its disk
        f.write(guest)
    before = extent.read_bytes()
    line = one_line_error(capsys, ["backup", str(extent), "--repo", str(repo), "--vm", "g"])
    assert "is an extent of a VMware disk" in line and f"the descriptor {disk} names it" in line, line
    assert extent.read_bytes() == before
    res = cli_json(capsys, ["backup", str(disk), "--repo", str(repo), "--vm", "g"])  # the disk itself: fine
    assert restored(capsys, repo, res["id"], tmp_path) == as_raw(disk, "vmdk", tmp_path)


def test_a_qcow2_named_vmdk_gets_the_format_advice(tmp_path, capsys, repo):
    """Not the raw-extent advice: its header says what it may be."""
    img = tmp_path / "q.vmdk"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    line = one_line_error(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "q"])
    assert "its header is a qcow2 image's" in line and "--format qcow2" in line and "descriptor" not in line, line
    res = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "q", "--format", "qcow2"])
    assert res["size"] == 4 * MiB


def test_a_sparse_header_naming_other_files_is_refused_wherever_its_descriptor_is(tmp_path, capsys, repo):
    """A raw extent named like any disk, its descriptor in another directory: a guest-written
    KDMV header with an embedded descriptor naming a host file was followed."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST SECRET".ljust(512, b"\0"))
    sparse = tmp_path / "sparse.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(sparse), "1M")
    head = bytearray(sparse.read_bytes()[:65536])
    desc_sector, desc_sectors = struct.unpack_from("<QQ", head, 28)
    struct.pack_into("<Q", head, 12, 0)  # capacity 0: QEMU opens the embedded descriptor's extents
    text = (f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
            f'RW 1 FLAT "{secret}" 0\n').encode()
    head[desc_sector * 512 : (desc_sector + desc_sectors) * 512] = text.ljust(desc_sectors * 512, b"\0")
    (tmp_path / "data").mkdir()
    disk = tmp_path / "data" / "disk.vmdk"  # the guest's raw disk, written at its start
    disk.write_bytes(bytes(head) + bytes(4 * MiB - len(head)))
    line = one_line_error(capsys, ["backup", str(disk), "--repo", str(repo), "--vm", "g"])
    assert "its sparse header names other files as its extents" in line and str(secret) in line, line


def test_disks_named_like_extents_still_back_up(tmp_path, capsys, repo):
    """A sparse disk of its own named -delta is no extent; a descriptor named -f001 is taken
    for a raw extent by its name, and --format vmdk says otherwise."""
    delta = tmp_path / "app-delta.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(delta), "4M")
    res = cli_json(capsys, ["backup", str(delta), "--repo", str(repo), "--vm", "a"])
    assert res["size"] == 4 * MiB
    desc = tmp_path / "db-f001.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(desc), "4M")
    line = one_line_error(capsys, ["backup", str(desc), "--repo", str(repo), "--vm", "d"])
    assert "--format vmdk" in line, line
    res = cli_json(capsys, ["backup", str(desc), "--repo", str(repo), "--vm", "d", "--format", "vmdk"])
    assert res["size"] == 4 * MiB and restored(capsys, repo, res["id"], tmp_path) == as_raw(desc, "vmdk", tmp_path)
