"""VM-like disk images for the benchmarks, and the nightly "1 % clustered rewrite".

    from vmimage import ensure_image, rewrite_clustered

The image is built from 1 MiB extents in fixed proportions, placed in a seeded random
order (so the same seed always gives the same bytes):

  35 %  incompressible  random bytes (encrypted / already-compressed data)
  30 %  text            syslog-like lines and prose drawn from a seeded vocabulary: every
                        line differs (timestamps, pids, numbers, word choice), so zstd
                        finds real redundancy but no trivially repeated string
  30+5  zero            35 % zeros, written for real (the file is NOT sparse: every byte
                        is allocated; a scanner cannot lean on SEEK_HOLE)

``rewrite_clustered`` overwrites 1 % of the image's 4 KiB pages (exactly
``round(pages * fraction)`` distinct pages) in runs of 1-64 pages at seeded random
positions — how a guest's nightly writes look (files appended, DB pages, journals).
Rewritten pages get fresh random bytes (the worst case for compression).

A small JSON stamp beside the image (``IMAGE.json``) records size, seed and whether the
image was rewritten, so ``ensure_image`` regenerates only when it must.

Run alone to make an image:  python bench/vmimage.py --size-mib 256 [--rewrite]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

MIB = 1 << 20
PAGE = 4096
#: where benchmarks keep images and repositories ($PYVBAK_BENCH_DATA, e.g. for the smoke tests)
DATA = os.environ.get("PYVBAK_BENCH_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".data")
GENERATOR_VERSION = 1
FRACTIONS = {"random": 0.35, "text": 0.30, "zero": 0.35}

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will can more about said what out up "
    "them into just some time could other only then its over also new these two may first any like now my such "
    "kernel systemd network interface eth0 link up down carrier address dhcp lease renewed bound request reply "
    "database query commit rollback transaction checkpoint vacuum index table row column select insert update "
    "delete user session opened closed login failed accepted password publickey authentication connection from "
    "port service started stopped reloaded failed exited status code signal warning error info debug notice "
    "critical cron job backup nginx GET POST HEAD 200 301 404 500 HTTP/1.1 Mozilla/5.0 client upstream timeout "
    "response bytes sent received cache hit miss worker process memory cpu disk usage threshold exceeded "
    "volume mounted filesystem ext4 xfs journal recovery complete block device sda sdb nvme0n1 partition "
    "scheduled maintenance window configuration changed applied rolled back version release package installed "
    "upgraded removed dependency resolved conflict certificate expires renewed valid invalid handshake tls "
    "invoice customer order shipped payment received refund pending account balance report quarterly annual"
).split()
_HOSTS = [f"{p}-{i:02d}" for p in ("web", "db", "app", "cache", "mail", "batch") for i in range(1, 13)]
_PROCS = ["sshd", "systemd", "kernel", "nginx", "postgres", "cron", "dockerd", "kubelet", "postfix", "rsyslogd", "app"]
_LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "NOTICE", "WARN", "ERROR"]


def _text_pool(rng: np.random.Generator, lines: int = 40000) -> list[bytes]:
    """A pool of distinct log lines / sentences; extents sample and re-stamp them."""
    words = np.array(_WORDS, dtype=object)
    out = []
    for k in range(lines):
        nw = int(rng.integers(6, 22))
        body = " ".join(words[rng.integers(0, len(words), nw)])
        kind = k % 3
        if kind == 0:
            out.append(
                f"{_HOSTS[rng.integers(len(_HOSTS))]} {_PROCS[rng.integers(len(_PROCS))]}[{rng.integers(100, 65535)}]: "
                f"{_LEVELS[rng.integers(len(_LEVELS))]} {body} id={rng.integers(1 << 40):x} "
                f"took {rng.integers(1, 5000)}ms\n".encode()
            )
        elif kind == 1:
            out.append((body.capitalize() + ". ").encode())
        else:
            out.append(
                f'10.{rng.integers(256)}.{rng.integers(256)}.{rng.integers(256)} - - "GET /{"/".join(words[rng.integers(0, len(words), 3)])} '
                f'HTTP/1.1" {rng.choice([200, 200, 200, 301, 404, 500])} {rng.integers(100, 99999)}\n'.encode()
            )
    return out


def _text_extent(rng: np.random.Generator, pool: list[bytes], t0: int) -> bytes:
    """1 MiB of text: pool lines in random order, each prefixed with a rising timestamp."""
    parts = []
    size = 0
    t = t0
    idx = rng.integers(0, len(pool), 16384)
    steps = rng.integers(0, 3000, 16384)
    k = 0
    while size < MIB:
        if k == len(idx):
            idx = rng.integers(0, len(pool), 16384)
            steps = rng.integers(0, 3000, 16384)
            k = 0
        t += int(steps[k])
        line = b"%d.%03d " % (t // 1000, t % 1000) + pool[int(idx[k])]
        parts.append(line)
        size += len(line)
        k += 1
    return b"".join(parts)[:MIB]


def extent_kinds(size_mib: int, seed: int) -> np.ndarray:
    """Kind per 1 MiB extent (0 random, 1 text, 2 zero): exact proportions, seeded order."""
    n_rand = round(size_mib * FRACTIONS["random"])
    n_text = round(size_mib * FRACTIONS["text"])
    kinds = np.array([0] * n_rand + [1] * n_text + [2] * (size_mib - n_rand - n_text), dtype=np.uint8)
    np.random.default_rng(seed).shuffle(kinds)
    return kinds


def _stamp_path(path: str) -> str:
    return path + ".json"


def _read_stamp(path: str) -> dict | None:
    try:
        with open(_stamp_path(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_stamp(path: str, doc: dict) -> None:
    with open(_stamp_path(path), "w") as f:
        json.dump(doc, f)


def generate_image(path: str, size_mib: int, seed: int = 1) -> dict:
    """Write the image (non-sparse) and its stamp; returns the stamp."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kinds = extent_kinds(size_mib, seed)
    rng = np.random.default_rng([seed, 1])
    trng = np.random.default_rng([seed, 2])
    pool = _text_pool(np.random.default_rng([seed, 3]))
    zero = bytes(MIB)
    tmp = path + ".tmp"
    t = 1_700_000_000_000
    with open(tmp, "wb") as f:
        for k in kinds.tolist():
            if k == 0:
                f.write(rng.bytes(MIB))
            elif k == 1:
                f.write(_text_extent(trng, pool, t))
                t += 3_600_000
            else:
                f.write(zero)  # real zeros, allocated: not a hole
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    doc = {
        "generator": GENERATOR_VERSION,
        "size_mib": size_mib,
        "seed": seed,
        "rewritten": None,
        "extents": {"random": int((kinds == 0).sum()), "text": int((kinds == 1).sum()), "zero": int((kinds == 2).sum())},
    }
    _write_stamp(path, doc)
    return doc


def ensure_image(path: str, size_mib: int, seed: int = 1) -> dict:
    """The pristine image at ``path``: reused when its stamp matches, else (re)generated."""
    doc = _read_stamp(path)
    if (
        doc
        and doc.get("generator") == GENERATOR_VERSION
        and doc.get("size_mib") == size_mib
        and doc.get("seed") == seed
        and doc.get("rewritten") is None
        and os.path.exists(path)
        and os.path.getsize(path) == size_mib * MIB
    ):
        return doc
    return generate_image(path, size_mib, seed)


def clustered_pages(total_pages: int, fraction: float = 0.01, seed: int = 2, max_run: int = 64) -> list[tuple[int, int]]:
    """Runs (first_page, count) covering exactly round(total_pages * fraction) distinct
    pages: runs of 1..max_run pages at random positions; overlapping runs merge."""
    target = max(1, round(total_pages * fraction))
    rng = np.random.default_rng(seed)
    mask = np.zeros(total_pages, dtype=bool)
    marked = 0
    while marked < target:
        length = int(rng.integers(1, max_run + 1))
        start = int(rng.integers(0, max(1, total_pages - length + 1)))
        seg = mask[start : start + length]
        new = np.flatnonzero(~seg)
        if marked + len(new) > target:  # trim the last run to hit the total exactly
            new = new[: target - marked]
        seg[new] = True
        marked += len(new)
    idx = np.flatnonzero(mask)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(len(r))) for r in np.split(idx, breaks)]


def rewrite_clustered(path: str, fraction: float = 0.01, seed: int = 2, max_run: int = 64, *, keep_original: bool = False) -> dict:
    """Overwrite ``fraction`` of the 4 KiB pages of ``path`` with random bytes, in
    clustered runs (see clustered_pages).  Returns {pages, bytes, runs: [(page, n)...]}
    and, with ``keep_original``, the overwritten bytes for ``undo_rewrite``."""
    size = os.path.getsize(path)
    runs = clustered_pages(size // PAGE, fraction, seed, max_run)
    rng = np.random.default_rng([seed, 7])
    original = []
    fd = os.open(path, os.O_RDWR)
    try:
        for first, count in runs:
            if keep_original:
                original.append(os.pread(fd, count * PAGE, first * PAGE))
            os.pwrite(fd, rng.bytes(count * PAGE), first * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)
    pages = sum(c for _, c in runs)
    doc = _read_stamp(path) or {}
    doc["rewritten"] = {"fraction": fraction, "seed": seed, "max_run": max_run, "pages": pages}
    _write_stamp(path, doc)
    return {"pages": pages, "bytes": pages * PAGE, "runs": runs, "original": original if keep_original else None}


def undo_rewrite(path: str, rewrite: dict) -> None:
    """Put back the pages a ``rewrite_clustered(..., keep_original=True)`` overwrote."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for (first, _), data in zip(rewrite["runs"], rewrite["original"], strict=True):
            os.pwrite(fd, data, first * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)
    doc = _read_stamp(path) or {}
    doc["rewritten"] = None
    _write_stamp(path, doc)


def evict(path: str) -> None:
    """Write the file back and drop it from the page cache (the next read is cold)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache(path: str) -> None:
    """Put the whole file in the page cache, in the same state whatever ran before.

    The file is written back and evicted first, then read: how pages entered the cache
    decides their folio sizes (kernel 6.18, ext4 large folios), and the folio sizes decide
    what mapping them costs.  Written by the generator in 1 MiB writes, the image sits in
    folios of at most 1 MiB, mapped one 4 KiB page at a time (populating a 2 GiB mapping:
    ~100 ms); read back through readahead it sits mostly in 2 MiB folios, mapped with one
    PMD entry each (~2-4 ms).  pyvbak's scan maps the image, restic and borg read() it,
    so without the eviction a tool's time depended on whether borg (which evicts what
    it reads) happened to run before it in the round.  Measured in bench/RESULTS.md,
    "Page-cache state of the image"."""
    evict(path)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MIB)
        while f.readinto(buf):
            pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--path", default=None)
    ap.add_argument("--rewrite", action="store_true", help="also apply the 1 %% clustered rewrite")
    a = ap.parse_args()
    p = a.path or os.path.join(DATA, f"vm-{a.size_mib}MiB-s{a.seed}.img")
    out = {"path": p, "image": ensure_image(p, a.size_mib, a.seed)}
    if a.rewrite:
        r = rewrite_clustered(p)
        out["rewrite"] = {"pages": r["pages"], "bytes": r["bytes"], "runs": len(r["runs"])}
    print(json.dumps(out, indent=2))
