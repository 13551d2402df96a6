"""Repositories in trouble, for tests: a CLI child stopped at a failpoint (to be killed
there), reads of a pack that fail with an I/O error, a repository that holds its blocks
twice (a bad copy beside a good one), and how many index records a pack has."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from conftest import reaped, wait_until
from images import BS, backup_file, make_image, restore_to, same_file
from pyvbak.backends import BackendError
from pyvbak.backends.local import LocalBackend
from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository


#: ``python -c FAILPOINT_CHILD ARGS...``: the CLI with the local backend wrapped so that
#: right after (or, "mid-pack", in the middle of) the write that the environment's
#: PYVBAK_TEST_FAILPOINT names, it creates the file PYVBAK_TEST_MARKER and waits - until
#: the file PYVBAK_TEST_RELEASE exists, or (without one) until it is killed
FAILPOINT_CHILD = r"""
import os, sys, time
from pyvbak.backends import local as L
from pyvbak.backends.base import as_buffers

point, marker = os.environ["PYVBAK_TEST_FAILPOINT"], os.environ["PYVBAK_TEST_MARKER"]
prefix, nth = {
    "lock": ("locks/", 1),
    "mid-pack": ("packs/", 1),
    "pack-1": ("packs/", 1),
    "pack-2": ("packs/", 2),
    "pack-index": ("index/", 1),
    "snapshot-index": ("snapshots/", 1),
}[point]
seen = [0]

def pause():
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    release = os.environ.get("PYVBAK_TEST_RELEASE")
    while not (release and os.path.exists(release)):  # without a release file: until killed
        time.sleep(0.01)

# wraps a call that makes an object `name` visible: LocalBackend.write_new, and the
# commit of a stream (packs are written through streams)
def hooked(orig):
    def call(self, name, *rest):
        hit = name.startswith(prefix) and (seen.__setitem__(0, seen[0] + 1) or seen[0] == nth)
        if hit and point == "mid-pack":
            # what a writer killed mid-write leaves: a partial temp file carrying its pid
            backend = getattr(self, "_backend", self)
            d = os.path.dirname(backend._path(name))
            backend._ensure_dir(d)
            piece = as_buffers(rest[0])[0][0] if rest else b"partial pack"
            with open(os.path.join(d, L.temp_name()), "wb") as f:
                f.write(piece[: max(1, len(piece) // 2)])
            pause()
        result = orig(self, name, *rest)
        if hit:
            pause()
        return result
    return call

L.LocalBackend.write_new = hooked(L.LocalBackend.write_new)
L._LocalObjectStream.commit = hooked(L._LocalObjectStream.commit)
from pyvbak.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def kill_child_at(tmp_path, point, argv, sig=signal.SIGKILL) -> int:
    """Run the CLI with ``argv`` in a child that stops at failpoint ``point``, send it
    ``sig`` there; its exit status."""
    marker = tmp_path / f"at-{point}"
    if marker.exists():
        marker.unlink()
    env = dict(os.environ, PYVBAK_TEST_FAILPOINT=point, PYVBAK_TEST_MARKER=str(marker))
    env.pop("PYVBAK_REPO", None)
    proc = subprocess.Popen([sys.executable, "-c", FAILPOINT_CHILD, *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with reaped(proc):
        wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60, what=f"failpoint {point}")
        assert marker.exists(), f"child ended before failpoint {point}: {proc.communicate()}"
        os.kill(proc.pid, sig)
        return proc.wait(timeout=30)


# -- blocks stored twice, reads that fail ----------------------------------------------

class Copies:
    """A repository with snapshot A (blocks a0..a7, in pack PA) and snapshot B (z, then
    a0..a7, in pack PB) - B written as by a backup running beside A's, so each a_i is
    stored twice (PA and PB) and z once (PB)."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.path = str(tmp_path / "repo")
        Repository.init(self.path)
        other = str(tmp_path / "repo2")
        shutil.copytree(self.path, other)  # the same repository, as the concurrent backup saw it
        shared = os.urandom(8 * BS)
        self.img_a = make_image(tmp_path / "a.img", 8 * BS, [(0, 8 * BS, shared)])
        self.img_b = make_image(tmp_path / "b.img", 9 * BS, [(0, BS, os.urandom(BS)), (BS, 8 * BS, shared)])
        self.a = backup_file(Repository.open(self.path), self.img_a, threads=1).snapshot_id
        self.b = backup_file(Repository.open(other), self.img_b, vm="vm2", threads=1).snapshot_id
        for sub in ("packs", "index", "snapshots"):
            for dirpath, _, files in os.walk(os.path.join(other, sub)):
                for f in files:
                    dst = os.path.join(self.path, os.path.relpath(os.path.join(dirpath, f), other))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    if not os.path.exists(dst):
                        shutil.copyfile(os.path.join(dirpath, f), dst)
        repo = self.repo()
        # (S32 items drop trailing zero bytes: a digest ending in 00 - 1 in 256 - came out
        # 31 bytes long and failed the comparisons below about once in 30 runs)
        da = {bytes(d).ljust(32, b"\0") for d in repo.snapshot_digests(repo.resolve(self.a))}
        db = {bytes(d).ljust(32, b"\0") for d in repo.snapshot_digests(repo.resolve(self.b))}
        (self.z,) = db - da
        self.shared = sorted(da)
        index = repo.load_digest_index()
        self.pb = bytes(index.copies(self.z)[0]["pack"])
        self.pa = next(bytes(c["pack"]) for c in index.copies(self.shared[0]) if bytes(c["pack"]) != self.pb)
        for d in self.shared:  # the setup holds what it claims
            assert {bytes(c["pack"]) for c in index.copies(d)} == {self.pa, self.pb}

    def repo(self) -> Repository:
        return Repository.open(self.path)

    def record(self, digest: bytes, pack: bytes):
        return next(c for c in self.repo().load_digest_index().copies(digest) if bytes(c["pack"]) == pack)

    def pack_path(self, pack: bytes) -> str:
        return os.path.join(self.path, fmt.pack_name(pack.hex()))

    def flip(self, digest: bytes, pack: bytes) -> None:
        rec = self.record(digest, pack)
        with open(self.pack_path(pack), "r+b") as f:
            f.seek(int(rec["offset"]) + int(rec["clen"]) // 2)
            c = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([c[0] ^ 0xFF]))

    def copy_packs(self, digest: bytes) -> list[bytes]:
        return sorted(bytes(c["pack"]) for c in self.repo().load_digest_index().copies(digest))

    def assert_all_restore(self) -> None:
        for sid, img in ((self.a, self.img_a), (self.b, self.img_b)):
            out = self.tmp / f"out-{sid}.img"
            restore_to(self.repo(), sid, out, force=True)
            assert same_file(out, img), sid
            out.unlink()


def records_of(location: str, pack: str) -> int:
    pid = bytes.fromhex(pack.rsplit("/", 1)[-1])
    return sum(bytes(r["pack"]) == pid for r in Repository.open(location).load_digest_index().records)


def failing_reads(monkeypatch, pack: str, times: int | None):
    """Reads of ``pack`` fail with an I/O error: the first ``times`` of them, or all."""
    real, calls = LocalBackend.read_range_into, {"n": 0}

    def read_range_into(self, name, offset, buf):
        if name == pack and (times is None or calls["n"] < times):
            calls["n"] += 1
            raise BackendError(f"reading {name}: Input/output error")
        return real(self, name, offset, buf)

    monkeypatch.setattr(LocalBackend, "read_range_into", read_range_into)
    return calls
