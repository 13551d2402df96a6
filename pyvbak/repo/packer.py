"""PackWriter: groups compressed block frames into pack objects of ~16 MiB.

A pack is ``frame* trailer`` (docs/FORMAT.md): each frame is a standard zstd frame of
one block; the trailer is a zstd skippable frame listing the blocks, so a pack is still
a valid zstd stream.  Packs are named by the SHA-256 of their trailer (their table of
contents: every block's digest, offset and lengths) and written create-only.  Hashing the
whole pack again instead cost 0.4-0.6 s of a 2.7 s full backup of the 2 GiB bench image
(bench/RESULTS.md, "Measurements quoted in the docs", "Pack names"); the blocks inside are checked by their own digests.

Each pack is written through a backend stream (``Backend.open_stream``): its frames go to
storage in pieces while later blocks are still being hashed and compressed, and the
stream is committed under the pack's name once the trailer is known.  The last pack of a
backup therefore no longer waits to be written whole at the end (bench/RESULTS.md,
"Pack streaming").  Writes run on one background thread, in order, so compression workers
keep going while a pack is written; the frames handed to it are bounded by
``2 x target`` (plus the open pack's own).  Each pack's frames are kept until its commit is
done (a pack whose name exists already is compared with them, and replaces the existing
object if that differs: a damaged pack ``verify --repair`` dropped is cut again, same
name, when its blocks are stored again): memory bound about 4 x pack target.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..backends import BackendError, ObjectMissing
from . import format as fmt

#: hand the open pack's frames to the writer thread once this much has gathered
#: (the local stream writes in pieces of 2 MiB: STREAM_PIECE_BYTES)
SEND_BYTES = 2 << 20


class PackWriter:
    def __init__(self, backend, target_bytes: int):
        self.backend = backend
        self.target = target_bytes
        self._frames: list[bytes] = []        # the open pack's frames not yet handed over
        self._entries: list[tuple[bytes, int, int, int]] = []
        self._size = 0                         # bytes of the open pack so far
        self._unsent = 0                       # bytes in self._frames
        self._stream = None                    # the open pack's stream, once it has data
        self._streams: list = []               # streams not yet committed (to abort)
        self._inflight: deque[tuple[Future, int]] = deque()  # (future, bytes it holds)
        self._inflight_bytes = 0
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyvbak-pack-upload")
        self._index_parts: list[np.ndarray] = []
        self._named: list[tuple[Future, np.ndarray]] = []  # each pack's commit, and its records
        self._whole: list[bytes] = []          # every frame of the open pack (see _settle_existing)
        self.packs_written = 0
        self.bytes_written = 0

    def add(self, digest: bytes, frame: bytes, ulen: int) -> None:
        self._entries.append((digest, self._size, len(frame), ulen))
        self._frames.append(frame)
        self._whole.append(frame)
        self._size += len(frame)
        self._unsent += len(frame)
        if self._size >= self.target:
            self.flush()
        elif self._unsent >= SEND_BYTES:
            self._send(self._frames)

    def _send(self, buffers: list, name: str | None = None, whole: list | None = None) -> Future:
        """Hand ``buffers`` (the open pack's next bytes) to the writer thread; with
        ``name``, commit the pack under it afterwards."""
        if self._stream is None:
            self._stream = self.backend.open_stream(fmt.PACKS_FOLDER)
            self._streams.append(self._stream)
        stream, nbytes = self._stream, sum(len(b) for b in buffers)
        # Bound memory: wait for older writes before queueing more than 2 packs' worth.
        while self._inflight and self._inflight_bytes + nbytes > 2 * self.target:
            self._wait_oldest()
        if name is None:
            fut = self._uploader.submit(stream.write, buffers)
        else:
            fut = self._uploader.submit(self._write_and_commit, stream, buffers, name, whole)
            self._stream = None
        self._inflight.append((fut, nbytes))
        self._inflight_bytes += nbytes
        self._frames, self._unsent = [], 0
        return fut

    def _write_and_commit(self, stream, buffers: list, name: str, whole: list) -> bool:
        stream.write(buffers)
        created = stream.commit(name)
        self._streams.remove(stream)  # only this thread changes the list after creation
        if not created:
            self._settle_existing(name, whole)
        return created

    def _settle_existing(self, name: str, whole: list) -> None:
        """``name`` existed already: a pack with this table of contents was stored before
        (a pack a prune is about to delete, a killed writer's) - or it is a damaged pack
        whose every record ``verify --repair`` dropped: the backup storing those blocks
        again cuts the very same pack, and indexing the damaged one again would make the
        new snapshot reference the damage.  So the existing object is compared with this
        pack's bytes (only on such a collision: rare) and, if they differ, replaced by them
        (atomically: readers see one complete pack or the other, both valid for the
        index records, which name the same frames at the same offsets)."""
        try:
            same = self.backend.read(name) == b"".join(whole)
        except (ObjectMissing, BackendError):  # gone meanwhile, or unreadable (damaged): replaced
            same = False
        if not same:
            self.backend.replace(name, whole)

    def _wait_oldest(self) -> None:
        fut, nbytes = self._inflight.popleft()
        self._inflight_bytes -= nbytes
        fut.result()

    def flush(self) -> None:
        if not self._entries:
            return
        trailer_recs = np.zeros(len(self._entries), fmt.PACK_TRAILER_RECORD)
        trailer_recs["digest"] = np.frombuffer(b"".join(e[0] for e in self._entries), "V32")
        trailer_recs["offset"] = [e[1] for e in self._entries]
        trailer_recs["clen"] = [e[2] for e in self._entries]
        trailer_recs["ulen"] = [e[3] for e in self._entries]
        trailer = fmt.encode_pack_trailer(trailer_recs)
        pack_hex = fmt.pack_id(trailer).hex()
        idx = np.zeros(len(trailer_recs), fmt.PACK_INDEX_RECORD)
        for field in ("digest", "offset", "clen", "ulen"):
            idx[field] = trailer_recs[field]
        idx["pack"] = np.frombuffer(bytes.fromhex(pack_hex), "V32")[0]
        self._index_parts.append(idx)
        size = self._size + len(trailer)
        self._entries, self._size = [], 0
        whole, self._whole = self._whole + [trailer], []
        self._named.append((self._send(self._frames + [trailer], name=fmt.pack_name(pack_hex), whole=whole), idx))
        self.packs_written += 1
        self.bytes_written += size

    def finish(self) -> np.ndarray:
        """Flush, wait for every write (raising the first failure); the index records."""
        try:
            self.flush()
            while self._inflight:
                self._wait_oldest()
        finally:
            self._uploader.shutdown(wait=True)
            self._abort_streams()
        if not self._index_parts:
            return np.empty(0, fmt.PACK_INDEX_RECORD)
        return np.concatenate(self._index_parts)

    def packs_cut(self) -> list[str]:
        """The names (hex) of the packs this writer has cut, in order: stored, being
        stored, or given up by an abort."""
        return [bytes(part["pack"][0]).hex() for part in self._index_parts if len(part)]

    def abort(self) -> np.ndarray:
        """Stop: writes not started are dropped, the one under way is waited for, streams
        not committed leave no temp file.  Returns the index records of the packs that
        are stored whole under their names (committed, or found there already): a failed
        backup indexes them, so that its retry does not store their blocks again."""
        for fut, _ in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._uploader.shutdown(wait=True, cancel_futures=True)
        self._abort_streams()
        stored = [idx for fut, idx in self._named
                  if fut.done() and not fut.cancelled() and fut.exception() is None]
        return np.concatenate(stored) if stored else np.empty(0, fmt.PACK_INDEX_RECORD)

    def _abort_streams(self) -> None:
        """Streams that were not committed (a failure, an abort) leave no temp file."""
        for stream in list(self._streams):
            stream.abort()
        self._streams.clear()
