"""PackWriter: groups compressed block frames into pack objects of ~16 MiB.

A pack is ``frame* trailer`` (docs/FORMAT.md): each frame is a standard zstd frame of
one block; the trailer is a zstd skippable frame listing the blocks, so a pack is still
a valid zstd stream.  Packs are named by the SHA-256 of their trailer (their table of
contents: every block's digest, offset and lengths) and written create-only.  Hashing the
whole pack again instead cost 0.4-0.6 s of a 2.7 s full backup of the 2 GiB bench image
(bench/RESULTS.md, "Pack names"); the blocks inside are checked by their own digests.  Uploads run on one background thread (at most two packs in flight) so
compression workers keep going while a pack is written: memory bound 3 x pack target.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from . import format as fmt


class PackWriter:
    def __init__(self, backend, target_bytes: int):
        self.backend = backend
        self.target = target_bytes
        self._frames: list[bytes] = []
        self._entries: list[tuple[bytes, int, int, int]] = []
        self._size = 0
        self._pending: list[Future] = []
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyvbak-pack-upload")
        self._index_parts: list[np.ndarray] = []
        self.packs_written = 0
        self.bytes_written = 0

    def add(self, digest: bytes, frame: bytes, ulen: int) -> None:
        self._entries.append((digest, self._size, len(frame), ulen))
        self._frames.append(frame)
        self._size += len(frame)
        if self._size >= self.target:
            self.flush()

    def flush(self) -> None:
        if not self._frames:
            return
        trailer_recs = np.zeros(len(self._entries), fmt.PACK_TRAILER_RECORD)
        trailer_recs["digest"] = np.frombuffer(b"".join(e[0] for e in self._entries), "V32")
        trailer_recs["offset"] = [e[1] for e in self._entries]
        trailer_recs["clen"] = [e[2] for e in self._entries]
        trailer_recs["ulen"] = [e[3] for e in self._entries]
        trailer = fmt.encode_pack_trailer(trailer_recs)
        buffers = self._frames + [trailer]
        pack_hex = fmt.pack_id(trailer).hex()
        idx = np.zeros(len(trailer_recs), fmt.PACK_INDEX_RECORD)
        for field in ("digest", "offset", "clen", "ulen"):
            idx[field] = trailer_recs[field]
        idx["pack"] = np.frombuffer(bytes.fromhex(pack_hex), "V32")[0]
        self._index_parts.append(idx)
        self._frames, self._entries, self._size = [], [], 0
        # Bound memory: wait for the older upload before queueing a third pack.
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        size = sum(len(b) for b in buffers)
        self._pending.append(self._uploader.submit(self.backend.write_new, fmt.pack_name(pack_hex), buffers))
        self.packs_written += 1
        self.bytes_written += size

    def finish(self) -> np.ndarray:
        """Flush, wait for every upload (raising the first failure); the index records."""
        try:
            self.flush()
            for fut in self._pending:
                fut.result()
        finally:
            self._pending.clear()
            self._uploader.shutdown(wait=True)
        if not self._index_parts:
            return np.empty(0, fmt.PACK_INDEX_RECORD)
        return np.concatenate(self._index_parts)

    def abort(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._uploader.shutdown(wait=True, cancel_futures=True)
