"""Powered-off images served read-only by qemu-nbd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool
from pyvbak.errors import SourceError
from pyvbak.hypervisors.qemu import QemuOfflineImage
from pyvbak.sources.nbd import NbdSource

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
K64 = 64 * 1024


@pytest.fixture(autouse=True)
def tools():
    require_tool("qemu-img", "qemu-utils")
    require_tool("qemu-nbd", "qemu-utils")
    require_tool("qemu-io", "qemu-utils")


def qemu_io(img: Path, fmt: str, *cmds: str):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)


def bitmaps(img: Path) -> dict:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)], check=True,
                                     capture_output=True, text=True).stdout)
    return {b["name"]: b["flags"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])}


def backup(img, work, prev=None, fail=False):
    with QemuOfflineImage(img, previous_state=prev, work_dir=work) as s:
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            data = src.read(0, 8)
            ct = src.change_tracking(prev) if s.dirty_bitmap else None
        if fail:
            raise RuntimeError("boom")
        s.commit()
    assert not list(work.iterdir())
    return s, (ct.extents if ct else None), data


def test_qcow2_bitmap_rotation(tmp_path):
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    qemu_io(img, "qcow2", "write -P 0x41 0 64k")
    s1, ext, data = backup(img, work)
    assert data == b"A" * 8 and s1.format == "qcow2" and s1.size == 8 * MiB
    assert s1.fallback_reason == "no previous backup" and ext is None
    st1 = s1.change_tracking_state
    assert st1["bitmap"] == "pyvbak-gen-1" and bitmaps(img) == {"pyvbak-gen-1": ["auto"]}

    # the "VM" runs and writes; qemu-io keeps the enabled persistent bitmap up to date
    qemu_io(img, "qcow2", f"write -P 0x42 {MiB} 64k", f"write -P 0x43 {4 * MiB} 128k")
    s2, ext, _ = backup(img, work, st1)
    assert s2.fallback_reason is None and s2.dirty_bitmap == "pyvbak-gen-1"
    assert ext == [(MiB, K64), (4 * MiB, 2 * K64)]
    assert bitmaps(img) == {"pyvbak-gen-2": ["auto"]}

    # a failed backup leaves the previous generation as it was, enabled
    qemu_io(img, "qcow2", "write -P 0x44 0 64k")
    with pytest.raises(RuntimeError):
        backup(img, work, s2.change_tracking_state, fail=True)
    assert bitmaps(img) == {"pyvbak-gen-2": ["auto"]}
    s4, ext, _ = backup(img, work, s2.change_tracking_state)
    assert s4.fallback_reason is None and ext == [(0, K64)]

    # resized image -> fallback
    subprocess.run(["qemu-img", "resize", "-q", str(img), "16M"], check=True)
    s5, ext, _ = backup(img, work, s4.change_tracking_state)
    assert "resized" in s5.fallback_reason and ext is None


def test_other_formats_have_no_cbt(tmp_path):
    work = tmp_path / "work"
    for fmt in ("raw", "vmdk", "vdi", "vhdx"):
        img = tmp_path / f"d.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "4M"], check=True)
        qemu_io(img, fmt, "write -P 0x5a 0 4k")
        s, ext, data = backup(img, work)
        assert data == b"Z" * 8 and s.format == fmt and s.size == 4 * MiB
        assert "cannot store persistent dirty bitmaps" in s.fallback_reason and ext is None


def test_work_dir_too_long_for_the_socket_refused_before_the_bitmap_changes(tmp_path):
    from pyvbak.errors import UsageError

    img = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    s1, _, _ = backup(img, tmp_path / "work")
    assert bitmaps(img) == {"pyvbak-gen-1": ["auto"]}
    deep = tmp_path / ("w" * 60) / ("x" * 60)
    with pytest.raises(UsageError, match=r"too long a path for the NBD socket .* set PYVBAK_WORK_DIR"):
        backup(img, deep, s1.change_tracking_state)
    assert bitmaps(img) == {"pyvbak-gen-1": ["auto"]}  # not rotated
    assert not deep.exists()


def test_missing_image(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        with QemuOfflineImage(tmp_path / "nope.qcow2", previous_state=None, work_dir=tmp_path / "w"):
            pass


def test_killed_run_leaves_qemu_nbd_that_next_run_kills(tmp_path):
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    child = (
        "import sys,time\n"
        "from pyvbak.hypervisors.qemu import QemuOfflineImage\n"
        "with QemuOfflineImage(sys.argv[1], previous_state=None, work_dir=sys.argv[2]) as s:\n"
        "    print('READY', flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", child, str(img), str(work)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().startswith("READY")
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    pidfile = next(work.glob("*.pid"))
    nbd_pid = int(pidfile.read_text())
    with QemuOfflineImage(img, previous_state=None, work_dir=work) as s:
        cleaned = " | ".join(s.cleaned_leftovers)
        # qemu-nbd dies with its parent (PR_SET_PDEATHSIG); if not yet, the next run kills it
        assert "-qemu-nbd.pid" in cleaned and "stale dirty bitmap pyvbak-gen-1" in cleaned
        s.commit()
    assert bitmaps(img) == {"pyvbak-gen-2": ["auto"]}
    assert not os.path.exists(f"/proc/{nbd_pid}") or b"qemu-nbd" not in open(f"/proc/{nbd_pid}/cmdline", "rb").read()
    assert not list(work.iterdir())


def test_a_run_killed_after_rotating_leaves_change_tracking_usable(tmp_path):
    """A run killed after it added its generation and disabled the previous one: the next
    run merges the new one back, enables the previous one again, and - checking after
    that, not before - still backs up incrementally (it once fell back to a full scan,
    calling the merged, re-enabled bitmap 'disabled')."""
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    with QemuOfflineImage(img, previous_state=None, work_dir=work) as s:
        state = s.change_tracking_state
        s.commit()
    assert bitmaps(img) == {"pyvbak-gen-1": ["auto"]}
    child = (
        "import json,sys,time\n"
        "from pyvbak.hypervisors.qemu import QemuOfflineImage\n"
        "with QemuOfflineImage(sys.argv[1], previous_state=json.loads(sys.argv[3]), work_dir=sys.argv[2]) as s:\n"
        "    print('READY', flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", child, str(img), str(work), json.dumps(state)],
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().startswith("READY")
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    left = bitmaps(img)
    assert "auto" not in left["pyvbak-gen-1"] and left["pyvbak-gen-2"] == ["auto"], left
    qemu_io(img, "qcow2", "write -P 7 1M 64k")  # written while no backup runs
    with QemuOfflineImage(img, previous_state=state, work_dir=work) as s:
        assert s.fallback_reason is None, s.fallback_reason
        assert any("pyvbak-gen-2 of an unfinished backup merged back into pyvbak-gen-1" in c
                   for c in s.cleaned_leftovers), s.cleaned_leftovers
        assert s.dirty_bitmap == "pyvbak-gen-1"
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            dirty = src.change_tracking(state).extents
        s.commit()
    assert any(off <= 1 * MiB < off + length for off, length in dirty), dirty
