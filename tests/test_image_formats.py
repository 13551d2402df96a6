"""Which format an image file is read as: by its name, or ``backup --format``; and the
warning for an image read as raw whose header is a container's."""

from __future__ import annotations

import os
import struct

import pytest

from conftest import cli_json, require_tool
from pyvbak.cli.main import main
from pyvbak.hypervisors.image_formats import (
    SUFFIX_FORMATS, container_format, format_of_name, raw_container_warning, vmdk_descriptor_problem)

MiB = 1 << 20


@pytest.mark.parametrize("head,fmt", [
    (b"QFI\xfb" + struct.pack(">I", 3), "qcow2"),
    (b"QFI\xfb" + struct.pack(">I", 2), "qcow2"),
    (b"QFI\xfb" + struct.pack(">I", 1), "qcow"),
    (b"QED\x00", "qed"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile\n", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"\0" * 0x40 + struct.pack("<I", 0xBEDA107F), "vdi"),
    (b"LUKS\xba\xbe\x00\x02", None),  # a guest's encrypted raw disk starts so too: raw
    (b"\xeb\x63\x90" + b"\0" * 509 + b"\x55\xaa", None),  # an MBR: raw
    (b"", None),
])
def test_container_format_by_header(tmp_path, head, fmt):
    p = tmp_path / "x.img"
    p.write_bytes(head + b"\0" * (4096 - len(head)))
    assert container_format(str(p)) == fmt
    assert (raw_container_warning(str(p)) is None) == (fmt is None)


def test_a_fixed_vhd_is_known_by_its_footer(tmp_path):
    p = tmp_path / "x.img"
    p.write_bytes(os.urandom(MiB) + b"conectix" + b"\0" * 504)
    assert container_format(str(p)) == "vpc"
    assert container_format(str(tmp_path / "missing.img")) is None
    assert container_format(str(tmp_path)) is None  # a directory


def test_a_misnamed_qcow2_is_backed_up_as_raw_with_a_warning_and_as_its_disk_with_format(
        tmp_path, capsys, cli_work_dir, misnamed_qcow2):
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    raw = cli_json(capsys, ["backup", str(misnamed_qcow2), "--repo", str(repo), "--vm", "v"])
    assert raw["size"] == os.path.getsize(misnamed_qcow2)
    assert any("holds a qcow2 image" in w and "--format qcow2" in w for w in raw["warnings"]), raw["warnings"]

    mixed = cli_json(capsys, ["backup", str(misnamed_qcow2), "--repo", str(repo), "--vm", "v", "--format", "qcow2"])
    assert any("holds the image file's raw bytes" in w and "this one the disk the image holds" in w
               and "its own --disk NAME" in w for w in mixed["warnings"]), mixed["warnings"]
    disk = cli_json(capsys, ["backup", str(misnamed_qcow2), "--repo", str(repo), "--vm", "v", "--disk", "d",
                             "--format", "qcow2"])
    assert disk["size"] == 16 * MiB and not any("holds a" in w for w in disk["warnings"])
    out = tmp_path / "restored.raw"
    assert main(["restore", disk["id"], str(out), "--repo", str(repo)]) == 0
    data = out.read_bytes()
    assert data[:MiB] == b"\x55" * MiB and data[MiB:] == bytes(15 * MiB)
    assert not cli_work_dir.exists() or list(cli_work_dir.iterdir()) == []  # qemu-nbd's run left nothing

    quiet = cli_json(capsys, ["backup", str(misnamed_qcow2), "--repo", str(repo), "--vm", "v", "--format", "raw"])
    assert quiet["size"] == os.path.getsize(misnamed_qcow2) and not any("holds a" in w for w in quiet["warnings"])


@pytest.mark.parametrize("source,fmt,code,needle", [
    ("nbd://localhost/x", "raw", 2, "--format is for image files and block devices"),
    ("qemu:///tmp/none.sock?node=a", "qcow2", 2, "--format is for image files and block devices"),
    ("IMG", "ext4", 2, "unknown image format 'ext4'"),
    ("IMG", "qcow2", 4, "not in qcow2 format"),
])
def test_bad_format_choices_are_one_line_errors(tmp_path, capsys, cli_work_dir, source, fmt, code, needle):
    require_tool("qemu-img", "qemu-utils")
    img = tmp_path / "raw.img"
    img.write_bytes(os.urandom(70000))
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    capsys.readouterr()
    got = main(["backup", str(img) if source == "IMG" else source, "--repo", str(repo), "--vm", "v", "--format", fmt])
    err = capsys.readouterr().err
    assert got == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (repo / "snapshots").exists() or os.listdir(repo / "snapshots") == []


def test_the_suffix_names_the_format():
    assert format_of_name("/x/Disk.VHD") == format_of_name("d.vpc") == "vpc"
    assert format_of_name("web01.data.qcow2") == "qcow2" and format_of_name("a.qcow") == "qcow"
    assert format_of_name("guest-flat.vmdk") == "vmdk" and format_of_name("disk.img") is None
    assert all(format_of_name(f"x{suffix}") == fmt for suffix, fmt in SUFFIX_FORMATS.items())


def test_what_may_be_followed_as_a_vmdk_descriptor(tmp_path):
    """A raw extent (NAME-flat.vmdk) whose guest wrote a descriptor text at its start must
    not be read as vmdk: its extent lines may name any host file."""
    text = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 8 FLAT "/etc/shadow" 0\n'
    p = tmp_path / "d.vmdk"
    p.write_bytes(text)
    assert vmdk_descriptor_problem(str(p)) is None  # a descriptor file
    # QEMU's CID update rewrites it as a sector: NUL, then stale text of the old one
    p.write_bytes((text[:-10] + b"\0" + text[-9:]).ljust(512, b"\0"))
    assert vmdk_descriptor_problem(str(p)) is None
    p.write_bytes(text.ljust(512 * 1024, b"\0"))  # a 512 KiB disk's extent
    assert "binary data" in vmdk_descriptor_problem(str(p))
    p.write_bytes(text.ljust(1 << 20, b" "))  # more than QEMU reads of a descriptor
    assert "too large" in vmdk_descriptor_problem(str(p))
    p.write_bytes(b"KDMV" + bytes(1 << 20))  # a sparse extent
    assert vmdk_descriptor_problem(str(p)) is None
