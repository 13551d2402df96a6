#!/usr/bin/env python3
"""What a pyvbak command costs before and after its work: interpreter, imports, exit.

    python bench/startup.py [--runs 15] [--json]

Runs each variant ``--runs`` times, interleaved (so the machine's noise hits all alike),
and reports medians in ms:

- ``python``: ``python -c pass`` (the interpreter with this machine's site packages);
- ``imports``: the modules a backup needs (``pyvbak.cli.main``, ``pyvbak.engine.backup``);
- ``imports_gc_off``: the same with the garbage collector off while importing (tried for
  the entry point; no gain);
- ``imports_frozen``: the same, then ``gc.freeze()`` before exit;
- ``snapshots_main``: ``pyvbak snapshots --json`` on a small repository through
  ``pyvbak.cli.main.main`` (no start-up measures);
- ``snapshots_entry``: the same through ``pyvbak.cli.entry.entry`` (what ``pyvbak`` runs).

``ratio = snapshots_entry / snapshots_main``.  pyvbak is byte-compiled first
(benchutil.ensure_bytecode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutil  # noqa: E402

BACKUP_IMPORTS = "import pyvbak.cli.main, pyvbak.engine.backup"


def variants(repo: str) -> dict[str, str]:
    argv = ["snapshots", "--repo", repo, "--json"]
    return {
        "python": "pass",
        "imports": BACKUP_IMPORTS,
        "imports_gc_off": f"import gc; gc.disable(); {BACKUP_IMPORTS}; gc.enable()",
        "imports_frozen": f"import gc; {BACKUP_IMPORTS}; gc.freeze()",
        "snapshots_main": f"import sys; from pyvbak.cli.main import main; sys.exit(main({argv!r}))",
        "snapshots_entry": f"import sys; sys.argv = ['pyvbak'] + {argv!r}; from pyvbak.cli.entry import entry; entry()",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    benchutil.ensure_bytecode()
    with tempfile.TemporaryDirectory(prefix="pyvbak-bench-startup-") as tmp:
        repo = os.path.join(tmp, "repo")
        subprocess.run([sys.executable, "-m", "pyvbak", "init", repo], check=True, stdout=subprocess.DEVNULL)
        cmds = variants(repo)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(a.runs):
            for k, code in cmds.items():
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
                times[k].append(time.perf_counter() - t)
    out = {"cpu": benchutil.cpu_model(), "runs": a.runs}
    out.update({k: round(statistics.median(v) * 1000, 1) for k, v in times.items()})
    out["ratio"] = round(out["snapshots_entry"] / out["snapshots_main"], 3)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k in cmds:
            print(f"{k:16s} {out[k]:7.1f} ms")
        print(f"entry / main: {out['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
