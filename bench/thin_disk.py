#!/usr/bin/env python3
"""Backups of a large thin disk: a sparse image of ``--size-gib`` (default 1 TiB) holding
``--data-mib`` of data, through the CLI, each command in its own process.

    python bench/thin_disk.py [--size-gib 1024] [--data-mib 8] [--rounds 2] [--json]
                              [--pyvbak-root DIR]

VM disks are provisioned large and filled slowly, so most of a disk is holes: what a
backup then costs is per block of the disk, not per byte of data - the per-block arrays
(zero flags, fast hashes, digests: ~50 bytes per 64 KiB block), the snapshot index (48
bytes per block, 800 MB for 1 TiB) and whatever passes over them.  Per round, into a
fresh repository under bench/.data/: a full backup, then 1 MiB written and an incremental
(a file's full scan by mapped windows; holes skipped), then a restore of that snapshot to
a sparse file, and a verify of the repository (both snapshots).  Measured per command: wall time and the process's peak RSS (``wait4``).
``--pyvbak-root`` runs another checkout's pyvbak (its ``PYTHONPATH``), for A/B runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchutil import cpu_model, ensure_bytecode, report  # noqa: E402

DATA = os.environ.get("PYVBAK_BENCH_DATA") or os.path.join(HERE, ".data")
GiB, MiB = 1 << 30, 1 << 20


def run(cmd: list[str], env: dict) -> dict:
    """Wall time and peak RSS of one command (its own process)."""
    t = time.perf_counter()
    # cwd outside any checkout: "python -m" puts the cwd first on sys.path
    p = subprocess.Popen(cmd, env=env, cwd=DATA, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode()[-2000:]}")
    doc = json.loads(out) if out.strip().startswith((b"{", b"[")) else {}
    doc = doc[0] if isinstance(doc, list) else doc
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            **({"duration_s": round(doc["duration"], 3)} if "duration" in doc else {})}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pyvbak-root", help="run the pyvbak of this checkout (default: this one)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    root = os.path.abspath(a.pyvbak_root or os.path.dirname(HERE))
    env = dict(os.environ, PYTHONPATH=root)
    if a.pyvbak_root is None:
        ensure_bytecode()
    os.makedirs(DATA, exist_ok=True)
    img, repo, out = (os.path.join(DATA, f"thin-{x}") for x in ("disk.img", "repo", "restored.img"))
    py = [sys.executable, "-m", "pyvbak"]
    size = a.size_gib * GiB
    rounds = []
    try:
        for rnd in range(a.rounds):
            for p in (img, out):
                if os.path.exists(p):
                    os.unlink(p)
            shutil.rmtree(repo, ignore_errors=True)
            with open(img, "wb") as f:
                f.truncate(size)
                pieces = max(1, a.data_mib)
                for k in range(pieces):  # 1 MiB pieces spread over the disk
                    f.seek((k * 7919 % 997) * (size // 1000))
                    f.write(os.urandom(MiB))
            subprocess.run(py + ["init", repo], env=env, cwd=DATA, check=True, capture_output=True)
            backup = py + ["backup", img, "--repo", repo, "--vm", "thin", "--json"]
            full = run(backup, env)
            with open(img, "r+b") as f:
                f.seek(size // 3)
                f.write(os.urandom(MiB))
            incr = run(backup, env)
            restore = run(py + ["restore", "thin@latest", out, "--repo", repo, "--json"], env)
            with open(out, "rb") as f:  # spot check: the data written last is there
                f.seek(size // 3)
                with open(img, "rb") as g:
                    g.seek(size // 3)
                    assert f.read(MiB) == g.read(MiB), "restored data differs"
            verify = run(py + ["verify", "--repo", repo, "--json"], env)
            rounds.append({"full": full, "incremental": incr, "restore": restore, "verify": verify})
            print(f"round {rnd}: full {full['wall_s']} s / {full['peak_rss_mib']} MiB, incremental "
                  f"{incr['wall_s']} s / {incr['peak_rss_mib']} MiB, restore {restore['wall_s']} s / "
                  f"{restore['peak_rss_mib']} MiB, verify {verify['wall_s']} s / {verify['peak_rss_mib']} MiB",
                  file=sys.stderr, flush=True)
    finally:
        for p in (img, out):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(repo, ignore_errors=True)
    med = {kind: {k: statistics.median(r[kind][k] for r in rounds) for k in ("wall_s", "peak_rss_mib")}
           for kind in ("full", "incremental", "restore", "verify")}
    report({"command": "python bench/thin_disk.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
            "cores": os.cpu_count(), "size_gib": a.size_gib, "data_mib": a.data_mib, "pyvbak_root": root,
            "blocks": size // (64 * 1024), "median": med, "rounds": rounds}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
