"""Backup from and restore to real block devices (loop devices; needs root)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import IN_CI, require_tool
from pyvbak.cli.main import main


@pytest.fixture
def loopdev(tmp_path):
    losetup = require_tool("losetup", "mount")
    made = []

    def make(path):
        r = subprocess.run([losetup, "-f", "--show", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            msg = f"cannot attach a loop device ({r.stderr.strip()}): needs root and /dev/loop-control"
            pytest.fail(msg) if IN_CI else pytest.skip(msg)
        made.append(r.stdout.strip())
        return r.stdout.strip()

    yield make
    for dev in made:
        subprocess.run([losetup, "-d", dev], check=False)


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
