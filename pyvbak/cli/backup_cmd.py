"""pyvbak backup SOURCE --repo REPO --vm NAME [--disk NAME] [--json]; pyvbak cbt-off SOURCE"""

from __future__ import annotations

from typing import Optional

import typer

from .. import interrupts
from .common import MAX_THREADS, JsonOption, RepoOption, emit_json, human_bytes, info, open_repository, progress_bar, say


def backup(
    source: str = typer.Argument(..., metavar="SOURCE", help="Disk image path, block device, nbd://… / nbd+unix://… URI, or qemu:///QMP.SOCK (every disk of the running VM, at one instant; ?device=ID or ?node=NODE, repeatable, to choose)."),
    repo: Optional[str] = RepoOption,
    vm: str = typer.Option(..., "--vm", help="Name of the VM the disk belongs to."),
    disk: Optional[str] = typer.Option(None, "--disk", help="Disk name (default: image file name, NBD export, QEMU device id or node)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help=f"Worker threads (default: all cores; at most {MAX_THREADS}: memory grows with them)."),
    verify_cbt: bool = typer.Option(False, "--verify-cbt", help="Scan the whole disk and report blocks change tracking missed."),
    image_format: str = typer.Option("auto", "--format", metavar="FORMAT", help="How an image file or block device is read: raw, or a format QEMU reads (qcow2, qcow, qed, vmdk, vhdx, vpc, vdi: through qemu-nbd). Default auto: by the file name (.qcow2, .vmdk, .vhdx, .vhd, .vdi, ... are read through qemu-nbd, anything else as raw)."),
    json_out: bool = JsonOption,
) -> None:
    """Back up a disk (or a VM's disks): only changed blocks are read, new blocks are stored once, compressed."""
    from ..hypervisors import check_image_format, disk_names, source_spec
    from ..repo.snapshots import check_vm_disk_names

    source = source_spec(source)
    check_image_format(source, image_format)
    names = disk_names(source, disk)  # a qemu:// URI naming no disk: QEMU is asked which it has
    for name in names:
        check_vm_disk_names(vm, name)  # before anything is opened or created (the default repository)
    from ..native import check_forced_kernels

    check_forced_kernels()  # (run_backup checks too, but only after a VM's view is taken)
    r = open_repository(repo, create_default=True)
    results, cleaned = backup_source(r, source, vm=vm, names=names, threads=threads, verify_cbt=verify_cbt,
                                     show_progress=not json_out, image_format=image_format, finish_on_commit=True)
    if json_out:
        outs = []
        for result in results:
            out = result.to_json()
            out["id"] = result.snapshot_id
            outs.append(out)
        emit_json(outs[0] if len(outs) == 1 else outs)
        return
    for line in cleaned:
        info(f"cleanup: {line}")
    for result in results:
        # with several disks, say which one each warning is about
        about = f"{result.vm}/{result.disk}: " if len(results) > 1 else ""
        for w in result.warnings:
            info(f"warning: {about}{w}")
        if verify_cbt and result.cbt_missed_blocks is not None and not len(result.cbt_missed_blocks):
            info(f"{about}change tracking verified: the full scan found no block it had missed")
        say(
            f"snapshot {result.snapshot_id} of {result.vm}/{result.disk} ({human_bytes(result.size)}): scanned "
            f"{human_bytes(result.bytes_scanned)}, read {human_bytes(result.bytes_read)}, changed {human_bytes(result.changed_bytes)}, "
            f"new {human_bytes(result.new_bytes)}, stored {human_bytes(result.stored_bytes)} "
            f"in {result.duration:.2f}s{' (change tracking)' if result.cbt else ''}"
        )


def _bitmap_owner(r, bitmap: str) -> str | None:
    """"VM/DISK (ID)" of the newest snapshot in ``r`` whose change tracking recorded dirty
    bitmap ``bitmap``, or None (asked only when a disk's bitmap was moved on by a backup
    that is not its parent: the snapshot descriptions come from the local cache)."""
    owners = [s for s in r.snapshots() if (s.tracking_state or {}).get("bitmap") == bitmap]
    return f"{owners[-1].vm}/{owners[-1].disk} ({owners[-1].id})" if owners else None


def backup_source(r, source: str, *, vm: str, disk: str | None = None, names: list[str] | None = None,
                  threads: int | None = None, verify_cbt: bool = False, show_progress: bool = True,
                  work_dir: str | None = None, image_format: str = "auto", finish_on_commit: bool = False):
    """What ``pyvbak backup`` does, for any caller (the demo too): lock, clean up after a
    dead run, back up every disk ``source`` names, commit each; (results, cleaned).
    ``names``: ``disk_names(source, disk)`` when the caller has them already.
    ``finish_on_commit``: once every snapshot is committed, signals are only noted
    (pyvbak/interrupts.py) - for a caller whose command ends with this backup's output
    and whose ``main()`` ends that mode."""
    from ..engine.backup import run_backup
    from ..hypervisors import disk_names, open_disks, source_spec
    from ..repo.snapshots import check_vm_disk_names, new_snapshot_id, snapshot_time

    source = source_spec(source)  # (idempotent: the CLI's own call already did it)
    if names is None:
        names = disk_names(source, disk)
    for name in names:
        check_vm_disk_names(vm, name)  # before anything is opened or created
    results = []
    with r.lock(purpose=f"backup of {vm}/{','.join(names)}", clean_stale=False) as lock:
        # under the lock (no prune meanwhile), before a VM's disks are frozen or anything
        # is written or cleaned up: stale locks are removed after it (a refusal keeps a
        # killed run's, the evidence the backup after the packs are back cleans up on), and
        # leftover recovery would take damaged pack indexes whose packs it cannot see for
        # garbage
        r.check_pack_storage()
        lock.remove_stale()
        cleaned = [f"removed stale lock {n}" for n in lock.stale_removed]
        gone = _pack_index_may_be_lost(r, [r.latest(vm, n) for n in names])
        recovered = r.recover_leftovers(after_crash=bool(lock.stale_removed) or gone)
        if gone and any(ln.kind == "adopted" for ln in recovered):
            info(f"warning: packs no pack index names were in {r.packs_location()} (a pack index lost from "
                 f"storage, a prune stopped before it finished, or a backup elsewhere not done yet): indexed them "
                 f"from their own tables of contents (run 'pyvbak verify' if none of the last two happened)")
        cleaned += recovered
        if gone or lock.stale_removed:  # (looked: what is listed now is all indexed)
            r.remember_pack_indexes()
        for line in r.refresh_restore_kit():  # repositories made by an older pyvbak get its fixes
            info(line)
        for line in r.settle_config_copy():  # (config put back from its copy, or the copy written)
            info(line)
        # (checked above: from here on packs/ is taken for the repository's pack storage,
        # and the first backup of a repository marks it so)
        for line in r.mark_pack_storage():
            info(line)
        try:
            with open_disks(source, names, previous_states=_LatestChangeTracking(r, vm), verify_cbt=verify_cbt,
                            work_dir=work_dir, image_format=image_format,
                            bitmap_owner=lambda bitmap: _bitmap_owner(r, bitmap)) as (disks, session_cleaned):
                # several disks were frozen together just now: their snapshots say so
                group = ({"consistency_group": {"id": new_snapshot_id(), "time": snapshot_time(), "disks": names}}
                         if len(names) > 1 else None)
                for d in disks:
                    def committed(result, d=d) -> None:
                        # as the snapshot becomes visible, before any signal is heard
                        # (run_backup's on_commit): the disk retires its old bitmap, the
                        # snapshot is among the kept ones if a Ctrl-C comes next
                        d.commit()
                        results.append(result)
                        if finish_on_commit and len(results) == len(names):
                            # every snapshot is committed: a signal from now on finishes the
                            # run (QEMU's view removed, lock released, result printed), noted
                            interrupts.begin_finishing()

                    with d.open() as src:
                        with progress_bar(f"backup {vm}/{d.name}", show_progress) as update:
                            run_backup(r, src, vm=vm, disk=d.name, threads=threads, verify_cbt=verify_cbt,
                                       progress=update, extra_meta=group, on_commit=committed)
            cleaned += session_cleaned
        except BaseException as exc:
            kept = next((k for k in (getattr(e, "kept_packs", None) for e in (exc, exc.__cause__, exc.__context__)) if k),
                        None)
            if kept:  # run_backup indexed what it had stored (engine._index_stored_packs)
                info(f"kept the {kept[0]} pack(s) ({human_bytes(kept[1])}) this backup stored before it failed: "
                     f"they are indexed, so running it again stores only the rest")
            if results:  # the snapshots made before the failure exist and are complete
                info(("every disk was backed up before the failure: " if len(results) == len(names)
                      else "backed up and kept before the failure: ")
                     + ", ".join(f"{x.vm}/{x.disk} snapshot {x.snapshot_id}" for x in results)
                     + ("" if len(results) == len(names)
                        else " (the disk in progress and those after it were not backed up)"))
            raise
        _remember_written(r)
    for result in results:
        result.cleaned_leftovers = cleaned
        result.consistency_group = (group or {}).get("consistency_group")
    return results, cleaned


class _LatestChangeTracking:
    """{disk name: the change-tracking state of its newest snapshot}, each read from the
    repository when the hypervisor session asks for it, which is once it holds the VM.
    A backup that waited for another session of the same VM (QEMU serves one monitor
    client at a time: a cron run and a manual one) must see the snapshot that session
    just made: read before the wait, the state named a bitmap the other session had
    rotated away, and the backup read the whole disk, saying it was backed up under two
    names (session 25's audit)."""

    def __init__(self, repo, vm: str):
        self._repo, self._vm = repo, vm

    def get(self, name: str) -> dict | None:
        parent = self._repo.latest(self._vm, name)
        return parent.tracking_state if parent else None


def _pack_index_may_be_lost(r, parents) -> bool:
    """Whether a pack index may have been lost from storage, leaving its packs unindexed:
    this backup would carry its ``parents``' records of their blocks on unread into a
    snapshot no restore can read (docs/FORMAT.md, "Write ordering").  Cheap signs first."""
    # one this host listed before is gone (a prune elsewhere, or a loss), or this host
    # knows none yet
    listed = r.pack_index_names()
    gone = r.pack_indexes_gone(listed)
    if gone:
        return True
    # the one a parent wrote is gone: one this host may never have listed (written by
    # another host, or by a run without the cache)
    listed = set(listed)
    if any(p is not None and p.meta.get("pack_index") not in (None, *listed) for p in parents):
        return True
    if gone is None:
        # no local cache, nothing remembered.  Looking at every backup indexed the packs of
        # a backup running meanwhile again, with a warning; looking only when no other
        # lock was there let other hosts' and damaged locks stop every look.  The parents
        # are checked against the index instead.
        return any(_parent_misses_blocks(r, p) for p in parents)
    return False


def _parent_misses_blocks(r, parent) -> bool:
    """Whether ``parent`` (a disk's newest snapshot, or None) names blocks the index does
    not: a pack index lost from storage leaves its packs' blocks so.  A parent that cannot
    be read is the engine's to report (it scans the disk): looked at as if it missed some."""
    from ..errors import IntegrityError

    if parent is None:
        return False
    try:
        return r.lost_blocks_of(parent) > 0
    except IntegrityError:
        return True


def _remember_written(r) -> None:
    """The pack indexes this backup wrote, remembered with the others (best effort: a
    cache that cannot be written never fails a backup)."""
    try:
        r.remember_pack_indexes(add=True)
    except Exception:  # noqa: BLE001 - a listing error here is the next backup's to meet
        pass


def cbt_off(
    source: str = typer.Argument(..., metavar="SOURCE", help="qemu:///QMP.SOCK of a running VM (?device=ID or ?node=NODE to choose disks, as for backup), or a qcow2 image no VM runs."),
    image_format: str = typer.Option("auto", "--format", metavar="FORMAT", help="auto: an image file named .qcow2; qcow2: any image file (never decided by its header alone: a guest's raw disk may hold one)."),
    json_out: bool = JsonOption,
) -> None:
    """Turn pyvbak's change tracking off: remove its dirty bitmaps from the disks (the next backup reads them whole)."""
    from ..hypervisors import default_work_dir, source_spec
    from ..hypervisors.qemu.tracking import remove_change_tracking

    from ..errors import UsageError

    source = source_spec(source)
    if image_format not in ("auto", "qcow2"):
        raise UsageError(f"--format {image_format!r} is not understood here: auto (a .qcow2 name) or qcow2")
    removed = remove_change_tracking(source, work_dir=default_work_dir(), image_format=image_format)
    # done: a stop from here on (the result waiting on a full pipe) is noted, and does not
    # say "the dirty bitmaps not yet removed are still there" of bitmaps all gone
    interrupts.begin_finishing()
    if json_out:
        emit_json({"source": source, "removed": removed})
        return
    for line in removed:
        say(line)
    if not removed:
        say(f"no dirty bitmap of pyvbak's on {source}")
