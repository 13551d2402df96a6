"""Powered-off images served read-only by qemu-nbd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool, unix_listening, wait_until
from images import qemu_io, untokened
from pyvbak.errors import SourceError
from pyvbak.hypervisors.qemu import QemuOfflineImage
from pyvbak.processes import running
from pyvbak.sources.nbd import NbdSource

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
K64 = 64 * 1024


@pytest.fixture(autouse=True)
def tools():
    require_tool("qemu-img", "qemu-utils")
    require_tool("qemu-nbd", "qemu-utils")
    require_tool("qemu-io", "qemu-utils")


def bitmaps(img: Path) -> dict:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)], check=True,
                                     capture_output=True, text=True).stdout)
    return untokened({b["name"]: b["flags"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])})


def backup(img, work, prev=None, fail=False, image_format=None):
    with QemuOfflineImage(img, previous_state=prev, work_dir=work, image_format=image_format) as s:
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            data = src.read(0, 8)
            ct = src.change_tracking(prev) if s.dirty_bitmap else None
        if fail:
            raise RuntimeError("boom")
        s.commit()
    assert not list(work.iterdir())
    return s, (ct.extents if ct else None), data



def killed_offline_run(img, work, *, state=None, outlive: bool = False) -> str:
    """Start an offline session in a child process, SIGKILL the child once qemu-nbd
    serves, return the run id.  ``outlive``: qemu-nbd is not told to die with its parent
    (PR_SET_PDEATHSIG), so it keeps serving."""
    child = (
        "import json,sys,time\n"
        "from pyvbak import processes\n"
        "from pyvbak.hypervisors.qemu import QemuOfflineImage\n"
        + ("processes.die_with_parent = lambda: None\n" if outlive else "")
        + "with QemuOfflineImage(sys.argv[1], previous_state=json.loads(sys.argv[3]), work_dir=sys.argv[2]) as s:\n"
        "    print('READY', s.run, flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", child, str(img), str(work), json.dumps(state)],
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        ready = p.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
    if not outlive:
        # its qemu-nbd dies of the parent's death a moment later, holding the image's lock
        # until then (up to ~6 ms after wait() returned)
        pid = json.loads((Path(work) / f"pyvbak-{ready[1]}.json").read_text())["qemu_nbd"]["pid"]
        wait_until(lambda: _gone(pid), timeout=30, what=f"the killed run's qemu-nbd (pid {pid})")
    return ready[1]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # a zombie holds nothing
    except FileNotFoundError:
        return True

def test_qcow2_bitmap_rotation(tmp_path):
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    qemu_io(img, "qcow2", "write -P 0x41 0 64k")
    s1, ext, data = backup(img, work)
    assert data == b"A" * 8 and s1.format == "qcow2" and s1.size == 8 * MiB
    assert s1.fallback_reason == "no dirty bitmap of an earlier backup of this disk (its first backup through QEMU)" and ext is None
    st1 = s1.change_tracking_state
    assert untokened(st1["bitmap"]) == "pyvbak-gen-1" and bitmaps(img) == {"pyvbak-gen-1": ["auto"]}

    # the "VM" runs and writes; qemu-io keeps the enabled persistent bitmap up to date
    qemu_io(img, "qcow2", f"write -P 0x42 {MiB} 64k", f"write -P 0x43 {4 * MiB} 128k")
    s2, ext, _ = backup(img, work, st1)
    assert s2.fallback_reason is None and untokened(s2.dirty_bitmap) == "pyvbak-gen-1"
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
        s, ext, data = backup(img, work, image_format="raw" if fmt == "raw" else None)  # (.raw: no image suffix)
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
    killed_offline_run(img, work)
    pidfile = next(work.glob("*.pid"))
    nbd_pid = int(pidfile.read_text())
    with QemuOfflineImage(img, previous_state=None, work_dir=work) as s:
        cleaned = " | ".join(s.cleaned_leftovers)
        # qemu-nbd dies with its parent (PR_SET_PDEATHSIG); if not yet, the next run kills it
        assert "-qemu-nbd.pid" in cleaned and "stale dirty bitmap pyvbak-gen-1" in untokened(cleaned)
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
    killed_offline_run(img, work, state=state)
    left = bitmaps(img)
    assert "auto" not in left["pyvbak-gen-1"] and left["pyvbak-gen-2"] == ["auto"], left
    qemu_io(img, "qcow2", "write -P 7 1M 64k")  # written while no backup runs
    with QemuOfflineImage(img, previous_state=state, work_dir=work) as s:
        assert s.fallback_reason is None, s.fallback_reason
        assert any("pyvbak-gen-2 of an unfinished backup merged back into pyvbak-gen-1" in untokened(c)
                   for c in s.cleaned_leftovers), s.cleaned_leftovers
        assert untokened(s.dirty_bitmap) == "pyvbak-gen-1"
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            dirty = src.change_tracking(state).extents
        s.commit()
    assert any(off <= 1 * MiB < off + length for off, length in dirty), dirty


# -- leftovers of offline runs: judged by the owner identity their journal records -------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _serve(img: Path, sock: Path, pidfile: Path | None = None) -> subprocess.Popen:
    """A qemu-nbd nobody's pyvbak run started (a person's, or a stand-in for one)."""
    args = ["qemu-nbd", "-t", "-r", "-f", "qcow2", f"--socket={sock}", "-x", "x"]
    if pidfile is not None:
        args.append(f"--pid-file={pidfile}")
    p = subprocess.Popen(args + [str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: unix_listening(sock), timeout=10, what="qemu-nbd to listen")
    return p


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_live_run_of_another_pid_namespace_is_left_alone(tmp_path):
    """A pyvbak in another container (pid namespace) sharing the work dir serves an image;
    its run id's pid means nothing here (it looked dead, and its socket, pid file and
    journal were removed from under it).  Now its journal's owner identity makes it live:
    a run of the same image here is refused with the one-line error, one of another image
    goes ahead, and nothing of it is touched."""
    if not _unshare_works():
        pytest.skip("needs 'unshare --pid --fork --mount-proc' (root)")
    from pyvbak.hypervisors.qemu.cleanup import socket_listening

    img, other, work = tmp_path / "vm.qcow2", tmp_path / "other.qcow2", tmp_path / "work"
    for i in (img, other):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(i), "4M"], check=True)
    qemu_io(img, "qcow2", "write -P 0x61 0 4k")
    child = (
        "import sys\n"
        "from pyvbak.hypervisors.qemu import QemuOfflineImage\n"
        "with QemuOfflineImage(sys.argv[1], previous_state=None, work_dir=sys.argv[2]) as s:\n"
        "    print('READY', s.run, flush=True); sys.stdin.read(); s.commit()\n"
    )
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", child,
                          str(img), str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        ready = p.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
        run = ready[1]
        sock = work / f"pyvbak-{run}-nbd.sock"
        before = sorted(x.name for x in work.iterdir())
        assert f"pyvbak-{run}-qemu-nbd.pid" in before and socket_listening(sock)
        with pytest.raises(SourceError, match=rf"^another pyvbak session \(pid {run.split('-')[0]}\) is backing up "
                                              rf"{img} \(its files are in work dir {work}\); wait for it to finish$"):
            with QemuOfflineImage(img, previous_state=None, work_dir=work):
                pass
        assert sorted(x.name for x in work.iterdir()) == before
        with QemuOfflineImage(other, previous_state=None, work_dir=work) as s:  # another image: goes ahead
            s.commit()
        state = s.change_tracking_state
        assert sorted(x.name for x in work.iterdir()) == before
        with NbdSource(f"nbd+unix:///pyvbak?socket={sock}") as src:  # still serving
            assert src.read(0, 4) == b"aaaa"
    finally:
        p.stdin.close()
        p.wait(30)
        p.stdout.close()
    assert p.returncode == 0 and not list(work.iterdir())
    with QemuOfflineImage(other, previous_state=state, work_dir=work) as s:  # nothing left of it
        assert s.cleaned_leftovers == []


@pytest.mark.parametrize("case", ["sleep", "another qemu-nbd", "that socket, other start"])
def test_a_pid_file_naming_another_process_does_not_get_it_killed(tmp_path, case):
    """A dead run's pid file (or journal) names a pid that now runs another process: it is
    left running, and the dead run's files are removed."""
    from pyvbak import processes

    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    work.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    run = f"{_dead_pid()}-beef"
    journal = None
    if case == "sleep":  # pid reused by an unrelated program (pid file only, as pyvbak wrote before)
        victim = subprocess.Popen(["sleep", "60"])
    elif case == "another qemu-nbd":  # by a person's qemu-nbd serving another image
        mine = tmp_path / "mine.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(mine), "4M"], check=True)
        victim = _serve(mine, tmp_path / "mine.sock")
    else:  # a qemu-nbd of that very socket, but not the one the run recorded (another start)
        victim = _serve(img, work / f"pyvbak-{run}-nbd.sock")
        journal = {"run": run, "pid": int(run.split("-")[0]), "owner": {**processes.identity(), "start": 1},
                   "qemu_nbd": {"pid": victim.pid, "start": processes.start_time(victim.pid) - 1,
                                "boot": processes.boot_id()}}
        (work / f"pyvbak-{run}.json").write_text(json.dumps(journal))
    try:
        (work / f"pyvbak-{run}-qemu-nbd.pid").write_text(f"{victim.pid}\n")
        (work / f"pyvbak-{run}-nbd.sock").touch()
        with QemuOfflineImage(img, previous_state=None, work_dir=work) as s:
            cleaned = s.cleaned_leftovers
            s.commit()
        assert running(victim.pid), cleaned
        assert f"qemu-nbd process {victim.pid}" not in cleaned
        assert any(f"process {victim.pid}" in c and "not killed" in c for c in cleaned), cleaned
        assert f"file {work / f'pyvbak-{run}-qemu-nbd.pid'}" in cleaned
        assert not list(work.iterdir())
    finally:
        victim.kill()
        victim.wait()


def test_a_leftover_qemu_nbd_of_a_killed_run_is_stopped(tmp_path):
    """pyvbak SIGKILLed and its qemu-nbd still serving (no PR_SET_PDEATHSIG here, as if it
    had failed): the next run stops that qemu-nbd - the process its journal recorded,
    serving that run's socket - and removes the run's files."""
    from pyvbak.hypervisors.qemu.cleanup import socket_listening

    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    run = killed_offline_run(img, work, outlive=True)
    nbd_pid = int((work / f"pyvbak-{run}-qemu-nbd.pid").read_text())
    try:
        assert running(nbd_pid) and socket_listening(work / f"pyvbak-{run}-nbd.sock")  # it outlived pyvbak
        with QemuOfflineImage(img, previous_state=None, work_dir=work) as s:
            cleaned = s.cleaned_leftovers
            s.commit()
        assert f"qemu-nbd process {nbd_pid}" in cleaned, cleaned
        assert f"file {work / f'pyvbak-{run}-qemu-nbd.pid'}" in cleaned
        assert not running(nbd_pid)
        assert not list(work.iterdir())
    finally:
        if running(nbd_pid):
            os.kill(nbd_pid, signal.SIGKILL)


def test_clean_files_never_signals_the_qemu_nbd_of_another_pid_namespace(tmp_path):
    """Even handed a foreign run's files (its callers refuse before), clean_files does not
    signal the pid its pid file names: that pid is another namespace's."""
    from pyvbak import processes
    from pyvbak.hypervisors.qemu.cleanup import clean_files

    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    work.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    run = f"{_dead_pid()}-beef"
    nbd = _serve(img, work / f"pyvbak-{run}-nbd.sock", work / f"pyvbak-{run}-qemu-nbd.pid")
    try:
        journal = {"run": run, "owner": {**processes.identity(), "pidns": "pid:[1]"},
                   "qemu_nbd": processes.spawn_record(nbd.pid)}
        (work / f"pyvbak-{run}.json").write_text(json.dumps(journal))
        from conftest import wait_until

        wait_until(lambda: (work / f"pyvbak-{run}-qemu-nbd.pid").exists(), timeout=10, what="the pid file")
        cleaned = clean_files(sorted(work.iterdir()))
        assert running(nbd.pid) and f"qemu-nbd process {nbd.pid}" not in cleaned
        assert any("not killed" in c and "another machine or pid namespace" in c for c in cleaned), cleaned
    finally:
        nbd.kill()
        nbd.wait()


def test_a_leftover_qemu_nbd_that_ignores_sigterm_is_killed_not_reported_stopped(tmp_path, monkeypatch):
    """A leftover 'qemu-nbd' of a dead run that ignores SIGTERM got reported as stopped
    while it kept running; now it gets SIGKILL after the wait, and the line says so."""
    from pyvbak.hypervisors.qemu import cleanup

    monkeypatch.setattr(cleanup, "STOP_WAIT_S", 0.3)
    run = "1234567-deadbeef"  # any run id: the process's arguments name its socket
    ready = tmp_path / "ready"
    code = ("import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    stub = subprocess.Popen(["bash", "-c", 'exec -a qemu-nbd "$0" -c "$1" "$2"', sys.executable, code,
                             f"--socket={tmp_path}/pyvbak-{run}-nbd.sock"])
    try:
        from conftest import wait_until

        wait_until(ready.exists, what="the stand-in ignoring SIGTERM")
        assert cleanup.serves_run(stub.pid, run)
        line = cleanup._stop_if_ours(stub.pid, None, tmp_path / "x.pid", run, None, None)
        assert line == f"qemu-nbd process {stub.pid} (killed: it ignored SIGTERM for 0.3s)"
        assert stub.wait(5) == -signal.SIGKILL
    finally:
        stub.kill()
        stub.wait()


# ---- what the image's own bitmap cannot see --------------------------------------------

def test_changes_outside_the_image_file_are_never_trusted_to_its_bitmap(tmp_path):
    """A qcow2 bitmap records writes to that qcow2 alone: a write into its backing file,
    a rebase onto another base, and a write into an external data file each changed the
    disk without it, and the incremental that trusted it was silently wrong."""
    work = tmp_path / "work"
    base, base2, img = tmp_path / "base.qcow2", tmp_path / "base2.qcow2", tmp_path / "vm.qcow2"
    for b in (base, base2):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(b), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(img)], check=True)
    s, _, _ = backup(img, work)
    state = s.change_tracking_state
    assert [b["file"] for b in state["backing_chain"]] == [str(base)]
    s, _, _ = backup(img, work, state)  # nothing changed anywhere: the bitmap is trusted
    assert s.fallback_reason is None and s.dirty_bitmap is not None
    state = s.change_tracking_state
    qemu_io(base, "qcow2", "write -P 9 1M 64k")  # into the base, under the overlay
    s, _, _ = backup(img, work, state)
    assert s.fallback_reason and "backing chain" in s.fallback_reason and s.dirty_bitmap is None
    state = s.change_tracking_state
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(base2), "-F", "qcow2", str(img)], check=True)
    s, _, _ = backup(img, work, state)
    assert s.fallback_reason and str(base2) in s.fallback_reason and s.dirty_bitmap is None
    state = s.change_tracking_state
    s, _, _ = backup(img, work, state)  # the new chain, unchanged since: trusted again
    assert s.fallback_reason is None and s.dirty_bitmap is not None

    data_img = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'data.raw'},data_file_raw=on", str(data_img), "4M"], check=True)
    s, _, _ = backup(data_img, work)
    s, _, _ = backup(data_img, work, s.change_tracking_state)
    assert s.fallback_reason and "external data file" in s.fallback_reason and s.dirty_bitmap is None


def test_a_run_killed_after_a_disabled_bitmap_does_not_enable_it(tmp_path):
    """The previous bitmap was disabled (by someone else: it missed writes) and a backup
    that fell back to a full scan was killed: the next run merged its new bitmap into
    the disabled one and enabled it, and the incremental after that missed the writes."""
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    s, _, _ = backup(img, work)
    state = s.change_tracking_state
    old = state["bitmap"]
    subprocess.run(["qemu-img", "bitmap", "--disable", str(img), old], check=True)
    qemu_io(img, "qcow2", "write -P 5 2M 64k")  # not recorded
    killed_offline_run(img, work, state=state)
    assert len(bitmaps(img)) == 2
    with QemuOfflineImage(img, previous_state=state, work_dir=work) as s:
        assert s.fallback_reason and "disabled" in s.fallback_reason, s.fallback_reason
        assert s.dirty_bitmap is None
        s.commit()


def test_a_run_killed_after_an_inconsistent_bitmap_does_not_stop_later_backups(tmp_path):
    """qemu-img refuses to merge into an in-use (inconsistent) bitmap: every later backup
    of the image failed on the leftover of a killed run."""
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    s, _, _ = backup(img, work)
    state = s.change_tracking_state
    # a writer that crashed with the image open leaves its bitmaps in-use
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 64k", "-c", "sigraise 9", str(img)],
                   capture_output=True)
    assert "in-use" in bitmaps(img)[untokened(state["bitmap"])]
    killed_offline_run(img, work, state=state)
    with QemuOfflineImage(img, previous_state=state, work_dir=work) as s:
        assert s.fallback_reason and "in-use" in s.fallback_reason
        s.commit()
    state = s.change_tracking_state
    assert list(bitmaps(img)) == [untokened(state["bitmap"])]
    s, _, _ = backup(img, work, state)  # and the one after it is incremental again
    assert s.fallback_reason is None and s.dirty_bitmap == state["bitmap"]


def test_a_bitmap_made_again_by_another_chain_is_not_trusted(tmp_path):
    """Two backup chains of one image (two repositories, or two --vm names): once the
    image lost its bitmaps (compacted with qemu-img convert, cbt-off), one chain made
    pyvbak-gen-1 again, and the other, whose snapshot recorded its own pyvbak-gen-1,
    trusted it: writes between that snapshot and the new bitmap were never read.  Each
    bitmap's name now carries a random token."""
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    a, _, _ = backup(img, work)  # chain A
    state_a = a.change_tracking_state
    subprocess.run(["qemu-img", "bitmap", "--remove", str(img), state_a["bitmap"]], check=True)
    qemu_io(img, "qcow2", "write -P 1 1M 64k")  # after A's snapshot, before any bitmap
    b, _, _ = backup(img, work)  # chain B's first backup makes generation 1 again
    assert b.change_tracking_state["generation"] == state_a["generation"] == 1
    assert b.change_tracking_state["bitmap"] != state_a["bitmap"]
    s, _, _ = backup(img, work, state_a)  # chain A's next: B's bitmap missed the write
    assert s.fallback_reason and "gone" in s.fallback_reason and s.dirty_bitmap is None


def test_a_stale_journal_does_not_vouch_for_a_disabled_bitmap(tmp_path):
    """The evidence that a killed run disabled the previous bitmap itself must name the
    generation merged back now: a journal of another run (another work dir's, long
    merged) enabled a bitmap that had missed writes (the running VMs' rule)."""
    img, work = tmp_path / "vm.qcow2", tmp_path / "work"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    s, _, _ = backup(img, work)
    state = s.change_tracking_state
    subprocess.run(["qemu-img", "bitmap", "--disable", str(img), state["bitmap"]], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "pyvbak-gen-2-0a1b2c3d"], check=True)
    journal = {"run": "4194305-abcd", "pid": 4194305, "image": str(img),
               "disks": [{"disables": state["bitmap"], "new_bitmap": "pyvbak-gen-2-99999999"}]}
    (work / "pyvbak-4194305-abcd.json").write_text(json.dumps(journal))
    with QemuOfflineImage(img, previous_state=state, work_dir=work) as s:
        assert s.fallback_reason and "disabled" in s.fallback_reason, s.fallback_reason
        s.commit()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_qemu_img_rotates_the_bitmap_loses_no_change_tracking(tmp_path, signum):
    """A signal while 'qemu-img bitmap --disable' ran killed it (subprocess.run kills its
    child; a terminal's Ctrl-C reaches the whole process group: clusters leaked in the
    image) and the teardown, not knowing the bitmap was disabled, left it so and removed
    the journal that said it: the next backup scanned the whole disk.  Now qemu-img runs
    to its end, the step is recorded, then the signal
    stops the backup: the bitmap is enabled again and the next backup uses it."""
    from conftest import wait_until

    real = subprocess.run(["sh", "-c", "command -v qemu-img"], capture_output=True, text=True).stdout.strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-img").write_text(
        f'#!/bin/sh\n"{real}" "$@"; rc=$?\n'
        # (holds until the test has sent its signal: a fixed sleep let a stalled test signal
        # after qemu-img ended)
        f'case " $* " in *" bitmap "*"--disable"*) touch "{tmp_path}/disabling"; i=0\n'
        f'  while [ ! -e "{tmp_path}/go" ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done ;; esac\nexit $rc\n')
    (bindir / "qemu-img").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WORK_DIR=str(tmp_path / "work"),
               PYVBAK_CACHE_DIR=str(tmp_path / "cache"), PATH=f"{bindir}:{os.environ['PATH']}")
    img, repo = tmp_path / "vm.qcow2", tmp_path / "repo"
    subprocess.run([real, "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    qemu_io(img, "qcow2", "write -P 7 0 4M")

    def pyvbak(*args, **kw):
        return subprocess.run([sys.executable, "-m", "pyvbak", *args], capture_output=True, text=True, env=env, **kw)

    assert pyvbak("init", str(repo)).returncode == 0
    assert pyvbak("backup", str(img), "--repo", str(repo), "--vm", "vm").returncode == 0
    qemu_io(img, "qcow2", "write -P 9 8M 64k")
    p = subprocess.Popen([sys.executable, "-m", "pyvbak", "backup", str(img), "--repo", str(repo), "--vm", "vm"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    wait_until(lambda: (tmp_path / "disabling").exists(), timeout=60, what="qemu-img bitmap --disable")
    os.killpg(p.pid, signum)  # as a terminal does: the whole process group
    (tmp_path / "go").touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 10, err
    check = subprocess.run([real, "check", "-q", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # no leaked clusters
    (tmp_path / "disabling").unlink()
    nxt = pyvbak("backup", str(img), "--repo", str(repo), "--vm", "vm", "--json")
    res = json.loads(nxt.stdout)
    assert res["cbt"] is True and res["fallback_reason"] is None and res["changed_blocks"] == 1, res


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_qemu_nbd_is_started_stops_the_backup(tmp_path, signum):
    """Starting qemu-nbd with a preexec_fn runs Python's fork handlers in pyvbak; a signal
    handled in one of them raised there, and Python dropped the exception ("Exception
    ignored"): the backup went on and exited 0.  Here the
    signal comes in the parent's after-fork handler, the instant a real one can land in."""
    child = r"""
import os, signal, subprocess, sys
armed = []
real_init = subprocess.Popen.__init__
def init(self, args, *a, **k):
    if "qemu-nbd" in str(args[0]):
        armed.append(1)
    real_init(self, args, *a, **k)
subprocess.Popen.__init__ = init
def after():
    if armed:
        armed.pop()
        os.kill(os.getpid(), int(os.environ["SIGNUM"]))
os.register_at_fork(after_in_parent=after)
from pyvbak.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVBAK_WORK_DIR=str(work), PYVBAK_CACHE_DIR=str(tmp_path / "cache"),
               SIGNUM=str(int(signum)))
    img, repo = tmp_path / "vm.qcow2", tmp_path / "repo"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    qemu_io(img, "qcow2", "write -P 7 0 4M")
    assert subprocess.run([sys.executable, "-m", "pyvbak", "init", str(repo)], env=env,
                          capture_output=True).returncode == 0
    p = subprocess.run([sys.executable, "-c", child, "backup", str(img), "--repo", str(repo), "--vm", "vm"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 10 and "Exception ignored" not in p.stderr, (p.returncode, p.stderr)
    assert "interrupted" in p.stderr
    assert not [n for n in os.listdir(work) if n.startswith("pyvbak-")]  # qemu-nbd stopped, files gone
    assert subprocess.run(["qemu-img", "info", str(img)], capture_output=True).returncode == 0  # not held
    nxt = subprocess.run([sys.executable, "-m", "pyvbak", "backup", str(img), "--repo", str(repo), "--vm", "vm",
                          "--json"], capture_output=True, text=True, env=env)
    assert nxt.returncode == 0, nxt.stderr


def test_a_raw_image_a_running_qemu_writes_is_refused_as_a_qcow2_one_is(tmp_path, capsys, monkeypatch):
    """A qcow2 a VM holds is refused (qemu-img cannot take its lock); a raw file in the
    same state, or the qcow2 read with --format raw, was read while the VM wrote it: a
    torn snapshot without a word (session 26's audit).  QEMU's write-permission lock
    says so; a read-only user of the image (qemu-nbd -r) does not stop the backup."""
    from conftest import run_cli

    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    raw, qcow = tmp_path / "vm.raw", tmp_path / "vm.qcow2"
    raw.write_bytes(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    sock = tmp_path / "nbd.sock"
    vm = subprocess.Popen(["qemu-storage-daemon",
                           "--blockdev", f"driver=file,filename={raw},node-name=f1",
                           "--blockdev", "driver=raw,file=f1,node-name=r1",
                           "--blockdev", f"driver=file,filename={qcow},node-name=f2",
                           "--blockdev", "driver=qcow2,file=f2,node-name=q2",
                           "--nbd-server", f"addr.type=unix,addr.path={sock}",
                           "--export", "type=nbd,id=e1,node-name=r1,name=r1,writable=on",
                           "--export", "type=nbd,id=e2,node-name=q2,name=q2,writable=on"])
    try:
        wait_until(lambda: unix_listening(str(sock)), timeout=30, what="the stand-in VM's NBD server")
        for args in ((str(raw),), (str(qcow), "--format", "raw"), (str(qcow),)):
            code, out, err = run_cli(capsys, "backup", *args, "--repo", repo, "--vm", "inuse")
            assert code == 4 and "is in use (locked" in err and "qemu:///" in err, err
    finally:
        vm.terminate()
        vm.wait(30)
    reader = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "--socket", str(tmp_path / "ro.sock"), str(raw)])
    try:
        wait_until(lambda: unix_listening(str(tmp_path / "ro.sock")), timeout=30, what="qemu-nbd -r")
        code, out, err = run_cli(capsys, "backup", str(raw), "--repo", repo, "--vm", "inuse")
        assert code == 0, err
    finally:
        reader.terminate()
        reader.wait(30)
