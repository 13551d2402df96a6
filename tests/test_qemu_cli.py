"""End to end: `pyvbak backup qemu:///QMP.SOCK?node=NODE` on a running (stand-in) VM."""

from __future__ import annotations

import json
import os

import pytest

from pyvbak.cli.main import main
from images import zero_range
from qemu_vm import MiB, FakeVM


@pytest.fixture
def vm(tmp_path):
    v = FakeVM(tmp_path / "vm", size=32 * MiB)
    v.start()
    try:
        yield v
    finally:
        v.stop()


def _hot_repo(tmp_path, monkeypatch) -> str:
    """A fresh repository, and the CLI's QEMU work dir under the test's tmp."""
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    return repo


def _run_json(capsys, argv) -> dict:
    capsys.readouterr()
    code = main(argv + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_hot_backups_use_the_dirty_bitmap_and_restore_exactly(vm, tmp_path, capsys, monkeypatch):
    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(4 * MiB))
    vm.write(20 * MiB, b"guest text " * 100000)

    first = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert first["cbt"] is False and first["fallback_reason"]
    assert first["disk"] == "disk0"

    # The guest writes 3 separate 64 KiB-aligned regions (5 blocks in all).
    vm.write(1 * MiB, os.urandom(64 * 1024))
    vm.write(8 * MiB, os.urandom(128 * 1024))
    vm.write(30 * MiB, os.urandom(100 * 1024))  # unaligned length: touches 2 blocks
    second = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert second["cbt"] is True and second["fallback_reason"] is None
    assert second["changed_blocks"] == 5
    assert second["bytes_read"] == 5 * 64 * 1024  # only the dirty blocks were read

    out = tmp_path / "restored.img"
    capsys.readouterr()
    assert main(["restore", "web@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)
    # and without pyvbak: a hot snapshot's metadata holds a "size" in its change-tracking
    # state too, and restore.sh took every "size" run together for the disk's
    import subprocess

    sh_out = tmp_path / "restored-sh.img"
    p = subprocess.run(["sh", os.path.join(repo, "restore.sh"), "web@latest", str(sh_out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sh_out.read_bytes() == vm.read(0, vm.size)

    # --verify-cbt: full scan, nothing missed, and the chain keeps working afterwards.
    vm.write(12 * MiB, os.urandom(64 * 1024))
    checked = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web", "--verify-cbt"])
    assert checked["cbt"] is False and checked["cbt_missed_blocks"] == []
    assert checked["changed_blocks"] == 1
    vm.write(13 * MiB, os.urandom(64 * 1024))
    again = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert again["cbt"] is True and again["changed_blocks"] == 1
    assert vm.pyvbak_nodes() == [] and vm.exports() == ["guest"]
    assert len([b for b in vm.bitmaps() if b.startswith("pyvbak-")]) == 1  # just the current generation


def test_unreachable_qmp_socket_is_a_clean_error(tmp_path, capsys, monkeypatch):
    repo = _hot_repo(tmp_path, monkeypatch)
    capsys.readouterr()
    code = main(["backup", f"qemu://{tmp_path}/nope.sock?node=disk0", "--repo", repo, "--vm", "web"])
    _, err = capsys.readouterr()
    assert code == 4
    assert err.startswith("pyvbak: error:") and "nope.sock" in err and len(err.strip().splitlines()) == 1
    capsys.readouterr()
    assert main(["snapshots", "--repo", repo, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_work_dir_too_long_for_the_nbd_socket_is_refused_before_touching_the_vm(vm, tmp_path, capsys, monkeypatch):
    """QEMU refuses a UNIX socket path over 107 bytes only at nbd-server-start, after the
    bitmap rotation and the fleecing set-up; pyvbak refuses the work dir first."""
    deep = tmp_path / ("w" * 60) / ("x" * 60)
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(deep))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    bitmaps_before = vm.bitmaps()
    capsys.readouterr()
    code = main(["backup", vm.uri, "--repo", repo, "--vm", "web"])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("pyvbak: error: work dir ")
    assert "PYVBAK_WORK_DIR" in err and "107" in err
    assert vm.bitmaps() == bitmaps_before
    assert (vm.pyvbak_nodes(), vm.exports(), vm.jobs()) == ([], ["guest"], [])  # only the guest's own export
    assert not any(deep.iterdir())  # nothing created in it
    # a shorter work dir works
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "w"))
    vm.write(0, os.urandom(65536))
    doc = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert doc["new_blocks"] > 0


def test_qemu_killed_mid_backup_fails_cleanly_and_the_next_run_falls_back(vm, tmp_path, capsys, monkeypatch):
    """QEMU dies while pyvbak reads the export: a one-line error, nothing visible in the
    repository, and after QEMU is back the next backup does a full scan with a reason."""
    from pyvbak.errors import PyvbakError
    from pyvbak.hypervisors import open_source
    from pyvbak.repo.repository import Repository
    from pyvbak.repo.verify import verify_repository
    from pyvbak.engine.backup import run_backup
    from qemu_vm import hard_kill

    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    repo_path = str(tmp_path / "repo")
    assert main(["init", repo_path]) == 0
    vm.write(0, os.urandom(8 * MiB))
    first = _run_json(capsys, ["backup", vm.uri, "--repo", repo_path, "--vm", "web"])
    vm.write(2 * MiB, os.urandom(1 * MiB))

    repo = Repository.open(repo_path)
    state = repo.latest("web", "disk0").meta["change_tracking"]["state"]
    with pytest.raises(PyvbakError) as failure:
        with repo.lock():
            with open_source(vm.uri, previous_state=state) as (src, session):
                real_read = src.read_ranges_into

                def read_then_die(ranges, buffer):
                    hard_kill(vm.proc.pid)  # the VM's QEMU dies under the backup
                    vm.proc.wait(10)
                    return real_read(ranges, buffer)

                src.read_ranges_into = read_then_die  # how the engine reads its jobs' block runs
                run_backup(repo, src, vm="web", disk="disk0")
                session.commit()
    # what happened, in one line: it was a wall of failed QMP steps ending in "QEMU still
    # holds pyvbak resources" (of a dead QEMU), naming no cause
    msg = str(failure.value)
    assert "\n" not in msg and "went away during the backup" in msg and "no snapshot was made" in msg, msg
    assert "still holds" not in msg and len(msg) < 300, msg
    # a dead QEMU holds nothing: its fleecing file and the run's journal went at once
    assert not [p for p in os.listdir(tmp_path / "work") if p.startswith("pyvbak-")]
    assert [s.id for s in repo.snapshots()] == [first["id"]]
    assert verify_repository(repo).report["ok"]

    vm.stop()
    vm.start(create=False)  # QEMU restarted on the same qcow2 (its bitmap was not saved cleanly)
    again = _run_json(capsys, ["backup", vm.uri, "--repo", repo_path, "--vm", "web"])
    assert again["cbt"] is False and again["fallback_reason"]
    assert not [p for p in os.listdir(tmp_path / "work") if p.startswith("pyvbak-")]  # fleece file etc. gone
    assert vm.pyvbak_nodes() == [] and vm.exports() == ["guest"]
    out = tmp_path / "after.img"
    capsys.readouterr()
    assert main(["restore", "web@latest", str(out), "--repo", repo_path]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)


def test_forgetting_the_newest_snapshot_forces_a_full_scan_never_a_wrong_incremental(vm, tmp_path, capsys, monkeypatch):
    """The dirty bitmap tracks changes since the newest backup.  Once that snapshot is
    forgotten the next backup's parent is an older one, and an incremental through the
    bitmap would miss what changed between the two: pyvbak must scan everything."""
    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(2 * MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    vm.write(4 * MiB, os.urandom(64 * 1024))  # only in the snapshot about to be forgotten
    newest = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert newest["cbt"] is True
    capsys.readouterr()
    assert main(["forget", newest["id"], "--repo", repo, "--prune"]) == 0
    vm.write(9 * MiB, os.urandom(64 * 1024))
    after = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert after["cbt"] is False and "newer backup that is not in this repository" in after["fallback_reason"]
    assert after["changed_blocks"] == 2  # the block of the forgotten snapshot and the new one
    out = tmp_path / "restored.img"
    capsys.readouterr()
    assert main(["restore", "web@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)
    # and the chain is healthy again
    vm.write(10 * MiB, os.urandom(64 * 1024))
    again = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert again["cbt"] is True and again["changed_blocks"] == 1


def test_one_disk_backed_up_under_two_names_says_so(vm, tmp_path, capsys, monkeypatch):
    """Each backup moves the disk's one bitmap on: under a second name the other's next
    backup scans whole - and said the bitmap's backup "is not in this repository", of a
    backup that was, under the other name."""
    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web", "--disk", "root"])
    other = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web", "--disk", "data"])
    again = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web", "--disk", "root"])
    assert again["cbt"] is False
    assert f"of the backup of web/data ({other['id']}) in this repository: this disk is backed up under two " \
           f"names" in again["fallback_reason"]
    assert "back it up under one name" in again["fallback_reason"]
    out = tmp_path / "root.img"
    capsys.readouterr()
    assert main(["restore", "web/root@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)


def test_work_dir_that_cannot_be_created_is_one_line(vm, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(blocker / "work"))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    bitmaps_before = vm.bitmaps()
    capsys.readouterr()
    assert main(["backup", vm.uri, "--repo", repo, "--vm", "web"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot create the work dir" in err and "PYVBAK_WORK_DIR" in err
    assert vm.bitmaps() == bitmaps_before


def test_blocks_the_guest_zeroes_are_dirty_zero_extents_restored_as_zeros(vm, tmp_path, capsys, monkeypatch):
    """A guest's write-zeroes (fallocate zero-range through its disk: QEMU makes qcow2 zero
    clusters) leaves the blocks dirty in the bitmap and reported zero by the view's
    allocation map: the incremental takes them as zero without a read, and they restore
    as zeros, while the parent still restores its data."""
    repo = _hot_repo(tmp_path, monkeypatch)
    data = os.urandom(2 * MiB)
    vm.write(4 * MiB, data)
    first = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])

    zero_range(vm.guest_path, 4 * MiB + 256 * 1024, 512 * 1024)  # the guest zeroes a range
    assert vm.read(4 * MiB + 256 * 1024, 512 * 1024) == bytes(512 * 1024)
    vm.write(10 * MiB, os.urandom(64 * 1024))
    second = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert second["cbt"] is True
    assert second["changed_blocks"] == 8 + 1  # the 8 discarded blocks and the written one
    assert second["bytes_read"] == 64 * 1024, second  # the zeroed blocks were not read

    for snap, want in ((second["id"], vm.read(0, vm.size)), (first["id"], None)):
        out = tmp_path / f"{snap}.img"
        assert main(["restore", snap, str(out), "--repo", repo]) == 0
        got = out.read_bytes()
        if want is not None:
            assert got == want
        else:
            assert got[4 * MiB : 6 * MiB] == data


def test_the_point_in_time_view_is_gone_before_the_snapshot_is_committed(vm, tmp_path, capsys, monkeypatch):
    """Once everything is read the guest stops paying copy-before-write: the export, the
    view's nodes and the backup job are removed while the packs are made durable, before
    the commit; the bitmaps wait for the commit (the old generation is still there)."""
    from pyvbak.repo.repository import Repository

    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(4 * MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    vm.write(2 * MiB, os.urandom(256 * 1024))

    seen = {}
    real_commit = Repository.commit_snapshot

    def commit_and_look(self, *args, **kwargs):
        seen.update(nodes=vm.pyvbak_nodes(), exports=vm.exports(), jobs=vm.jobs(),
                    bitmaps={n: b["recording"] for n, b in vm.bitmaps().items() if n.startswith("pyvbak-")})
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(Repository, "commit_snapshot", commit_and_look)
    second = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert second["cbt"] is True and second["changed_blocks"] == 4
    assert seen == {"nodes": [], "exports": ["guest"], "jobs": [],
                    "bitmaps": {"pyvbak-gen-1": False, "pyvbak-gen-2": True}}
    assert set(vm.bitmaps()) == {"pyvbak-gen-2"}
    out = tmp_path / "restored.img"
    capsys.readouterr()
    assert main(["restore", "web@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)


def test_a_commit_that_fails_after_the_view_went_keeps_every_change_for_the_next_backup(vm, tmp_path, capsys, monkeypatch):
    """The view is released before the commit; if the commit then fails, the bitmaps are
    still merged back: the next incremental reads what the failed one read, and more."""
    from pyvbak.backends.base import BackendError
    from pyvbak.repo.repository import Repository

    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(4 * MiB))
    first = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    vm.write(1 * MiB, os.urandom(128 * 1024))

    def fail(self, *args, **kwargs):
        raise BackendError("the repository refused the snapshot (test)")

    with monkeypatch.context() as m:
        m.setattr(Repository, "commit_snapshot", fail)
        capsys.readouterr()
        assert main(["backup", vm.uri, "--repo", repo, "--vm", "web"]) != 0
    assert "refused the snapshot" in capsys.readouterr().err
    assert vm.pyvbak_nodes() == [] and vm.exports() == ["guest"] and vm.jobs() == []
    assert set(vm.bitmaps()) == {"pyvbak-gen-1"} and vm.bitmaps()["pyvbak-gen-1"]["recording"]

    vm.write(3 * MiB, os.urandom(64 * 1024))
    again = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert again["cbt"] is True and again["parent"] == first["id"]
    assert again["changed_blocks"] == 3  # the failed run's 2 blocks and the new one
    out = tmp_path / "restored.img"
    capsys.readouterr()
    assert main(["restore", "web@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)


def test_an_incremental_asks_the_allocation_map_only_around_its_dirty_extents(vm, tmp_path, capsys, monkeypatch):
    """Whole-disk block status is what a full backup needs; an incremental through the
    bitmap asks base:allocation only in windows around the dirty extents, and the bitmap
    on a connection of its own (a fragmented TiB qcow2: ~2.4 s per whole-disk pass)."""
    from pyvbak.sources import nbd_protocol as P
    from pyvbak.sources.nbd import BASE_ALLOCATION, NbdClient

    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(2 * MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])

    asked: list = []
    real = NbdClient._submit_all

    def spy(self, requests, *args, **kwargs):
        asked.extend((frozenset(self.contexts), off, ln) for cmd, off, ln, _ in requests if cmd == P.CMD_BLOCK_STATUS)
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(NbdClient, "_submit_all", spy)
    vm.write(24 * MiB, os.urandom(64 * 1024))
    second = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert second["cbt"] is True and second["changed_blocks"] == 1
    allocation = [(off, ln) for ctxs, off, ln in asked if BASE_ALLOCATION in ctxs]
    assert allocation == [(24 * MiB, 64 * 1024)]
    bitmap_only = [(off, ln) for ctxs, off, ln in asked if BASE_ALLOCATION not in ctxs]
    assert bitmap_only == [(0, vm.size)]


def test_a_large_disks_incremental_holds_only_its_dirty_blocks_parent_records(tmp_path, capsys, monkeypatch, parents_streamed):
    """A 256 GiB thin disk (4 M blocks, 192 MiB of index records): its change-tracking
    incremental reads the parent's index in chunks and keeps the dirty blocks' records
    alone; the new index holds the new digests there and the parent's everywhere else."""
    import hashlib

    from pyvbak.engine import backup as engine
    from pyvbak.repo import format as fmt
    from pyvbak.repo.repository import Repository

    repo = _hot_repo(tmp_path, monkeypatch)
    block = 64 * 1024
    with FakeVM(tmp_path / "vm", size=256 << 30) as vm:
        kept, changed = os.urandom(block), os.urandom(block)
        vm.write(3 * block, kept)
        vm.write(200 << 30, os.urandom(block))
        _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "big"])
        parents_streamed.clear()
        vm.write(200 << 30, changed)
        second = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "big"])
    assert second["cbt"] is True and second["changed_blocks"] == 1 and parents_streamed == [True]
    r = Repository.open(repo)
    digests = {int(i): bytes(d) for i, d in zip(*r.data_blocks(r.resolve(second["id"])))}
    assert digests == {3: hashlib.sha256(kept).digest(), (200 << 30) // block: hashlib.sha256(changed).digest()}
    assert fmt.SNAPSHOT_RECORD.itemsize * ((256 << 30) // block) >= engine.STREAM_PARENT_MIN_BYTES


def test_a_failed_backup_whose_cleanup_fails_too_says_so_and_keeps_the_fleecing_file(vm, tmp_path, capsys, monkeypatch):
    """Both the backup and part of its cleanup fail: the one error line says why the backup
    failed *and* that QEMU still holds pyvbak resources (a note on the exception was never
    printed); the fleecing file stays while its node may still write to it; the next run
    removes everything and backs up."""
    from pyvbak.backends.base import BackendError
    from pyvbak.hypervisors.qemu import cleanup
    from pyvbak.repo.repository import Repository

    work = tmp_path / "work"
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(work))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(2 * MiB))
    real_remove_node = cleanup.remove_node

    def remove_node(qmp, name):
        if name.endswith("-fl"):
            raise RuntimeError("node is busy (test)")
        return real_remove_node(qmp, name)

    def fail(self, *args, **kwargs):
        raise BackendError("the repository refused the snapshot (test)")

    with monkeypatch.context() as m:
        m.setattr(Repository, "commit_snapshot", fail)
        m.setattr(cleanup, "remove_node", remove_node)
        capsys.readouterr()
        code = main(["backup", vm.uri, "--repo", repo, "--vm", "web"])
    err = capsys.readouterr().err
    assert code == 3  # the failure's own exit code (a repository error)
    from images import assert_one_error_line

    assert_one_error_line(err, "refused the snapshot", "cleanup after it was incomplete", "QEMU still holds")
    left = [n for n in vm.pyvbak_nodes() if n.endswith("-fl")]
    assert left, vm.pyvbak_nodes()
    fleece_files = [p for p in work.rglob("*") if "fleece" in p.name]
    assert fleece_files, sorted(work.rglob("*"))  # kept: its node is still in QEMU

    res = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert res["cleaned_leftovers"]
    assert vm.pyvbak_nodes() == [] and vm.jobs() == []
    assert not [p for p in work.rglob("*") if "fleece" in p.name]


def test_the_file_node_under_a_qcow2_node_is_refused(vm, tmp_path, capsys, monkeypatch):
    """?node=disk0-file was backed up: the qcow2 container's bytes, not the guest's disk."""
    from images import assert_one_error_line

    repo = _hot_repo(tmp_path, monkeypatch)
    capsys.readouterr()
    uri = vm.uri.replace("node=disk0", "node=disk0-file")
    assert main(["backup", uri, "--repo", repo, "--vm", "web"]) == 4
    assert_one_error_line(capsys.readouterr().err, "'disk0-file'", "file under the qcow2 node 'disk0'", "?node=disk0")
    assert vm.pyvbak_nodes() == [] and vm.exports() == ["guest"]


@pytest.mark.parametrize("streamed", [False, True], ids=["parent-held", "parent-streamed"])
@pytest.mark.parametrize("rewrite_tail", [False, True], ids=["untouched", "tail-rewritten"])
def test_a_disk_shrunk_and_grown_back_is_scanned_whole_not_trusted(tmp_path, capsys, monkeypatch, streamed,
                                                                    rewrite_tail):
    """QEMU keeps no resize history: shrunk and grown back to its old size between two
    backups, a disk has the size it had and a bitmap that passes every check (cut at the
    shrink, grown with clean bits), while its tail now reads as zeros.  The incremental
    trusted it and read nothing: the snapshot restored the old tail.  Now one block the
    bitmap calls clean is read back, the change is found, and the backup scans the disk
    whole, saying why - also when the guest rewrote the last block after the grow."""
    from pyvbak.engine import backup as engine

    if streamed:
        monkeypatch.setattr(engine, "STREAM_PARENT_MIN_BYTES", 0)
    repo = _hot_repo(tmp_path, monkeypatch)
    with FakeVM(tmp_path / "vm", size=16 * MiB) as vm:
        vm.write(0, os.urandom(16 * MiB))
        _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
        vm.ctl.cmd("block_resize", **{"node-name": "disk0", "size": 8 * MiB})
        vm.ctl.cmd("block_resize", **{"node-name": "disk0", "size": 16 * MiB})
        if rewrite_tail:
            vm.write(16 * MiB - 64 * 1024, os.urandom(64 * 1024))
        live = vm.read(0, 16 * MiB)
        assert live[8 * MiB : 16 * MiB - 64 * 1024] == bytes(8 * MiB - 64 * 1024)
        second = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
        assert second["cbt"] is False and "shrunk and grown back" in second["fallback_reason"]
        assert any("change tracking not used" in w for w in second["warnings"])
        out = tmp_path / "restored.img"
        assert main(["restore", "web@latest", str(out), "--repo", repo]) == 0
        assert out.read_bytes() == live
        # the chain goes on from the new generation: the next incremental trusts the bitmap
        vm.write(0, os.urandom(64 * 1024))
        third = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
        assert third["cbt"] is True and third["changed_blocks"] == 1
        assert main(["restore", "web@latest", str(out), "--repo", repo, "--force"]) == 0
        assert out.read_bytes() == vm.read(0, 16 * MiB)


def test_a_hot_backup_after_verify_flagged_a_bad_copy_reads_the_disk_whole_then_tracks_again(vm, tmp_path, capsys,
                                                                                               monkeypatch):
    """The bitmap names only what the guest wrote: a block whose stored copy verify found
    bad is not among it, so the backup after the flag must read the whole disk (its
    parent names the block) - and the chain goes on from the bitmap after it."""
    from pyvbak.repo.repository import Repository

    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(2 * MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    vm.write(4 * MiB, os.urandom(64 * 1024))
    assert _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])["cbt"] is True
    rec = Repository.open(repo).load_digest_index().records[0]
    pack_hex = bytes(rec["pack"]).ljust(32, b"\0").hex()
    path = os.path.join(repo, "packs", pack_hex[:2], pack_hex)
    data = bytearray(open(path, "rb").read())
    data[int(rec["offset"]) + 9] ^= 0x5A
    os.chmod(path, 0o644)
    open(path, "wb").write(data)
    capsys.readouterr()
    assert main(["verify", "--repo", repo]) == 6
    assert "back up the affected disks" in capsys.readouterr().err

    healed = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert healed["fallback_reason"] and "lost from the repository" in healed["fallback_reason"], healed
    # every allocated block read (the 2 MiB and the 64 KiB written), not only the dirty ones
    assert healed["bytes_read"] >= 2 * MiB + 64 * 1024 and healed["new_blocks"] == 1, healed
    capsys.readouterr()
    for snap in Repository.open(repo).snapshots():  # the older snapshots restore again too
        out = tmp_path / f"{snap.id}.img"
        assert main(["restore", snap.id, str(out), "--repo", repo]) == 0, capsys.readouterr().err
    assert (tmp_path / f"{healed['snapshot_id']}.img").read_bytes() == vm.read(0, vm.size)

    vm.write(9 * MiB, os.urandom(64 * 1024))
    after = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert after["cbt"] is True and after["changed_blocks"] == 1 and after["fallback_reason"] is None


class _QmpForwarder:
    """A unix socket that forwards each connection to the VM's QMP socket and says when
    it has: a backup connected here is known to be queued at QEMU's monitor, which
    serves one client at a time, once ``forwarded`` is set."""

    def __init__(self, path, target):
        import socket
        import threading

        self.path, self.target = str(path), str(target)
        self.forwarded = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        import socket
        import threading

        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.target)  # (returns once queued: QEMU accepts it when the monitor is free)
        self.forwarded.set()
        for src, dst in ((client, upstream), (upstream, client)):
            t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _pump(src, dst):
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_a_backup_that_waited_for_another_of_the_vm_goes_on_from_its_snapshot(vm, tmp_path, capsys, monkeypatch):
    """Two backups of one VM at once on its one QMP socket (a cron run and a manual one):
    QEMU serves one monitor client at a time, so the second waits for the first to end.
    It read its parent's change-tracking state before it waited: it took the first's new
    bitmap for a stale one, scanned the whole disk, and said the disk was "backed up under
    two names" (session 25's audit).  It must go on from the first's snapshot instead."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until

    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    vm.write(8 * MiB, os.urandom(MiB))
    env = dict(os.environ, PYVBAK_WORK_DIR=str(tmp_path / "work"))
    cmd = [sys.executable, "-m", "pyvbak", "backup", "--repo", repo, "--vm", "web", "--json"]
    first = subprocess.Popen(cmd[:4] + [vm.uri] + cmd[4:], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    forwarder = _QmpForwarder(tmp_path / "fwd.sock", vm.qmp_path)
    second = None
    try:
        # the first holds the VM's session (its lock object is in QEMU): stopped there
        wait_until(lambda: vm.pyvbak_objects() or first.poll() is not None, timeout=60,
                   what="the first backup's session lock")
        assert first.poll() is None, first.communicate()
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.Popen(cmd[:4] + [f"qemu://{tmp_path / 'fwd.sock'}?node=disk0"] + cmd[4:], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert forwarder.forwarded.wait(60), "the second backup never connected"
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out1, err1 = first.communicate(timeout=120)
        out2, err2 = second.communicate(timeout=120)
    finally:
        forwarder.close()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    a, b = json.loads(out1), json.loads(out2)
    assert a["cbt"] is True and a["changed_bytes"] >= MiB
    assert b["parent"] == a["id"]
    assert b["cbt"] is True, b.get("fallback_reason")
    assert b["changed_bytes"] == 0 and b["bytes_read"] < MiB
    assert "stale dirty bitmap" not in err2
    capsys.readouterr()
    out = tmp_path / "web.img"
    assert main(["restore", "web/disk0@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)


@pytest.mark.parametrize("work_name", ["w?x#y%20", "wp%41", "a+b", "w d\nx"])
def test_a_work_dir_with_uri_characters_in_its_path_serves_hot_and_offline_backups(vm, tmp_path, capsys, monkeypatch,
                                                                                    work_name):
    """The work dir's path goes into the URI of the NBD export pyvbak reads: unescaped, a
    '#' made it a "malformed NBD URI", '%41' or a newline another socket's path (exit 2
    or 4 for an address the user never gave; session 25's audit)."""
    import subprocess

    work = tmp_path / work_name
    work.mkdir(mode=0o700)
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(work))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    vm.write(2 * MiB, os.urandom(MiB))
    again = _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    assert again["cbt"] is True and again["changed_bytes"] >= MiB
    out = tmp_path / "web.img"
    assert main(["restore", "web/disk0@latest", str(out), "--repo", repo]) == 0
    assert out.read_bytes() == vm.read(0, vm.size)
    # a powered-off disk, through qemu-nbd serving on a socket in the same work dir
    image = tmp_path / "off.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(out), str(image)], check=True)
    off = _run_json(capsys, ["backup", str(image), "--repo", repo, "--vm", "off"])
    assert off["bytes_read"] >= 2 * MiB
    assert list(work.iterdir()) == []


def test_a_forced_kernel_that_is_unknown_fails_a_hot_backup_before_the_vm_is_touched(vm, tmp_path, capsys,
                                                                                       monkeypatch):
    """run_backup checks $PYVBAK_SHA256 / $PYVBAK_KERNEL first, but a hot backup reaches it
    only after the VM's point-in-time view is taken (and then removed again)."""
    repo = _hot_repo(tmp_path, monkeypatch)
    vm.write(0, os.urandom(MiB))
    _run_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "web"])
    bitmaps = vm.bitmaps()
    monkeypatch.setenv("PYVBAK_SHA256", "md5")
    events = []
    import pyvbak.hypervisors.qemu.hot as hot

    monkeypatch.setattr(hot.QemuHotBackup, "__enter__", lambda self: events.append("entered") or 1 / 0)
    capsys.readouterr()
    assert main(["backup", vm.uri, "--repo", repo, "--vm", "web"]) == 2
    err = capsys.readouterr().err
    assert "unknown SHA-256 kernel 'md5'" in err and err.count("\n") == 1, err
    assert events == [] and vm.bitmaps() == bitmaps


def test_ctrl_c_while_the_view_is_released_gets_the_usual_ctrl_c_line(vm, tmp_path, capsys, monkeypatch):
    """A Ctrl-C that came while the session released the disk's view was taken after it
    as "interrupted by SIGINT; cleaned up what this run created" (session 26's audit),
    where every other Ctrl-C says "interrupted (Ctrl-C): stopped cleanly; ..."."""
    import signal

    from pyvbak.hypervisors.qemu import cleanup

    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    vm.write(0, os.urandom(MiB))
    real, sent = cleanup.remove_export, []

    def remove_export(*a, **k):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # taken by the deferred block's handler
        return real(*a, **k)

    monkeypatch.setattr(cleanup, "remove_export", remove_export)
    capsys.readouterr()
    assert main(["backup", vm.uri, "--repo", repo, "--vm", "web"]) == 10
    kept, line = capsys.readouterr().err.splitlines()
    assert kept.startswith("kept the 1 pack(s)"), kept  # (what it stored: indexed, not stored again)
    assert line.startswith("pyvbak: error: interrupted (Ctrl-C): stopped cleanly; "), line
    assert sent and vm.pyvbak_nodes() == [] and vm.exports() == ["guest"]
    assert json.loads(_snapshots_json(capsys, repo)) == []


def _snapshots_json(capsys, repo: str) -> str:
    capsys.readouterr()
    assert main(["snapshots", "--repo", repo, "--json"]) == 0
    return capsys.readouterr().out
