#!/usr/bin/env python3
"""Incremental backup of a disk image file without change tracking, against the floor any
such tool has: reading the whole image once.

    python bench/incremental.py --size-mib 2048 --json [--rounds 5] [--window-mib 32]

1. The VM-like image of bench/vmimage.py (35 % random, 30 % text, 35 % zero by 1 MiB
   extents; its own copy under bench/.data/) and a repository with a full backup of it.
2. Per round and per cache state (``warm``: the image evicted and read back into the page
   cache first; ``written``: in the page cache as the writer of a new file leaves it (a
   copy in 1 MiB writes replaces it), in small folios that cost more to map
   (``--states warm,written,cold`` to include it);
   ``cold``: fsync + POSIX_FADV_DONTNEED on the image first, as for a disk larger than
   RAM or not read since yesterday's backup): rewrite 1 % of the 4 KiB pages in clustered
   runs (a fresh seed per round), then
   - ``engine_s``: ``run_backup`` in this process (the engine only: no interpreter start-up);
   - ``read_s`` (baseline, same cache state, same round): read the whole image with
     4 MiB ``pread`` calls on as many threads as the engine uses (what any tool that
     detects changes without change tracking must at least do).
   ``ratio = engine_s / read_s``; medians over rounds.
3. ``--cli``: also the user's wall time of ``python -m pyvbak backup ... --json`` (warm)
   and, apart, the interpreter alone (``python -c pass``) and the CLI's imports.

``--window-mib`` overrides the engine's mapped-scan window (engine.SCAN_WINDOW_BYTES) to
compare window sizes in one run.  Cache states alternate their order per round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutil  # noqa: E402
import vmimage  # noqa: E402

from pyvbak.engine import backup as engine  # noqa: E402
from pyvbak.repo.repository import Repository  # noqa: E402
from pyvbak.sources.file import FileSource  # noqa: E402

DATA = vmimage.DATA
PIECE = 4 * 1024 * 1024


def prepare(path: str, state: str) -> None:
    if state == "warm":
        vmimage.page_cache(path)  # evicted, then read back: mostly 2 MiB folios
    elif state == "written":
        # In the page cache as a writer of a new file leaves it: a copy written in 1 MiB
        # pieces (as vmimage.generate_image does) replaces the image.  Such pages sit in
        # small folios, mapped one 4 KiB page at a time; overwriting the image in place
        # after an eviction left 2 MiB folios instead (FilePmdMapped, checked).
        tmp = path + ".written"
        src, dst = os.open(path, os.O_RDONLY), os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, os.fstat(src).st_size, 1 << 20):
                os.write(dst, os.pread(src, 1 << 20, off))
            os.fsync(dst)
            os.replace(tmp, path)
        finally:
            os.close(src)
            os.close(dst)
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        vmimage.evict(path)


def read_whole(path: str, threads: int) -> float:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda off: len(os.pread(fd, PIECE, off)), range(0, size, PIECE)))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window-mib", type=int, default=None)
    ap.add_argument("--states", default="warm,cold")
    ap.add_argument("--cli", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    benchutil.ensure_bytecode()  # time pyvbak as installed: see benchutil.ensure_bytecode
    if a.window_mib:
        engine.SCAN_WINDOW_BYTES = a.window_mib << 20
    os.makedirs(DATA, exist_ok=True)
    image = os.path.join(DATA, f"vm-{a.size_mib}MiB-s1-incremental.img")
    vmimage.ensure_image(image, a.size_mib, seed=1)
    repo_dir = os.path.join(DATA, "incremental-repo")
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = Repository.init(repo_dir)
    threads = os.cpu_count() or 1
    with repo.lock(purpose="bench"), FileSource(image) as src:
        engine.run_backup(repo, src, vm="bench", disk="vm")

    states = a.states.split(",")
    rows: dict[str, list[dict]] = {s: [] for s in states}
    cli_rows: list[dict] = []
    rewrites = []
    try:
        for r in range(a.rounds):
            order = states if r % 2 == 0 else states[::-1]
            for state in order:
                rewrites.append(vmimage.rewrite_clustered(image, seed=1000 + 10 * r + len(rewrites), keep_original=True))
                prepare(image, state)
                t0 = time.perf_counter()
                with repo.lock(purpose="bench"), FileSource(image) as src:
                    res = engine.run_backup(repo, src, vm="bench", disk="vm", threads=threads)
                engine_s = time.perf_counter() - t0
                prepare(image, state)
                read_s = read_whole(image, threads)
                rows[state].append({"engine_s": engine_s, "read_s": read_s, "ratio": engine_s / read_s,
                                    "changed_blocks": res.changed_blocks, "new_blocks": res.new_blocks})
            if a.cli:
                rewrites.append(vmimage.rewrite_clustered(image, seed=5000 + r, keep_original=True))
                vmimage.page_cache(image)
                wall = timed([sys.executable, "-m", "pyvbak", "backup", image, "--repo", repo_dir,
                              "--vm", "bench", "--disk", "vm", "--json"])
                cli_rows.append({
                    "cli_s": wall,
                    "interpreter_s": timed([sys.executable, "-c", "pass"]),
                    "imports_s": timed([sys.executable, "-c", "import pyvbak.cli.main, pyvbak.engine.backup"]),
                })
    finally:
        for rw in reversed(rewrites):
            vmimage.undo_rewrite(image, rw)

    def med(rs, k):
        return statistics.median(x[k] for x in rs)

    out = {
        "cpu": benchutil.cpu_model(),
        "size_mib": a.size_mib,
        "rounds": a.rounds,
        "window_mib": engine.SCAN_WINDOW_BYTES >> 20,
        "threads": threads,
    }
    for state, rs in rows.items():
        out[state] = {k: round(med(rs, k), 4) for k in ("engine_s", "read_s", "ratio")}
        out[state]["engine_s_all"] = [round(x["engine_s"], 4) for x in rs]
        out[state]["changed_blocks"] = [x["changed_blocks"] for x in rs]
    if cli_rows:
        out["cli"] = {k: round(med(cli_rows, k), 4) for k in ("cli_s", "interpreter_s", "imports_s")}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for state in rows:
            o = out[state]
            print(f"{state}: engine {o['engine_s']:.3f} s, read-whole-image baseline {o['read_s']:.3f} s, ratio {o['ratio']:.2f}")
        if cli_rows:
            c = out["cli"]
            print(f"cli: {c['cli_s']:.3f} s wall (interpreter {c['interpreter_s']:.3f} s, interpreter + imports {c['imports_s']:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
