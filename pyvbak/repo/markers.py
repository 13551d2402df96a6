"""The ``lost/`` markers (docs/FORMAT.md, "Lost packs"): written, read, and what their
flags add up to.

A marker says that records were dropped from the index (``write_lost_marker``: a prune or
``verify --repair`` removed the records of packs gone from storage, or a repair moved the
blocks of damaged packs out), or that copies of blocks are bad (``write_flag_marker``: a
plain verify or a restore found them damaged or missing; the index is left as it is).
``flagged_copies`` is the set of copies the flags still mark bad.  The Repository keeps
the markers it has read and hides from backups the blocks whose every copy is flagged
(Repository.dedup_index).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ..backends import BackendError, ObjectMissing
from . import digest_sets
from . import format as fmt
from .cache import make_private_dirs, repo_cache_dir
from .snapshots import new_snapshot_id, now_iso


def lost_markers(backend) -> list[str]:
    """Names of the ``lost/`` markers: each says records were dropped from the index -
    of packs a prune found gone from storage, of copies ``verify --repair`` dropped - or
    flags copies a verify found bad (docs/FORMAT.md, "Lost packs")."""
    return sorted(n for n in backend.list(fmt.LOST_PREFIX) if not n.endswith("/"))


def write_lost_marker(backend, packs: list[str], records: int, *, moved_out: list[str] | None = None,
                      moved_to: list[str] | None = None) -> str:
    """A ``lost/`` marker saying that ``records`` records of the packs ``packs`` (gone from
    storage) were dropped from the index (a prune, ``verify --repair``).  ``moved_out``:
    packs whose blocks a repair moved to the packs ``moved_to``, to be deleted (by the
    repair, or the next one or prune when it was interrupted)."""
    name = fmt.LOST_PREFIX + new_snapshot_id()
    doc = {"time": now_iso(), "packs": packs, "records": records}
    if moved_out:
        doc["moved_out"] = moved_out
        doc["moved_to"] = moved_to or []
    backend.write_new(name, json.dumps(doc, indent=2).encode())
    return name


def write_flag_marker(backend, flagged: list[tuple[bytes, bytes, int]],
                      cleared: list[tuple[bytes, bytes, int]] = (), seen: list[str] = ()) -> str:
    """A ``lost/`` marker that flags ``flagged`` ((digest, pack id, offset) of block
    copies a plain ``verify`` found corrupt or missing) without touching the index:
    backups stop deduplicating against them (Repository.dedup_index) and check their
    parents, so the next backup of a disk that still holds the blocks stores them again - what
    ``verify --repair`` achieves by dropping the records, without its exclusive lock.
    ``cleared``: flagged copies verify read back intact since (put back, or a pack
    re-cut under the same name by the backup that stored the blocks again): the flags
    of the markers in ``seen`` (those that verify knew) no longer count for them
    (docs/FORMAT.md, "Lost packs")."""
    name = fmt.LOST_PREFIX + new_snapshot_id()

    def entries(copies):
        return [[d.ljust(32, b"\0").hex(), p.ljust(32, b"\0").hex(), int(o)] for d, p, o in copies]

    doc = {"time": now_iso(), "packs": [], "records": 0, "flagged": entries(flagged), "cleared": entries(cleared),
           "seen": sorted(seen) if cleared else []}
    backend.write_new(name, json.dumps(doc, indent=1).encode())
    return name


def flagged_copies(backend, repo_id: str, names: list[str], read: dict, *,
                   strict: bool) -> tuple[np.ndarray, list[str]]:
    """(sorted unique copy keys (``digest_sets.copy_keys``, S72) of the copies the ``lost/``
    markers ``names`` flag as bad, the markers this answer is from): flagged by a marker,
    and not cleared by a marker that saw that one (a flag written after a clear, by a
    verify that found the copy bad again, counts).  Markers are immutable: ``read`` holds
    the ones parsed so far by name, and gets the new ones (the caller keeps it: each is
    read once per process).  ``strict`` (backups): a marker that cannot be read (an I/O error, not a missing or damaged
    one) raises - a backup that went on without its flags could deduplicate against a
    bad copy; restore uses the flags only to choose which copy to read first, and goes
    on."""
    for name in names:
        if name not in read:
            try:
                got = _marker_flags_cached(backend, repo_id, name, strict=strict)
            except BackendError as exc:
                raise type(exc)(f"{exc} (marker {name} says which stored block copies are bad: a backup needs it; "
                                f"check the storage and run the backup again)") from exc
            if got is None:  # (not strict) unreadable now: asked again next time
                continue
            read[name] = got
    seen = [n for n in names if n in read]
    clears = [(set(read[n][2]), read[n][1]) for n in seen if len(read[n][1])]
    out = []
    for name in seen:
        keys = read[name][0]
        if not len(keys):
            continue
        cleared = [ks for saw, ks in clears if name in saw]
        if cleared:
            keys = keys[~digest_sets.isin(keys, digest_sets.unique(np.concatenate(cleared)))]
        out.append(keys)
    return (digest_sets.unique(np.concatenate(out)) if out else np.empty(0, "S72")), seen


def _marker_flags_cached(backend, repo_id: str, name: str, *, strict: bool):
    """``_marker_flags`` through the local cache: markers are immutable, and one of a
    lost region can flag a million copies (~170 MB of JSON, ~3 s to parse, on every
    backup and restore); the parsed arrays load in
    milliseconds.  Best effort: no cache, or a damaged entry, reads the marker."""
    base = name[len(fmt.LOST_PREFIX):]
    cache = repo_cache_dir(repo_id) if re.fullmatch(r"[0-9A-Za-z-]{1,100}", base) else None
    path = os.path.join(cache, "lost-markers", base + ".npz") if cache else None
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as z:
                flagged, cleared, seen = z["flagged"], z["cleared"], z["seen"]
                if flagged.dtype == np.dtype("S72") and cleared.dtype == np.dtype("S72"):
                    return flagged, cleared, [str(x) for x in seen.tolist()]
        except Exception:  # not cached yet, or damaged: read the marker
            pass
    got = _marker_flags(backend, name, strict=strict)
    if got is not None and got is not _NO_FLAGS and path is not None:  # (a damaged one may be put back)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            make_private_dirs(os.path.dirname(path))
            with open(tmp, "wb") as f:
                np.savez(f, flagged=got[0], cleared=got[1], seen=np.array(got[2], dtype=str))
            os.replace(tmp, path)
        except Exception:  # the cache's problem (full, read-only): the answer stands
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return got


_NO_FLAGS = (np.empty(0, "S72"), np.empty(0, "S72"), [])
_MARKER_NAME = re.compile(re.escape(fmt.LOST_PREFIX) + r"[0-9A-Za-z-]{1,100}")


def _marker_flags(backend, name: str, *, strict: bool):
    """(flagged, cleared, seen) of one ``lost/`` marker: copy keys, copy keys, marker names;
    nothing for a marker of dropped records, a damaged one, or one gone.  Each entry is
    parsed on its own (one that cannot be is skipped, the others count).  An I/O error
    reading it raises when ``strict``, else gives None."""
    try:
        doc = json.loads(backend.read(name))
    except ObjectMissing:
        return _NO_FLAGS
    except BackendError:
        if strict:
            raise
        return None
    except (ValueError, TypeError, RecursionError):  # not JSON (damaged): flags nothing
        return _NO_FLAGS
    if not isinstance(doc, dict):
        return _NO_FLAGS
    return _parse_marker_flags(doc)


def _parse_marker_flags(doc: dict):
    out = []
    for field in ("flagged", "cleared"):
        keys = []
        entries = doc.get(field)
        for entry in entries if isinstance(entries, list) else ():
            try:
                d, p, o = entry
                if (isinstance(d, str) and isinstance(p, str) and len(d) == 64 and len(p) == 64
                        and type(o) is int and 0 <= o < 1 << 64):
                    keys.append(digest_sets.copy_key(bytes.fromhex(d), bytes.fromhex(p), o))
            except (ValueError, TypeError):
                continue
        out.append(np.array(keys, "S72") if keys else np.empty(0, "S72"))
    seen = doc.get("seen")
    # marker names only (a hostile one-line name must not cost megabytes in every backup)
    seen = [n for n in seen if isinstance(n, str) and _MARKER_NAME.fullmatch(n)] if isinstance(seen, list) else []
    return out[0], out[1], seen
