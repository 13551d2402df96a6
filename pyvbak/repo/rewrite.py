"""Replacing what is stored in docs/FORMAT.md's order, for the two writers that remove
what others wrote: prune (``prune.py``) and repair (``repair.py``).

Both read every pack index object, write the new ones (create-only) before the old ones
go, and delete packs only after no index names them; a pack they wrote and gave up is
deleted again.  Kept here, below both: prune also uses repair's primitives (adoption that
leaves out the copies a repair dropped, finishing a repair's interrupted move), so in
prune.py these would make the two modules import each other, and in repair.py prune's own
index rewrite would live in the repair module.
"""

from __future__ import annotations

import numpy as np

from ..backends import ObjectMissing
from . import format as fmt

#: records per new pack index file (80 bytes each: 80 MiB per file before compression)
INDEX_RECORDS_PER_FILE = 1 << 20


def load_pack_indexes(repo) -> tuple[list[str], np.ndarray]:
    """(names, every record) of the pack index objects, read from the repository itself."""
    names = sorted(repo.pack_index_names())
    loaded = [fmt.decode_pack_index(repo.backend.read(n), f"pack index {n}") for n in names]
    return names, (np.concatenate(loaded) if loaded else np.empty(0, fmt.PACK_INDEX_RECORD))


def rewrite_pack_indexes(repo, records: np.ndarray, old_names: list[str]) -> None:
    """Replace the pack index objects ``old_names`` by ones holding ``records``: the new
    objects first (create-only), then the old ones go (FORMAT.md, prune step 4)."""
    written = set()
    for i in range(0, len(records), INDEX_RECORDS_PER_FILE):
        n = repo.write_pack_index(records[i : i + INDEX_RECORDS_PER_FILE])
        if n:
            written.add(n)
    for name in old_names:
        if name not in written:
            delete_object(repo.backend, name)


def delete_object(backend, name: str) -> int:
    """Delete ``name``; its size in bytes (0 if it was already gone)."""
    try:
        size = backend.stat(name)
        backend.delete(name)
        return size
    except ObjectMissing:
        return 0


def delete_new_packs(backend, writer, keep_hex: set[str], *, stopping: bool = False) -> None:
    """Delete the packs ``writer`` finished before it was given up, except those named in
    ``keep_hex`` (a new pack cut under the name of one that was there already is that
    pack): no index names them.  A prune or repair stopped by a signal while repacking
    left complete 16 MiB packs that only the next prune removed (7 stops
    in 25 in a soak test).  ``stopping``: on the way out of a failure or a stop, whose report must
    not be replaced by a deletion's error (a pack left is adopted or deleted by the next
    prune)."""
    for h in sorted(set(writer.packs_cut()) - keep_hex):
        try:
            delete_object(backend, fmt.pack_name(h))
        except Exception:
            if not stopping:
                raise
