"""Helpers that make VM-like disk images for tests, deterministically (seeded).

An image is described by extents written over a sparse file: random data (incompressible),
text (compressible), explicit zeros (written, allocated) and holes (never written, sparse).
``rewrite_pages`` imitates a guest's nightly writes: clustered runs of 4 KiB pages.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

KiB = 1024
MiB = 1024 * 1024
BS = 64 * KiB  # the block size every test repository uses
PAGE = 4 * KiB

_WORDS = (
    b"the quick brown fox jumps over the lazy dog while the kernel flushes dirty pages "
    b"to the block layer and journald appends another line to the system log file\n"
)


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def text_bytes(n: int, seed: int) -> bytes:
    """Compressible, but different per seed (so blocks do not dedup by accident)."""
    tag = f"[seed {seed}] ".encode()
    unit = tag + _WORDS
    out = bytearray()
    i = 0
    while len(out) < n:
        out += unit + str(i).encode() + b"\n"
        i += 1
    return bytes(out[:n])


def make_image(path, size: int, extents=(), *, seed: int = 0) -> str:
    """Create a sparse file of ``size`` bytes and write ``extents``.

    Each extent is ``(offset, length, kind)`` with kind one of "random", "text", "zero"
    (zeros actually written), or raw ``bytes`` written at offset.  Everything not written
    stays a hole.
    """
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.truncate(size)
        for k, (off, length, kind) in enumerate(extents):
            if isinstance(kind, (bytes, bytearray)):
                data = bytes(kind)[:length]
            elif kind == "random":
                data = random_bytes(length, seed * 1000 + k)
            elif kind == "text":
                data = text_bytes(length, seed * 1000 + k)
            elif kind == "zero":
                data = bytes(length)
            else:
                raise ValueError(kind)
            f.seek(off)
            f.write(data)
    return path


def vm_image(path, size: int = 8 * MiB, *, seed: int = 0) -> str:
    """A typical small disk: a boot area, text, random data, written zeros, holes, and a
    partial last block when ``size`` is not a multiple of the block size."""
    q = size // 8
    return make_image(
        path,
        size,
        [
            (0, 64 * KiB, "random"),  # boot sector / partition table
            (q, q, "text"),  # logs, configs
            (3 * q, q, "random"),  # binaries, compressed files
            (5 * q, q // 2, "zero"),  # freed but allocated space
            # 6q..7q stays a hole
            (size - 100 * KiB if size > 200 * KiB else 0, min(100 * KiB, size), "random"),
        ],
        seed=seed,
    )


def rewrite_pages(path, *, fraction: float, seed: int, run_pages: int = 8) -> list[int]:
    """Overwrite about ``fraction`` of the image's 4 KiB pages in clustered runs of
    ``run_pages`` pages with fresh random data; returns the page numbers written."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    pages = size // PAGE
    rng = np.random.default_rng(seed)
    runs = max(1, int(pages * fraction / run_pages))
    written = []
    with open(path, "r+b") as f:
        for r in range(runs):
            start = int(rng.integers(0, max(1, pages - run_pages)))
            f.seek(start * PAGE)
            f.write(random_bytes(run_pages * PAGE, seed * 7919 + r))
            written.extend(range(start, start + run_pages))
    return written


def write_at(path, offset: int, data: bytes) -> None:
    with open(os.fspath(path), "r+b") as f:
        f.seek(offset)
        f.write(data)


def resize(path, size: int) -> None:
    os.truncate(os.fspath(path), size)


def qemu_io(img, fmt: str, *cmds: str):
    """Run ``qemu-io -f FMT -c CMD...`` on the image ``img`` (a guest's writes, offline)."""
    import subprocess

    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack_files(repo) -> list[str]:
    """The files under REPO/packs/ but the pack-storage mark: the packs."""
    root = os.path.join(repo, "packs")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                  if os.path.join(d, f) != os.path.join(root, "pack-storage.json"))


def same_file(a, b) -> bool:
    """Byte-for-byte equal (sizes first, then content)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(os.fspath(a), "rb") as fa, open(os.fspath(b), "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def allocated_bytes(path) -> int:
    return os.stat(os.fspath(path)).st_blocks * 512


# -- driving pyvbak from tests ---------------------------------------------------------
def backup_file(repo, path, *, vm: str = "vm1", disk: str = "disk0", threads: int = 2):
    """One backup of an image file through the engine (in process); the BackupResult."""
    from pyvbak.engine.backup import run_backup
    from pyvbak.sources.file import FileSource

    with repo.lock():
        with FileSource(os.fspath(path)) as src:
            return run_backup(repo, src, vm=vm, disk=disk, threads=threads)


def restore_to(repo, snapshot_id: str, out, *, force: bool = False) -> dict:
    from pyvbak.repo.restore import restore_snapshot

    return restore_snapshot(repo, repo.resolve(snapshot_id), os.fspath(out), force=force, threads=2)


def run_pyvbak(args, *, env=None, cwd=None, timeout: float = 120, **kw):
    """``python -m pyvbak ARGS`` in a subprocess; the CompletedProcess (text mode)."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.pop("PYVBAK_REPO", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pyvbak", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        **kw,
    )


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """stderr is exactly one ``pyvbak: error: ...`` line (no traceback) containing needles."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("pyvbak: error: ")]
    assert len(errs) == 1, f"expected one error line, got stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    for n in needles:
        assert n in errs[0], f"{n!r} not in {errs[0]!r}"
    return errs[0]


def punch_hole(path, offset: int, length: int) -> None:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): the range becomes a hole."""
    _fallocate(path, 0x02 | 0x01, offset, length)


def zero_range(path, offset: int, length: int) -> None:
    """fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE): the range reads as zeros."""
    _fallocate(path, 0x10 | 0x01, offset, length)


def _fallocate(path, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        os.fsync(fd)
    finally:
        os.close(fd)


_GEN_TOKEN = re.compile(r"(pyvbak-gen-\d+)-[0-9a-f]{8}\b")


def untokened(x):
    """pyvbak's bitmap names with their random token taken off (``pyvbak-gen-3-1a2b3c4d``
    -> ``pyvbak-gen-3``): what a test can expect, the generation number.  A string, or
    the keys of a dict, or the items of a list, set or tuple."""
    if isinstance(x, str):
        return _GEN_TOKEN.sub(r"\1", x)
    if isinstance(x, dict):
        return {untokened(k): v for k, v in x.items()}
    if isinstance(x, (list, set, tuple)):
        return type(x)(untokened(v) for v in x)
    return x
