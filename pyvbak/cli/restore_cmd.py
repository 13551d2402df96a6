"""pyvbak restore SNAPSHOT OUTPUT --repo REPO [--force] [--no-lock]"""

from __future__ import annotations

from typing import Optional

import typer

from .common import MAX_THREADS, JsonOption, NoLockOption, RepoOption, emit_json, human_bytes, maybe_lock, open_repository, progress_bar


def restore(
    snapshot: str = typer.Argument(..., help="Snapshot id (or unique prefix), or VM@latest, or VM/DISK@latest."),
    output: str = typer.Argument(..., help="File or block device to restore to."),
    repo: Optional[str] = RepoOption,
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help=f"Worker threads (default: all cores; at most {MAX_THREADS}: memory grows with them)."),
    json_out: bool = JsonOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Restore a snapshot byte-identical, checking every block's digest."""
    from ..repo.restore import restore_snapshot

    r = open_repository(repo, create_default=False)
    snap = r.resolve(snapshot)
    with maybe_lock(r, no_lock, f"restore of {snap.id}"):
        with progress_bar(f"restore {snap.id}", not json_out) as update:
            report = restore_snapshot(r, snap, output, force=force, threads=threads, progress=update)
    if json_out:
        emit_json(report)
    else:
        print(f"restored snapshot {snap.id} ({snap.vm}/{snap.disk}, {human_bytes(report['size'])}) to {output} in {report['duration']:.2f}s")
