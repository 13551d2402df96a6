#!/usr/bin/env python3
"""Restore write/read paths, before and after, timed in one run.

    python bench/restore_paths.py [--size-mib 2048] [--reps 3] [--baseline REV] [--json]
    python bench/restore_paths.py --baseline 819fcb4   # before the decode kernel

Makes (or reuses) the bench/vmimage.py image bench/.data/vm-SIZEMiB-s1-restore.img, backs
it up once into a fresh repository under bench/.data/restore_paths/ (pyvbak init +
pyvbak backup), then times ``pyvbak restore`` of that snapshot with

  baseline  pyvbak/repo/reader.py and restore.py as of --baseline (default: a8da19e, the
            revision before the O_DIRECT restore), the rest of the package as checked out:
            fresh bytes per 16 MiB pack range, page-cache writes;
  buffered  the current code with PYVBAK_RESTORE_DIRECT=0: reused read buffers,
            page-cache writes;
  direct    the current code: reused read buffers, O_DIRECT writes of staged runs, blocks
            decoded straight into them by the native decode kernel (csrc/decode.c) where
            it runs;
  reference the same with PYVBAK_DECODE=python: the reference decode path (python-
            zstandard + SHA-256 per batch, then a copy into the staging run);

rotating the order every round.  Each restore runs under ``/usr/bin/time -f '%e %U %S'``
(wall, user, system seconds) after an untimed ``sync``, so one variant's write-back does
not land on the next one's clock; the time includes restore's own fsync.  Every output is
compared with the image (cmp) and deleted.  Pack files stay in the page cache throughout
(as in bench/peers.py).  Medians per variant and per-round ratios to the baseline
(> 1: faster than the baseline) are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import vmimage  # noqa: E402
from benchutil import cpu_model  # noqa: E402

WORK = os.path.join(vmimage.DATA, "restore_paths")


def sh(cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def baseline_tree(rev: str, into: str) -> str:
    """A copy of the checked-out package with reader.py and restore.py taken from ``rev``."""
    pkg = os.path.join(into, "pyvbak")
    shutil.copytree(os.path.join(ROOT, "pyvbak"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyvbak/repo/reader.py", "pyvbak/repo/restore.py"):
        with open(os.path.join(into, rel), "w") as f:
            f.write(sh(["git", "show", f"{rev}:{rel}"], cwd=ROOT))
    return into


def timed_restore(cwd: str, repo: str, out: str, env: dict) -> dict:
    os.sync()
    tfile = out + ".time"
    cmd = ["/usr/bin/time", "-o", tfile, "-f", "%e %U %S", sys.executable, "-m", "pyvbak", "restore", "bench/vm@latest", out, "--repo", repo, "--json"]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"restore failed ({p.returncode}): {p.stderr[-2000:]}")
    with open(tfile) as f:
        wall, user, sys_ = (float(x) for x in f.read().split()[-3:])
    os.unlink(tfile)
    report = json.loads(p.stdout)
    return {"wall": wall, "user": user, "sys": sys_, "cpu": user + sys_, "write_mode": report.get("write_mode", "buffered (baseline)")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", default="a8da19e", help="git revision whose reader.py/restore.py are the 'before'")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    image = os.path.join(vmimage.DATA, f"vm-{a.size_mib}MiB-s1-restore.img")
    stamp = vmimage.ensure_image(image, a.size_mib, 1)
    if os.path.exists(WORK):
        shutil.rmtree(WORK)
    os.makedirs(WORK)
    repo = os.path.join(WORK, "repo")
    out = os.path.join(WORK, "restored.img")
    tmp = tempfile.mkdtemp(prefix="pyvbak-restore-paths-")
    try:
        sh([sys.executable, "-m", "pyvbak", "init", repo], cwd=ROOT)
        vmimage.page_cache(image)
        backup = json.loads(sh([sys.executable, "-m", "pyvbak", "backup", image, "--repo", repo, "--vm", "bench", "--disk", "vm", "--json"], cwd=ROOT))
        base = baseline_tree(a.baseline, tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYVBAK_RESTORE_DIRECT", "PYVBAK_DECODE")}
        variants = {
            "baseline": (base, env),
            "buffered": (ROOT, {**env, "PYVBAK_RESTORE_DIRECT": "0"}),
            "direct": (ROOT, env),
            "reference": (ROOT, {**env, "PYVBAK_DECODE": "python"}),
        }
        # python -m puts the working directory first on sys.path: check each variant runs its own code
        for name, (cwd, venv) in variants.items():
            where = sh([sys.executable, "-c", "import pyvbak; print(pyvbak.__file__)"], cwd=cwd, env=venv).strip()
            assert where.startswith(cwd), (name, where)
        names = list(variants)
        timed_restore(ROOT, repo, out, env)  # warm-up: packs into the page cache
        os.unlink(out)
        rounds = []
        for rnd in range(a.reps):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            res = {}
            for name in order:
                cwd, venv = variants[name]
                res[name] = timed_restore(cwd, repo, out, venv)
                res[name]["identical"] = subprocess.run(["cmp", "-s", out, image]).returncode == 0
                os.unlink(out)
            res["_order"] = order
            rounds.append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(WORK, ignore_errors=True)

    med = {n: {k: round(statistics.median(r[n][k] for r in rounds), 3) for k in ("wall", "user", "sys", "cpu")} for n in names}
    for n in names:
        med[n]["identical"] = all(r[n]["identical"] for r in rounds)
        med[n]["write_mode"] = rounds[0][n]["write_mode"]
    ratios = {}
    for n in ("buffered", "direct", "reference"):
        for k in ("wall", "cpu", "sys"):
            per = [r["baseline"][k] / max(r[n][k], 1e-3) for r in rounds]
            ratios[f"{n}_{k}_speedup"] = {"median": round(statistics.median(per), 2), "range": [round(min(per), 2), round(max(per), 2)]}
    doc = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "size_mib": a.size_mib,
        "image": stamp,
        "backup": {k: backup[k] for k in ("new_bytes", "stored_bytes", "packs_written", "duration")},
        "baseline_rev": a.baseline,
        "reps": a.reps,
        "median": med,
        "ratios_vs_baseline": ratios,
        "rounds": rounds,
    }
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        for n in names:
            m = med[n]
            print(f"{n:9s} wall {m['wall']:5.2f}s  user {m['user']:5.2f}s  sys {m['sys']:5.2f}s  identical={m['identical']}  ({m['write_mode']})")
        for k, v in ratios.items():
            print(f"{k}: {v['median']} {v['range']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
