"""pyvbak backup SOURCE --repo REPO --vm NAME [--disk NAME] [--json]"""

from __future__ import annotations

from typing import Optional

import typer

from .common import MAX_THREADS, JsonOption, RepoOption, emit_json, human_bytes, info, open_repository, progress_bar


def backup(
    source: str = typer.Argument(..., help="Disk image path, block device, nbd://… / nbd+unix://… URI, or qemu:///QMP.SOCK?node=NODE."),
    repo: Optional[str] = RepoOption,
    vm: str = typer.Option(..., "--vm", help="Name of the VM the disk belongs to."),
    disk: Optional[str] = typer.Option(None, "--disk", help="Disk name (default: image file name, NBD export or QEMU node)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help=f"Worker threads (default: all cores; at most {MAX_THREADS}: memory grows with them)."),
    verify_cbt: bool = typer.Option(False, "--verify-cbt", help="Scan the whole disk and report blocks change tracking missed."),
    json_out: bool = JsonOption,
) -> None:
    """Back up one disk: only changed blocks are read, new blocks are stored once, compressed."""
    from ..engine.backup import run_backup
    from ..hypervisors import default_disk_name, open_source

    from ..repo.repository import check_vm_disk_names

    disk = disk or default_disk_name(source)
    check_vm_disk_names(vm, disk)  # before anything is opened or created
    r = open_repository(repo)
    with r.lock(purpose=f"backup of {vm}/{disk}") as lock:
        cleaned = [f"removed stale lock {n}" for n in lock.stale_removed]
        cleaned += r.recover_leftovers(after_crash=bool(lock.stale_removed))
        parent = r.latest(vm, disk)
        prev_state = (parent.meta.get("change_tracking") or {}).get("state") if parent else None
        with open_source(source, previous_state=prev_state, verify_cbt=verify_cbt) as (src, session):
            with progress_bar(f"backup {vm}/{disk}", not json_out) as update:
                result = run_backup(r, src, vm=vm, disk=disk, threads=threads, verify_cbt=verify_cbt, progress=update)
            if session is not None:
                session.commit()
            cleaned += list(getattr(session, "cleaned_leftovers", []) or [])
    result.cleaned_leftovers = cleaned
    if json_out:
        out = result.to_json()
        out["id"] = result.snapshot_id
        emit_json(out)
        return
    for line in cleaned:
        info(f"cleanup: {line}")
    for w in result.warnings:
        info(f"warning: {w}")
    print(
        f"snapshot {result.snapshot_id} of {vm}/{disk} ({human_bytes(result.size)}): scanned "
        f"{human_bytes(result.bytes_scanned)}, read {human_bytes(result.bytes_read)}, changed {human_bytes(result.changed_bytes)}, "
        f"new {human_bytes(result.new_bytes)}, stored {human_bytes(result.stored_bytes)} "
        f"in {result.duration:.2f}s{' (change tracking)' if result.cbt else ''}"
    )
