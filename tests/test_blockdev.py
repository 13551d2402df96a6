"""Backup from and restore to real block devices (loop devices; needs root)."""

from __future__ import annotations

import os
import subprocess

from conftest import require_tool
from pyvbak.cli.main import main


def test_backup_block_device_and_restore_onto_another(tmp_path, loopdev, capsys):
    src_img = tmp_path / "src.img"
    with open(src_img, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.write(bytes(2 << 20))
        f.write(b"block device text " * 40000)
    f_size = src_img.stat().st_size
    pad = (-f_size) % 512  # loop devices have 512-byte sectors
    with open(src_img, "ab") as f:
        f.write(os.urandom(pad))
    src = loopdev(src_img)
    dst_img = tmp_path / "dst.img"
    with open(dst_img, "wb") as f:  # garbage everywhere: zero runs must be written as zeros
        f.write(os.urandom(src_img.stat().st_size))
    dst = loopdev(dst_img)
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert main(["backup", src, "--repo", repo, "--vm", "vm", "--disk", "d0"]) == 0
    assert main(["restore", "vm/d0@latest", dst, "--repo", repo]) == 7  # exists: needs --force
    assert main(["restore", "vm/d0@latest", dst, "--repo", repo, "--force"]) == 0
    capsys.readouterr()
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()


def test_a_restore_onto_a_device_while_the_packs_are_not_mounted_writes_nothing(tmp_path, loopdev, capsys):
    """The check came after the writing: the device's zero blocks were zeroed before the
    restore failed."""
    import shutil

    src_img = tmp_path / "src.img"
    with open(src_img, "wb") as f:
        f.write(os.urandom(1 << 20) + bytes(3 << 20))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert main(["backup", str(src_img), "--repo", repo, "--vm", "vm"]) == 0
    dst_img = tmp_path / "dst.img"
    before = os.urandom(4 << 20)
    dst_img.write_bytes(before)
    dst = loopdev(dst_img)
    shutil.move(os.path.join(repo, "packs"), tmp_path / "packs.away")
    os.mkdir(os.path.join(repo, "packs"))
    capsys.readouterr()
    assert main(["restore", "vm@latest", dst, "--repo", repo, "--force"]) == 6
    assert "none of their pack files" in capsys.readouterr().err
    with open(dst, "rb") as f:
        assert f.read() == before
    assert not os.path.exists(os.path.join(repo, "lost"))


def test_a_device_locked_by_another_writer_is_refused_by_both_restores(tmp_path, loopdev, capsys):
    """restore.sh wrote a device a running pyvbak restore held (O_EXCL is seen only by
    O_EXCL openers): both reported success and the device matched neither snapshot.  Both
    now take the device's advisory lock (flock), and each refuses while the other holds it."""
    import fcntl
    import shutil
    import subprocess

    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20))
    backing = tmp_path / "dev.bin"
    backing.write_bytes(b"\xff" * (2 << 20))
    dev = loopdev(backing)
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert main(["backup", str(img), "--repo", repo, "--vm", "v"]) == 0
    holder = os.open(dev, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the other restore would
        capsys.readouterr()
        assert main(["restore", "v@latest", dev, "--repo", repo, "--force"]) == 2
        assert "is locked by another program" in capsys.readouterr().err
        if shutil.which("flock"):
            p = subprocess.run(["sh", os.path.join(repo, "restore.sh"), "--force", "v@latest", dev],
                               capture_output=True, text=True)
            assert p.returncode != 0 and "is locked by another program" in p.stderr, p.stderr
    finally:
        os.close(holder)
    with open(dev, "rb") as f:
        assert f.read(16) == b"\xff" * 16  # untouched
    assert main(["restore", "v@latest", dev, "--repo", repo, "--force"]) == 0
    with open(dev, "rb") as f:
        assert f.read(1 << 20) == img.read_bytes()


def test_a_qcow2_over_a_block_device_is_never_trusted_to_its_bitmap(tmp_path, loopdev, capsys, monkeypatch):
    """A block device's node records nothing of its content (size 0; its mtime moves only
    for writes through that very node): a write through another node of the device - a
    VM's private /dev, another host on a SAN - went unseen, and the incremental trusted
    the image's bitmap (restore != image)."""
    import json

    qemu_img = require_tool("qemu-img", "qemu-utils")
    qemu_io = require_tool("qemu-io", "qemu-utils")
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (4 << 20) + bytes(28 << 20))
    dev = loopdev(base)
    top = tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", dev, str(top)], check=True)
    subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -P 0x22 8M 1M", str(top)], check=True, capture_output=True)
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    capsys.readouterr()
    results = []
    for step in range(3):
        if step == 2:  # the same device written through a node of its own
            st = os.stat(dev)
            alt = tmp_path / "alt"
            os.mknod(alt, 0o600 | 0o060000, st.st_rdev)
            with open(alt, "r+b") as f:
                f.seek(20 * 65536)
                f.write(os.urandom(4 * 65536))
                os.fsync(f.fileno())
            alt.unlink()
        assert main(["backup", str(top), "--repo", repo, "--vm", "v", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert all(r["cbt"] is False for r in results)
    assert "is not a regular file (a device)" in results[2]["fallback_reason"]
    ref, out = tmp_path / "ref.raw", tmp_path / "out.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(top), str(ref)], check=True)
    assert main(["restore", "v/top@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_a_device_held_by_an_exclusive_user_is_backed_up_with_a_warning(tmp_path, loopdev, capsys):
    """A device is read as it is: one mounted (or held by device mapper, RAID) may be
    written during its backup, which said nothing (session 26's source audit).  Linux
    refuses an O_EXCL open of such a device."""
    import json
    import subprocess
    import sys

    from conftest import run_cli

    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(1 << 20))
    dev = loopdev(img)
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)\n"
                               "print('held', flush=True)\nsys.stdin.read()\n", dev],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = run_cli(capsys, "backup", dev, "--repo", repo, "--vm", "v", "--json")
        assert code == 0, err
        [warning] = json.loads(out)["warnings"]
        assert warning.startswith(f"block device {dev} is in use (mounted") and "not frozen" in warning
    finally:
        holder.stdin.close()
        holder.wait(30)
    code, out, err = run_cli(capsys, "backup", dev, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["warnings"] == [], err
