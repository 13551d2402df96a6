"""Random sequences of backups, forgets and prunes - some cut off at a random write or
delete, as a crash would - and after every step the promises: verify finds nothing
wrong, exactly the snapshots that completed are listed, and each restores the bytes it
was made from.  (A run like this found prune deleting a pack it had just rewritten under
the same content-derived name.)"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

import pyvbak.engine.backup as eb
import pyvbak.repo.digest_index as dx
import pyvbak.repo.prune as pr
import pyvbak.repo.rewrite as rw
from pyvbak.engine.backup import run_backup
from pyvbak.repo.prune import forget_snapshots, prune_repository
from pyvbak.repo.repository import Repository
from pyvbak.repo.restore import restore_snapshot
from pyvbak.repo.verify import verify_repository
from pyvbak.sources.file import FileSource

BS = 64 * 1024
STEPS = 30


class Crash(BaseException):
    """The process 'dies' here: nothing after it runs, no cleanup of the repository."""


from pyvbak.backends.base import CollectingStream  # noqa: E402


class CrashingBackend:
    """Passes everything to ``inner``; the n-th write or delete raises Crash instead."""

    def __init__(self, inner, n: int):
        self._inner, self._left = inner, n

    def __getattr__(self, name):
        if name == "open_stream":  # packs: collected and written by write_new below, counted
            return lambda folder: CollectingStream(self, folder)
        attr = getattr(self._inner, name)
        if name not in ("write_new", "replace", "delete"):
            return attr

        def mutate(*args, **kwargs):
            self._left -= 1
            if self._left == 0:
                raise Crash(f"{name} {args[0]}")
            return attr(*args, **kwargs)

        return mutate


def snapshot_ids(location: str) -> set[str]:
    return {s.id for s in Repository.open(location).snapshots()}


@pytest.mark.parametrize("seed", range(16))
def test_random_operations_with_crashes_keep_every_promise(tmp_path, monkeypatch, seed):
    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache") if seed % 2 else "")
    if seed % 2:  # the local digest-index cache at this small size: built, folded, rebuilt
        monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 8)
        monkeypatch.setattr(dx, "MERGE_FRACTION", 2)
        monkeypatch.setattr(dx, "MERGE_CHUNK", 7)
        monkeypatch.setattr(dx, "BUILD_RUN_RECORDS", 16)
    if seed % 4 >= 2:  # several packs per backup and pack index files of a few records
        monkeypatch.setattr(eb, "PACK_TARGET_BYTES", 200_000)
        monkeypatch.setattr(pr, "PACK_TARGET_BYTES", 200_000)
        monkeypatch.setattr(rw, "INDEX_RECORDS_PER_FILE", 5)
    loc = str(tmp_path / "repo")
    Repository.init(loc)
    disks: dict[str, bytearray] = {}
    expected: dict[str, str] = {}  # snapshot id -> SHA-256 of the image it was made from
    for step in range(STEPS):
        op = rnd.choice(["backup"] * 4 + ["forget", "prune", "prune"])
        # the crash at one of the first 6 writes or deletes, or (one time in three) later:
        # of 39 crashes over 40 seeds with 1..40, 10 came after the 6th
        crash_at = rnd.choice([None, None, rnd.randint(1, 6) if rnd.random() < 2 / 3 else rnd.randint(7, 40)])
        base = Repository.open(loc)
        repo = Repository(CrashingBackend(base.backend, crash_at), base.config) if crash_at else base
        if op == "backup":
            d = rnd.choice("ab")
            data = disks.setdefault(d, bytearray(rng.bytes(rnd.randint(4, 24) * BS)))
            for _ in range(rnd.randint(0, 8)):  # new, zero, or another disk's block
                k, c = rnd.randrange(len(data) // BS), rnd.random()
                blk = rng.bytes(BS) if c < 0.5 else bytes(BS) if c < 0.6 else bytes(disks[rnd.choice(list(disks))][:BS])
                data[k * BS : (k + 1) * BS] = blk
            path = tmp_path / f"{d}.img"
            path.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            before = snapshot_ids(loc)
            try:
                with FileSource(str(path)) as src:
                    expected[run_backup(repo, src, vm="vm", disk=d, threads=rnd.choice([1, 2])).snapshot_id] = digest
            except Crash:  # cut off after its metadata was written: complete, so it counts
                expected.update({sid: digest for sid in snapshot_ids(loc) - before})
        elif op == "forget" and expected:
            sid = rnd.choice(sorted(expected))
            try:
                forget_snapshots(repo, [base.resolve(sid)])
            except Crash:
                pass
            if sid not in snapshot_ids(loc):
                del expected[sid]
        elif op == "prune":
            try:
                prune_repository(repo, repack_unused=rnd.choice([0.0, 0.2, 0.5]))
            except Crash:
                pass
        if crash_at:  # what the next backup does after finding the dead run's lock
            Repository.open(loc).recover_leftovers(after_crash=True)
        r = Repository.open(loc)
        report = verify_repository(r).report
        assert report["ok"], (step, op, crash_at, report["problems"][:3])
        assert {s.id for s in r.snapshots()} == set(expected), (step, op, crash_at)
        for sid in rnd.sample(sorted(expected), min(2, len(expected))):
            out = tmp_path / "out.img"
            restore_snapshot(r, r.resolve(sid), str(out), force=True)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == expected[sid], (step, op, sid)
    if seed % 2:  # the cached path really ran
        assert list((tmp_path / "cache").glob("*/digest-index.json"))
