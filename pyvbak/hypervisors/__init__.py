"""Control planes: turn what the user names (a path or a URI) into an open Source.

``open_source(spec, previous_state=...)`` is a context manager yielding a Source; for a
hypervisor it also owns the snapshot/export/bitmap resources and cleans them up on exit
(success, error, Ctrl-C, SIGTERM).  The engine never knows which hypervisor a disk came
from.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..errors import UsageError

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbd+tcp://")


def default_disk_name(spec: str) -> str:
    """Default --disk: the image's file name without extension, the NBD export or QEMU node."""
    if spec.startswith(NBD_SCHEMES):
        from ..sources.nbd import parse_nbd_uri

        return parse_nbd_uri(spec)["export"] or "disk0"
    if spec.startswith("qemu://"):
        from urllib.parse import parse_qs, urlsplit

        return (parse_qs(urlsplit(spec).query).get("node") or ["disk0"])[0]
    base = os.path.basename(spec.rstrip("/")) or "disk0"
    return base.split(".", 1)[0] or base


@contextmanager
def open_source(spec: str, *, previous_state: dict | None = None, verify_cbt: bool = False, work_dir: str | None = None):
    """Yields (source, session); call ``session.commit()`` after a successful backup
    (session is None for sources that own no hypervisor resources)."""
    if spec.startswith(NBD_SCHEMES):
        from ..sources.nbd import NbdSource

        with NbdSource(spec) as src:
            yield src, None
        return
    if "://" in spec and not spec.startswith("file://"):
        scheme = spec.split("://", 1)[0]
        raise UsageError(
            f"unsupported source '{scheme}://': give an image path, nbd://HOST[:PORT]/EXPORT, "
            "nbd+unix:///EXPORT?socket=PATH or qemu:///QMP.SOCK?node=NODE"
        )
    from ..sources.file import FileSource

    path = spec[len("file://") :] if spec.startswith("file://") else spec
    with FileSource(path) as src:
        yield src, None
