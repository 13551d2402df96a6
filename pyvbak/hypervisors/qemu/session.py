"""What hot (QMP) and offline (qemu-nbd) sessions share: the engine-facing half."""

from __future__ import annotations

import os
import re
import stat


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


def outside_data(chain: list[dict], *, data_files_from_headers: bool = True) -> tuple[list[dict] | None, str | None]:
    """What the disk's content depends on besides the image file itself, which its dirty
    bitmap cannot see: (identity of every backing file and of the files those keep data in
    - a vmdk's extents, a qcow2's data file: name and stat; None if one cannot be
    identified) and the reason the bitmap can never be trusted (an external data file of
    the image, a backing file that is a device), or None.

    A qcow2 bitmap records the writes made to that qcow2 alone.  A write into a backing
    file, a sibling overlay committed into a shared base, a rebase onto another base, or a
    write into an external raw data file changes the disk without it (each made a
    silently wrong incremental).

    ``data_files_from_headers``: a backing qcow2's data file is the one its header names
    (what QEMU reports) - true for ``qemu-img``/``qemu-nbd``, not for a running VM, whose
    configuration may attach another (libvirt's <dataStore>, ``"data-file": NODE``): such a
    chain is never vouched for (a silently wrong incremental)."""
    top = chain[0]
    data_file = (top.get("format-specific", {}).get("data", {}) or {}).get("data-file")
    if data_file:
        return [], (f"the image keeps its data in the external data file {data_file}, which can be "
                    f"written without the dirty bitmap seeing it")
    identity = []
    for link in chain[1:]:
        name = link.get("filename", "")
        if _PROTOCOL.match(name):
            return None, None  # not a local file (nbd:, rbd:, iscsi://, json:): cannot be identified
        if name and not os.path.isabs(name):
            # QEMU reports a backing file by the name it opened: one it found beside the image
            # naming it is absolute (when that image's is); a relative one is relative to the
            # working directory of the process that opened it (a VM started with relative
            # paths; a json:/file: backing name), which is not pyvbak's - joined with the
            # image's directory, it named a file QEMU did not read (a silently wrong
            # incremental)
            return [], (f"the backing file {name!r} of the image is named relative to the working directory of "
                        f"the process that opened it, so which file it is cannot be known here and writes to it "
                        f"cannot be ruled out; name it absolutely (start the VM with absolute paths, or "
                        f"'qemu-img rebase -u -b /ABSOLUTE/PATH -F FORMAT IMAGE')")
        # ... and the files a backing image keeps its data in: a vmdk descriptor's extents,
        # a qcow2's external data file - written, they change the disk as much as the backing
        # file itself (a write into a backing vmdk's flat extent made an incremental that
        # restored wrong data)
        data = (link.get("format-specific", {}) or {}).get("data", {}) or {}
        others = [_absolute(e.get("filename", ""), name) for e in data.get("extents", []) or [] if isinstance(e, dict)]
        if data.get("data-file"):
            if not data_files_from_headers:
                return [], (f"the backing image {name} keeps its data in an external data file, which the "
                            f"VM may attach from another file than the image names ({data['data-file']}), so "
                            f"writes to it cannot be ruled out")
            if not os.path.isabs(data["data-file"]) and not _PROTOCOL.match(data["data-file"]):
                # QEMU 7.2 opens a relative data-file from its own working directory, not the
                # image's (checked with qemu-io): which file holds the backing image's data
                # depends on the process opening it, so no identity recorded here is the one
                # QEMU reads (a backup trusting the bitmap said "cbt": true and restored
                # something else than the image)
                return [], (f"the backing image {name} keeps its data in the external data file "
                            f"{data['data-file']!r}, named relative to the working directory of the process "
                            f"that opens it, so writes to it cannot be ruled out; give it an absolute name "
                            f"(qemu-img amend -o data_file=/PATH {name})")
            others.append(_absolute(data["data-file"], name))
        for file in [name] + [f for f in others if f != name]:
            reason = _identify(file, link.get("format"), identity)
            if reason is not None:
                return ([], reason) if reason else (None, None)
    return identity, None


#: a protocol name QEMU reports for a node that is no local file (``nbd+unix://…``, ``rbd:…``, ``json:{…}``)
_PROTOCOL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _absolute(name: str, relative_to: str) -> str:
    if name and not os.path.isabs(name) and os.path.isabs(relative_to) and not name.startswith("json:"):
        return os.path.join(os.path.dirname(relative_to), name)
    return name


def _identify(name: str, fmt, identity: list[dict]) -> str | None:
    """Append ``name``'s identity; None when done, "" when it cannot be identified (not a
    local file), else the reason no bitmap can ever vouch for it."""
    try:
        st = os.stat(name) if os.path.isabs(name) else None
    except OSError:
        st = None
    if st is None:
        return ""
    if not stat.S_ISREG(st.st_mode):
        # A block device's node says nothing of its content: its size reads 0 and its mtime
        # moves only for writes through that very node - not through another node of the
        # device (libvirt gives each VM its own /dev), another host on shared storage, or the
        # loop device's file (a silently wrong incremental).
        return (f"the backing file {name} of the image is not a regular file (a device), which can be "
                f"written without the dirty bitmap or its file times showing it")
    identity.append({"file": name, "format": fmt, "dev": st.st_dev, "ino": st.st_ino,
                     "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    # (not ctime: a chmod, chown or SELinux relabel - libvirt's on every VM start - changes it
    # and no data; a write changes mtime)
    return None


def backing_chain_changed(prev: dict, chain: list[dict] | None, image: str) -> str | None:
    """Why the dirty bitmap cannot vouch for the backing files (``outside_data``'s
    identity now against the one the previous backup recorded), or None."""
    if chain is None:
        return (f"a backing file of {image} cannot be identified (not a local file), so changes to it "
                f"cannot be ruled out")
    if chain and "backing_chain" not in prev:
        return (f"the previous backup did not record the backing chain of {image} (made by an older "
                f"pyvbak): changes to a backing file cannot be ruled out")
    if chain != (prev.get("backing_chain") or []):
        before = [b.get("file") for b in prev.get("backing_chain") or [] if isinstance(b, dict)]
        now = [b["file"] for b in chain]
        what = "was replaced or written" if before == now else f"changed from {before or 'none'} to {now or 'none'}"
        return (f"the backing chain of {image} {what} since the previous backup: its dirty bitmap records "
                f"writes to the image alone")
    return None
