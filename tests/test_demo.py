"""`pyvbak demo` (the README's first command) and `pyvbak demo --hot` end to end."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import require_tool
from images import BS, assert_one_error_line, make_image, untokened
from pyvbak.cli.main import main


def _run(capsys, *args):
    capsys.readouterr()
    code = main(["demo", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _work_dir(out: str) -> str:
    """The demo's own work directory, from the line naming the image it made there (other
    demos may run on the machine: only this one's traces are looked for)."""
    (line,) = [ln for ln in out.splitlines() if ln.startswith("made a ") and "disk image" in ln]
    work = os.path.dirname(line.rsplit(": ", 1)[1])
    assert os.path.basename(work).startswith("pyvbak-demo-"), line
    return work


def _traces_of(work: str) -> list[str]:
    """What is left of the demo that used ``work``: the directory, a mount under it, a
    stand-in daemon started on its files."""
    left = [work] if os.path.exists(work) else []
    with open("/proc/self/mountinfo") as f:
        left += [ln for ln in f if work + "/" in ln]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmd and (work + "/").encode() in cmd:
            left.append(cmd.replace(b"\0", b" ")[:200].decode(errors="replace"))
    return left


def _hot_demo_repo(tmp_path) -> str:
    """The tools demo --hot needs, and a fresh repository."""
    require_tool("mkfs.ext4", "e2fsprogs")
    require_tool("qemu-storage-daemon", "qemu-system-common")
    require_tool("fusermount3", "fuse3")
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    return repo


def test_demo_backs_up_changes_restores_and_checks(tmp_path, capsys):
    """And the line it prints to restore without pyvbak runs as printed: for a repository
    given as a file: URI of a path with a space, it named the URI, unquoted."""
    import shlex
    import subprocess
    from pathlib import Path

    require_tool("mkfs.ext4", "e2fsprogs")
    repo = Path(tmp_path / "my repo").as_uri()
    assert main(["init", repo]) == 0
    code, out, err = _run(capsys, "--repo", repo, "--size-mib", "32")
    assert code == 0, err
    assert out.count("byte-identical=True, e2fsck clean=True") == 2 and out.rstrip().endswith("demo OK")
    [line] = [ln for ln in out.splitlines() if ln.startswith("restore without pyvbak: ")]
    command = line[len("restore without pyvbak: "):].replace("OUTPUT.img", shlex.quote(str(tmp_path / "o.img")))
    assert shlex.split(command)[1] == str(tmp_path / "my repo" / "restore.sh")
    env = dict(os.environ, PYTHONPATH="", PATH=os.environ["PATH"])
    done = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.getsize(tmp_path / "o.img") == 32 * 1024 * 1024


def test_demo_into_a_repository_whose_packs_are_gone_is_refused(tmp_path, capsys):
    """Its cold backups ran run_backup directly, past the check the backup command makes:
    two snapshots committed that no restore could read."""
    import shutil

    require_tool("mkfs.ext4", "e2fsprogs")
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert _run(capsys, "--repo", repo, "--size-mib", "32")[0] == 0
    shutil.move(os.path.join(repo, "packs"), tmp_path / "packs.away")
    before = sorted(os.listdir(os.path.join(repo, "snapshots")))
    code, out, err = _run(capsys, "--repo", repo, "--size-mib", "32")
    assert code == 6 and "none of their pack files in" in err
    assert sorted(os.listdir(os.path.join(repo, "snapshots"))) == before
    assert out == ""  # (said before any image is made)


def test_a_hot_demo_into_a_repository_whose_packs_are_gone_starts_no_vm(tmp_path, capsys):
    """It made the image and started the VM stand-in before its backup refused."""
    import shutil

    repo = _hot_demo_repo(tmp_path)
    assert main(["backup", str(make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=7)),
                 "--repo", repo, "--vm", "x"]) == 0
    shutil.move(os.path.join(repo, "packs"), tmp_path / "packs.away")
    code, out, err = _run(capsys, "--hot", "--repo", repo, "--size-mib", "32")
    assert code == 6 and "none of their pack files in" in err and out == "", (out, err)


def test_hot_demo_uses_the_dirty_bitmap_and_leaves_nothing_in_qemu(tmp_path, capsys):
    repo = _hot_demo_repo(tmp_path)
    code, out, err = _run(capsys, "--hot", "--repo", repo, "--size-mib", "32")
    assert code == 0, err
    assert "via the dirty bitmap" in out
    assert "exports ['guest0'], block jobs none, pyvbak nodes none" in out and "pyvbak-gen-2 (recording)" in untokened(out)
    assert out.count("byte-identical=True, e2fsck clean=True") == 2 and out.rstrip().endswith("demo OK")
    assert _traces_of(_work_dir(out)) == []  # work dir, sockets, FUSE mount, daemon: all gone


@pytest.mark.parametrize("size", ["16", "99999999999999"])
def test_demo_size_below_what_its_files_need_or_beyond_a_demo_is_a_usage_error(tmp_path, capsys, size):
    """Beyond, it was a fragment of mkfs's output: "\ta filesystem using a blocksize of 4096."."""
    code, _, err = _run(capsys, "--repo", str(tmp_path / "r"), "--size-mib", size)
    assert code == 2 and f"{size} is not in the range 32<=x<=16384" in assert_one_error_line(err, "--size-mib")
    assert not (tmp_path / "r").exists()


def test_a_demo_disk_mkfs_cannot_make_is_one_line_with_mkfs_s_whole_message(tmp_path, capsys, monkeypatch):
    require_tool("mkfs.ext4", "e2fsprogs")
    from pyvbak import processes

    real = processes.run_helper

    def mkfs_fails(args, **kw):
        if "mkfs.ext4" in args[0]:
            return subprocess.CompletedProcess(args, 1, "", "mkfs.ext4: Size of device (0x5af3107a3fff00 blocks) d.img "
                                                           "too big to create\n\ta filesystem using a blocksize of 4096.\n")
        return real(args, **kw)

    monkeypatch.setattr(processes, "run_helper", mkfs_fails)
    repo = str(tmp_path / "r")
    assert main(["init", repo]) == 0
    code, _, err = _run(capsys, "--repo", repo)
    assert code == 4
    assert_one_error_line(err, "mkfs.ext4 could not make the 64 MiB disk image in /", ": mkfs.ext4: Size of device "
                          "(0x5af3107a3fff00 blocks) d.img too big to create a filesystem using a blocksize of 4096.")


def test_ctrl_c_to_the_whole_process_group_during_the_hot_demo_leaves_nothing(tmp_path):
    """A terminal's Ctrl-C reaches every process of the foreground group: the daemon died
    first, and the demo's own cleanup was then cut short by its KeyboardInterrupt, leaving
    the work directory (and, during start-up, the daemon and its FUSE mount)."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until

    repo = _hot_demo_repo(tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "pyvbak", "demo", "--hot", "--repo", repo, "--size-mib", "32"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        lines = []
        wait_until(lambda: (lines.append(p.stdout.readline()) or "started the VM stand-in" in lines[-1]
                            or p.poll() is not None), timeout=120, what="the stand-in VM")
        assert p.poll() is None, "".join(lines)
        os.killpg(p.pid, signal.SIGINT)  # the whole group, as a terminal does
        p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        p.stdout.close()
        p.stderr.close()
    work = _work_dir("".join(lines))
    wait_until(lambda: not os.path.exists(work), timeout=20, what="the demo's work directory gone")
    assert _traces_of(work) == []


def test_the_stand_in_vm_starts_in_a_work_dir_reached_through_a_symlink(tmp_path):
    """mountinfo names the resolved path (octal escapes for a space): a work dir under a
    symlink never matched, and the start timed out after 30 s (bench/.data as a symlink in
    a frozen copy of the tree)."""
    import subprocess

    from pyvbak.hypervisors.qemu.standin import StandInVM

    require_tool("qemu-storage-daemon", "qemu-system-common")
    real = tmp_path / "real dir"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    work = str(tmp_path / "link")
    image = os.path.join(work, "d.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1M"], check=True)
    vm = StandInVM(work, [image])
    try:
        vm.start(timeout=20)
        assert StandInVM._mounted(vm.guests[0]) and os.path.getsize(vm.guests[0]) == 1 << 20
    finally:
        vm.stop()
    assert not StandInVM._mounted(vm.guests[0])
