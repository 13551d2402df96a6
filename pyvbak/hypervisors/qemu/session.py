"""What hot (QMP) and offline (qemu-nbd) sessions share: the engine-facing half."""

from __future__ import annotations


class ExportSession:
    """A session that serves a frozen disk over NBD: ``nbd_uri`` and ``dirty_bitmap`` are
    set by the subclass's set-up; ``commit()`` marks the backup durable so that exit
    retires the old bitmap generation instead of merging it back."""

    nbd_uri: str | None = None
    dirty_bitmap: str | None = None
    #: why the frozen view can no longer be trusted (set from another thread), else None
    broken: str | None = None
    _committed = False

    def commit(self) -> None:
        """The backup is durable: on exit, drop the old bitmap generation."""
        self._committed = True

    def open_source(self):
        """An ``NbdSource`` over the frozen view (with the dirty-bitmap context).  Both
        servers a session starts take a second connection (QEMU's NBD server: any number;
        pyvbak's qemu-nbd: ``--shared 2``), on which the bitmap's status is asked alone."""
        from pyvbak.sources.nbd import NbdSource  # the data plane; imported late on purpose

        return NbdSource(self.nbd_uri, dirty_bitmap=self.dirty_bitmap, bitmap_connection=True)
