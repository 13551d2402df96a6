"""The Source interface: what the engine reads a disk through.

A Source is a context manager over one disk's bytes at one instant.  The engine asks it
for the disk size, which extents are allocated (so holes are never read), optionally
which extents changed since the last backup (changed-block tracking), and reads blocks.

Error contract: every method raises ``pyvbak.errors.SourceError`` (with a one-line
message naming the source) for any I/O or protocol failure; never a bare OSError.
``read`` is thread-safe: the engine calls it from several worker threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool = False  # True: reads as zeros (hole / unallocated); never read it


@dataclass
class ChangeTracking:
    """What a hypervisor says changed since the previous backup.

    ``extents`` is None when change tracking cannot be trusted for this backup; then
    ``fallback_reason`` says why and the engine scans the whole disk.
    ``state`` is stored in the snapshot metadata (e.g. bitmap name and generation) and
    handed back to the hypervisor layer at the next backup to check continuity.
    """

    extents: list[tuple[int, int]] | None
    state: dict = field(default_factory=dict)
    fallback_reason: str | None = None


class Source(Protocol):
    #: a short description for messages and metadata, e.g. "file:/var/lib/vm.img"
    description: str
    #: size of the disk in bytes
    size: int

    def __enter__(self) -> "Source": ...

    def __exit__(self, *exc) -> None: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (short only at end of disk)."""

    def extents(self) -> Iterator[Extent]:
        """Allocation map covering [0, size) in order; zero extents are not read.

        A source whose maps can be large may also offer ``zero_ranges(within=None)``: its
        zero extents as a (k, 2) int64 numpy array of [offset, length], disjoint and
        ascending; the engine then asks that instead (no object per extent).  With
        ``within`` ((offset, length) ranges, ascending: a change-tracking incremental's
        dirty extents) it may answer for those ranges alone."""

    def change_tracking(self, previous_state: dict | None) -> ChangeTracking | None:
        """Changed extents since the backup whose metadata recorded ``previous_state``;
        None when this source has no change tracking at all.  Such a source that cannot be
        scanned cheaply either (an NBD export: every backup reads it whole) may say why in
        an attribute ``why_untracked`` (a string, or None), which the result reports as its
        fallback reason."""

    # Optional: ``done_reading()`` is called once the engine has read everything it will
    # (before its data is made durable): a source holding a point-in-time view of a running
    # VM's disk releases it then.  No read follows; it raises only ``Interrupted``.

    # Optional members the engine looks for (``hasattr``), each changing how it reads:
    #
    # ``fileno()`` and ``path``: a local file or block device.  The engine maps it and
    #   compares the whole disk block by block against the parent's fast hashes in native
    #   code (the mapped scan, engine/backup.py), reads with fewer workers (the page cache
    #   is no network), and hashes the parent's unchanged blocks only where needed.
    # ``read_into(offset, buffer) -> int``: fill a caller's buffer (no allocation per read;
    #   used when there is no ``fileno``: a network source).
    # ``read_ranges_into(ranges, buffer) -> int``: several (offset, length) ranges back to
    #   back into one buffer, all requests in flight at once (a change-tracking
    #   incremental's short dirty runs: one round trip instead of one each).
    # ``zero_ranges(within=None)``: see ``extents``.  ``why_untracked``: see
    #   ``change_tracking``.  ``source_warnings``: lines the result's warnings carry (what
    #   the control plane found about the source, e.g. an image read as raw).
