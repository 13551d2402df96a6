"""The restore and read paths and the hypervisor sources: one regression test per defect."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from images import BS, backup_file, make_image
from pyvbak.backends import BackendError
from pyvbak.repo import reader
from pyvbak.repo import restore as restore_mod
from pyvbak.repo.reader import sort_for_reading
from pyvbak.repo.verify import verify_repository


def _one_pack(repo, tmp_path, n):
    img = make_image(tmp_path / "d.img", n * BS, [(0, n * BS, "text")], seed=2)
    backup_file(repo, img)
    recs = repo.load_digest_index().records_at(np.arange(n))
    recs = recs[sort_for_reading(recs)].copy()
    assert len({bytes(p) for p in recs["pack"]}) == 1
    return recs


class _BadStretch:
    """A backend whose reads touching the bytes [lo, hi) of packs fail (a bad stretch of
    the disk under many small frames)."""

    def __init__(self, inner, lo, hi):
        self.inner, self.lo, self.hi, self.calls = inner, lo, hi, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_range_into(self, name, offset, buf):
        self.calls += 1
        if name.startswith("packs/") and offset < self.hi and offset + len(buf) > self.lo:
            raise BackendError(f"{name}: Input/output error")
        return self.inner.read_range_into(name, offset, buf)


def test_a_bad_stretch_of_many_frames_does_not_get_good_frames_after_it_dropped(repo, tmp_path):
    """More than FRAME_RETRY_GIVE_UP small frames on a bad stretch, good frames after it:
    the retries gave up and reported the good frames 'unreadable (not retried)', and
    verify --repair drops every record reported: good blocks lost from the index."""
    n = 40
    recs = _one_pack(repo, tmp_path, n)
    bad = range(3, 3 + reader.FRAME_RETRY_GIVE_UP + 4)
    lo = int(recs["offset"][bad[0]])
    hi = int(recs["offset"][bad[-1]]) + int(recs["clen"][bad[-1]])
    repo.backend = _BadStretch(repo.backend, lo, hi)
    verified = verify_repository(repo, threads=1)
    report = verified.report
    # read errors: copies that could not be read (kept by --repair unless --drop-unreadable)
    assert verified.findings.bad_copies == []
    bad_digests = sorted(d for d, *_ in verified.findings.unreadable_copies)
    assert bad_digests == sorted(bytes(recs["digest"][k]).ljust(32, b"\0") for k in bad)
    assert report["blocks_checked"] == n - len(bad)


# -- backup of a file:// image named like a QEMU format --------------------------------


def test_a_file_uri_of_a_qcow2_is_read_through_qemu(tmp_path, capsys, cli_work_dir, misnamed_qcow2):
    """``backup file:///.../vm.qcow2``: the name chooses qemu-nbd, but the session was
    given the URI itself, taken for a relative path: 'disk image CWD/file:/... does not
    exist'."""
    from conftest import cli_json
    from pyvbak.cli.main import main

    img = tmp_path / "vm.qcow2"
    os.rename(misnamed_qcow2, img)
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    got = cli_json(capsys, ["backup", f"file://{img}", "--repo", str(repo), "--vm", "v"])
    assert got["size"] == 16 << 20 and got["disk"] == "vm"
    assert not cli_work_dir.exists() or list(cli_work_dir.iterdir()) == []


# -- restore's clean-up after a failure -------------------------------------------------


def test_a_close_that_fails_is_not_closed_again(repo, tmp_path, monkeypatch):
    """Linux releases the descriptor even when close() fails (EIO from a network file
    system's write-back): the clean-up closed the same number again - by then perhaps a
    file another thread had opened - and the restore's own failure is still reported."""
    from images import restore_to, vm_image

    img = vm_image(tmp_path / "disk.img", 2 << 20, seed=6)
    sid = backup_file(repo, img).snapshot_id
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_close, other, closes = os.close, [], []

    def close(fd):
        closes.append(fd)
        real_close(fd)
        if not other:
            # another thread opens a file meanwhile: it gets the number just freed
            o = os.open(os.devnull, os.O_RDONLY)
            other.append((o, fd))
            if o == fd:
                raise OSError(errno.EIO, "Input/output error")

    # the temp file's close is the first close once the target was written
    monkeypatch.setattr(restore_mod, "_take_over_file_attributes", lambda fd, st, old_path=None: monkeypatch.setattr(restore_mod.os, "close", close))
    with pytest.raises(restore_mod.RestoreError, match="Input/output error"):
        restore_to(repo, sid, out_dir / "restored.img")
    monkeypatch.setattr(restore_mod.os, "close", real_close)
    (o, fd), = other
    assert o == fd  # the number was reused
    os.fstat(o)  # still the other file's: not closed by the clean-up
    real_close(o)
    assert os.listdir(out_dir) == []


# -- zero runs of a block device: BLKZEROOUT ---------------------------------------------


@pytest.fixture
def loop_with_sectors(tmp_path):
    """``make(path, sector_size)``: a loop device over ``path`` with that logical block size."""
    import subprocess

    from conftest import IN_CI, require_tool

    losetup = require_tool("losetup", "mount")
    made = []

    def make(path, sector_size):
        r = subprocess.run([losetup, "-f", "--show", "--sector-size", str(sector_size), str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            msg = f"cannot attach a loop device ({r.stderr.strip()}): needs root and /dev/loop-control"
            pytest.fail(msg) if IN_CI else pytest.skip(msg)
        made.append(r.stdout.strip())
        return made[-1]

    yield make
    for dev in made:
        subprocess.run([losetup, "-d", dev], check=False)


def _zeroout_spy(monkeypatch, interrupt_at=None):
    real, calls = restore_mod._block_zeroout, []

    def spy(fd, start, end):
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        done = real(fd, start, end)
        calls.append((start, end, done))
        return done

    monkeypatch.setattr(restore_mod, "_block_zeroout", spy)
    return calls


def _zero_tailed_snapshot(repo, tmp_path, size):
    img = make_image(tmp_path / "z.img", size, [(0, BS, "random"), (2 * BS, BS, "random")], seed=1)
    return img, backup_file(repo, img).snapshot_id


def _garbage_device(tmp_path, loop_with_sectors, sector: int):
    """A loop device of 16 blocks of random bytes with ``sector``-byte logical blocks:
    (its backing file, the device)."""
    dst = tmp_path / "dst.img"
    dst.write_bytes(os.urandom(16 * BS))
    return dst, loop_with_sectors(dst, sector)


def test_a_4k_sector_device_zeroes_its_last_run_too(repo, tmp_path, loop_with_sectors, monkeypatch):
    """A snapshot whose size ends inside a 4 KiB sector, onto a 4Kn device: its last zero
    run was given to BLKZEROOUT 512-aligned, refused (EINVAL), and written whole from user
    space (all of a thin disk's empty tail); now the sector-aligned part is the device's."""
    from images import restore_to

    size = 8 * BS + 1000
    img, sid = _zero_tailed_snapshot(repo, tmp_path, size)
    dst, dev = _garbage_device(tmp_path, loop_with_sectors, 4096)
    calls = _zeroout_spy(monkeypatch)
    restore_to(repo, sid, dev, force=True)
    with open(dev, "rb") as f:
        got = f.read(16 * BS)
    assert got[:size] == open(img, "rb").read()
    assert got[size:] == dst.read_bytes()[size:]  # past the snapshot: untouched
    assert calls and all(done for *_, done in calls), calls
    assert calls[-1][1] == size - size % 4096


def test_zero_runs_are_zeroed_in_pieces_and_ctrl_c_is_taken_between(repo, tmp_path, loop_with_sectors,
                                                                    monkeypatch):
    """One BLKZEROOUT per zero run: a device without WRITE ZEROES has the kernel write the
    zeros inside that one call, which no Ctrl-C or SIGTERM interrupts (a TiB run: many
    minutes).  Now in pieces of ZEROOUT_BYTES, a signal taken between two."""
    from images import restore_to
    from pyvbak.errors import Interrupted

    monkeypatch.setattr(restore_mod, "ZEROOUT_BYTES", 2 * BS)
    size = 8 * BS + 1000
    img, sid = _zero_tailed_snapshot(repo, tmp_path, size)
    dst, dev = _garbage_device(tmp_path, loop_with_sectors, 512)
    calls = _zeroout_spy(monkeypatch)
    restore_to(repo, sid, dev, force=True)
    with open(dev, "rb") as f:
        assert f.read(size) == open(img, "rb").read()
    assert len(calls) > 2 and all(e - s <= 2 * BS and done for s, e, done in calls), calls

    calls = _zeroout_spy(monkeypatch, interrupt_at=2)
    with pytest.raises(Interrupted, match="partly overwritten"):
        restore_to(repo, sid, dev, force=True)
    assert len(calls) == 2


# -- the restore kit ---------------------------------------------------------------------


def test_a_refresh_killed_before_its_chmod_is_made_good_by_the_next(tmp_path, monkeypatch):
    """restore.sh is replaced (the backend writes 0600), then made executable: a backup
    killed in between left a current-revision restore.sh that './restore.sh' refuses,
    and no later backup touched it again (its revision was current)."""
    from pyvbak.repo.repository import Repository

    r = Repository.init(str(tmp_path / "repo"))
    script = tmp_path / "repo" / "restore.sh"
    old = script.read_bytes().replace(b"# restore kit revision:", b"# (was) revision:")
    script.write_bytes(old)

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "chmod", killed)
        with pytest.raises(KeyboardInterrupt):
            r.refresh_restore_kit()
    assert script.read_bytes() != old and not os.access(script, os.X_OK)
    assert r.refresh_restore_kit() == ["made restore.sh in the repository executable again"]
    assert os.stat(script).st_mode & 0o777 == 0o755
    assert r.refresh_restore_kit() == []


# -- leftover qemu-nbd: SIGKILL escalation -----------------------------------------------


def test_no_sigkill_for_a_pid_that_went_to_another_process_during_the_wait(tmp_path, monkeypatch):
    """Without a pidfd (kernel < 5.3) the SIGTERM wait watches the pid: a qemu-nbd that
    exited and whose pid another process got meanwhile looked like one ignoring SIGTERM,
    and that other process was SIGKILLed.  The pid is checked again before SIGKILL."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until
    from pyvbak.hypervisors.qemu import cleanup

    monkeypatch.setattr(cleanup, "STOP_WAIT_S", 0.2)
    run = "1234567-deadbeef"
    ready = tmp_path / "ready"
    code = ("import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until(ready.exists, what="the process standing in for the pid's new owner")
        answers = iter([True])  # the leftover's arguments at the first check; then the new owner's

        monkeypatch.setattr(cleanup, "serves_run", lambda pid, r: next(answers, False))
        line = cleanup._stop_if_ours(other.pid, None, tmp_path / "x.pid", run, None, None)
        assert line == f"qemu-nbd process {other.pid}"
        assert other.poll() is None  # not SIGKILLed
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
