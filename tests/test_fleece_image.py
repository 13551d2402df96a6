"""The qcow2 fleecing image of QEMU < 8.0, copied from a template kept in the local cache
(pyvbak/hypervisors/qemu/fleece_image.py): qemu-img runs once per size and cluster size,
and a template that changed on disk is made again, never copied."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import require_tool
from pyvbak.hypervisors.qemu import fleece_image

MiB = 1 << 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    require_tool("qemu-img", "qemu-utils")
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = fleece_image._qemu_img_create

    def counting(path, size, cluster, **kw):
        calls.append((size, cluster))
        real(path, size, cluster, **kw)
    monkeypatch.setattr(fleece_image, "_qemu_img_create", counting)
    return tmp_path / "cache" / "fleece-templates", calls


def info(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)


def check(path) -> None:
    r = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_qemu_img_run_per_size_and_cluster_size(cache, tmp_path):
    tdir, calls = cache
    for i in range(3):
        out = tmp_path / f"fl{i}.qcow2"
        fleece_image.create(out, 64 * MiB, 65536)
        i_ = info(out)
        assert i_["format"] == "qcow2" and i_["virtual-size"] == 64 * MiB and i_["cluster-size"] == 65536
        check(out)
    fleece_image.create(tmp_path / "other.qcow2", 64 * MiB, 2 * MiB)
    assert info(tmp_path / "other.qcow2")["cluster-size"] == 2 * MiB
    assert calls == [(64 * MiB, 65536), (64 * MiB, 2 * MiB)]
    assert oct(tdir.stat().st_mode & 0o777) == "0o700" and len(list(tdir.iterdir())) == 2
    with pytest.raises(Exception, match="cannot create the fleecing image"):
        fleece_image.create(tmp_path / "fl0.qcow2", 64 * MiB, 65536)  # never over an existing file


@pytest.mark.parametrize("damage", ["a flipped bit", "an L1 entry", "another size"])
def test_a_template_changed_on_disk_is_made_again_not_copied(cache, tmp_path, damage):
    """A bit flipped in the template (or an L1 entry set: reads of that block would come
    from the image, not the disk) is caught by the SHA-256 in its name or the header
    check; the copy is made from a new template."""
    tdir, calls = cache
    fleece_image.create(tmp_path / "a.qcow2", 16 * MiB, 65536)
    (template,) = tdir.iterdir()
    data = bytearray(template.read_bytes())
    if damage == "a flipped bit":
        data[-1] ^= 1
    elif damage == "an L1 entry":
        l1 = int.from_bytes(data[40:48], "big")
        data[l1:l1 + 8] = (0x80000000_00030000).to_bytes(8, "big")
    else:
        data[24:32] = (32 * MiB).to_bytes(8, "big")
    os.chmod(template, 0o600)
    template.write_bytes(bytes(data))
    if damage != "a flipped bit":  # named after its new bytes: only the header check can tell
        template.rename(tdir / fleece_image.template_name(16 * MiB, 65536, bytes(data)))
    fleece_image.create(tmp_path / "b.qcow2", 16 * MiB, 65536)
    assert len(calls) == 2
    assert (tmp_path / "b.qcow2").read_bytes() == (tmp_path / "a.qcow2").read_bytes()
    assert [p.read_bytes() for p in tdir.iterdir()] == [(tmp_path / "a.qcow2").read_bytes()]


def test_without_a_cache_every_image_is_made_by_qemu_img(cache, tmp_path, monkeypatch):
    _, calls = cache
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    for i in range(2):
        fleece_image.create(tmp_path / f"n{i}.qcow2", 8 * MiB, 65536)
        check(tmp_path / f"n{i}.qcow2")
    assert len(calls) == 2


def test_unused_templates_and_half_made_ones_go(cache, tmp_path):
    tdir, _ = cache
    fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536)
    fleece_image.create(tmp_path / "b.qcow2", 16 * MiB, 65536)
    half = tdir / "qcow2-8388608-65536-4242-abcd.tmp"
    half.write_bytes(b"QFI")
    old, used = sorted(p for p in tdir.iterdir() if p.suffix == ".qcow2")
    long_ago = time.time() - fleece_image.TEMPLATE_KEEP_S - 60
    os.utime(old, (long_ago, long_ago))
    os.utime(half, (time.time() - 2 * fleece_image.TEMPLATE_TMP_KEEP_S,) * 2)
    fleece_image.drop_old_templates()
    assert list(tdir.iterdir()) == [used]


@pytest.mark.parametrize("how", ["read-only", "a file where the directory goes"])
def test_a_cache_that_cannot_hold_a_template_is_no_reason_to_fail(cache, tmp_path, monkeypatch, how):
    """The template cache is a speed-up: one that cannot be written (read-only, full,
    another user's) failed every hot backup.  The image is then
    made where it is needed."""
    tdir, calls = cache
    if how == "read-only":
        tdir.mkdir(parents=True)
        os.chmod(tdir, 0o500)
        if os.access(tdir, os.W_OK):  # root writes anyway: the creation of files in it fails instead
            real_open = os.open

            def read_only(name, flags, *a, **k):
                if k.get("dir_fd") is not None and flags & os.O_CREAT:
                    raise OSError(30, "Read-only file system")
                return real_open(name, flags, *a, **k)
            monkeypatch.setattr(fleece_image.os, "open", read_only)
    else:
        tdir.parent.mkdir(parents=True)
        tdir.write_bytes(b"not a directory")
    fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536)
    check(tmp_path / "a.qcow2")
    assert info(tmp_path / "a.qcow2")["virtual-size"] == 8 * MiB
    os.chmod(tdir, 0o700) if tdir.is_dir() else None


@pytest.mark.parametrize("plant", ["an external data file", "group-writable", "a symlink"])
def test_a_planted_template_is_never_copied(cache, tmp_path, plant):
    """A qcow2 with an external data file, stored under its own SHA-256 name, passed every
    check: QEMU then wrote the guest's old blocks into that other file.  Feature bits, the
    owner and the mode are checked now."""
    tdir, calls = cache
    tdir.mkdir(parents=True)
    victim = tmp_path / "victim.raw"
    src = tmp_path / "planted.qcow2"
    if plant == "an external data file":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={victim}",
                        str(src), str(8 * MiB)], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), str(8 * MiB)], check=True)
    data = src.read_bytes()
    planted = tdir / fleece_image.template_name(8 * MiB, 65536, data)
    if plant == "a symlink":
        planted.symlink_to(src)
    else:
        planted.write_bytes(data)
        os.chmod(planted, 0o664 if plant == "group-writable" else 0o600)
    fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536)
    assert calls == [(8 * MiB, 65536)]  # made anew, not copied
    assert "data-file" not in json.dumps(info(tmp_path / "a.qcow2"))
    if plant == "an external data file":
        assert not planted.exists()
    else:  # the same bytes: the new template has its name, as this user's own file
        assert not planted.is_symlink() and oct(planted.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("case", ["a link to another directory", "another user's directory", "writable by others"])
def test_a_templates_directory_that_is_not_this_users_own_is_not_used(cache, tmp_path, case):
    """Whoever could write the cache root (root running with a user's cache; umask 000)
    could make fleece-templates a link to another directory, and this user's qcow2-* files
    there were removed as damaged templates.  Such a directory is
    not used: the image is made where it is needed, nothing in it is touched."""
    tdir, calls = cache
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keep = elsewhere / "qcow2-8388608-65536-precious.qcow2"
    keep.write_bytes(b"someone's file")
    if case == "a link to another directory":
        tdir.parent.mkdir(parents=True)
        tdir.symlink_to(elsewhere)
    else:
        tdir.mkdir(parents=True)
        (tdir / keep.name).write_bytes(b"someone's file")
        keep = tdir / keep.name
        if case == "another user's directory":
            os.chown(tdir, 65534, 65534) if os.geteuid() == 0 else pytest.skip("needs root to give a directory away")
        else:
            os.chmod(tdir, 0o777)
    fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536)
    check(tmp_path / "a.qcow2")
    fleece_image.forget_template(8 * MiB, 65536)
    fleece_image.drop_old_templates()
    assert keep.read_bytes() == b"someone's file" and calls == [(8 * MiB, 65536)]


def test_a_good_template_on_a_read_only_cache_is_still_copied(cache, tmp_path, monkeypatch):
    """Marking a template used (its mtime) failed on a read-only cache and the template
    was passed over: qemu-img then ran twice per disk, slower than no cache."""
    tdir, calls = cache
    fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536)
    monkeypatch.setattr(fleece_image.os, "utime", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only")))
    assert fleece_image.create(tmp_path / "b.qcow2", 8 * MiB, 65536) is True
    assert calls == [(8 * MiB, 65536)]


def test_a_fifo_named_like_a_template_blocks_nothing(cache, tmp_path):
    """Opened to be read, a FIFO of a template's name blocked the backup for ever: it is
    found out and removed."""
    tdir, calls = cache
    tdir.mkdir(parents=True)
    fifo = tdir / fleece_image.template_name(8 * MiB, 65536, b"x")
    os.mkfifo(fifo)
    fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536)
    check(tmp_path / "a.qcow2")
    assert not fifo.exists()


def test_the_first_image_is_made_once_and_kept_as_the_template(cache, tmp_path):
    """The template is the first backup's own image, checked and kept: a cache without
    room, or a template made apart from the image, cost two qemu-img runs per disk on
    every backup."""
    tdir, calls = cache
    assert fleece_image.create(tmp_path / "a.qcow2", 8 * MiB, 65536) is False
    assert fleece_image.create(tmp_path / "b.qcow2", 8 * MiB, 65536) is True
    assert calls == [(8 * MiB, 65536)]
    (template,) = tdir.iterdir()
    assert template.read_bytes() == (tmp_path / "a.qcow2").read_bytes() == (tmp_path / "b.qcow2").read_bytes()
    assert oct(template.stat().st_mode & 0o777) == "0o600"
