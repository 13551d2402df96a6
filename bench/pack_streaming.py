#!/usr/bin/env python3
"""Packs written as they fill (streamed in 2 MiB pieces) against packs written whole when
complete, in-process incrementals of the same image, same run.

    python bench/pack_streaming.py [--size-mib 2048] [--rounds 8] [--json]

The VM-like image of bench/vmimage.py (its own copy under bench/.data/) gets a full
backup into a fresh repository on the repository disk (bench/.data/); then each round
rewrites 1 % of its 4 KiB pages in clustered runs (a fresh seed for each variant, the image
back in the page cache) and times ``run_backup`` with each variant, in alternating order:

  * ``streamed``: PackWriter hands the open pack's frames to its writer thread every
    ``packer.SEND_BYTES`` (the default);
  * ``whole``: SEND_BYTES set beyond the pack size, so each pack is written in one go once
    it is complete (what PackWriter did before streams: the last pack of a backup is then
    written, O_DIRECT, after the last block is compressed).

Reported: medians, ``whole_over_streamed`` (> 1: streaming is faster) and the engine's
``data`` phase (which includes waiting for the last pack).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchutil import cpu_model, image_bench_args  # noqa: E402
from vmimage import ensure_image, page_cache, rewrite_clustered  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
from pyvbak.engine.backup import run_backup  # noqa: E402
from pyvbak.repo import packer  # noqa: E402
from pyvbak.repo.repository import Repository  # noqa: E402
from pyvbak.sources.file import FileSource  # noqa: E402

DATA = os.environ.get("PYVBAK_BENCH_DATA") or os.path.join(HERE, ".data")
VARIANTS = {"streamed": packer.SEND_BYTES, "whole": 1 << 62}


def main() -> int:
    a = image_bench_args(__doc__, size_mib=2048, rounds=8)
    os.makedirs(DATA, exist_ok=True)
    img = os.path.join(DATA, f"vm-{a.size_mib}MiB-s1-packstream.img")
    ensure_image(img, a.size_mib)
    repo_dir = os.path.join(DATA, "packstream-repo")
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = Repository.init(repo_dir)

    def backup():
        with FileSource(img) as src:
            return run_backup(repo, src, vm="bench", disk="vm", threads=os.cpu_count())

    rounds = []
    try:
        backup()
        for rnd in range(a.rounds):
            res = {}
            order = ("streamed", "whole") if rnd % 2 == 0 else ("whole", "streamed")
            for i, variant in enumerate(order):
                rewrite_clustered(img, 0.01, seed=1000 + 2 * rnd + i)
                page_cache(img)
                packer.SEND_BYTES = VARIANTS[variant]
                t0 = time.perf_counter()
                r = backup()
                res[f"{variant}_s"] = time.perf_counter() - t0
                res[f"{variant}_data_s"] = r.phases["data"]
                res[f"{variant}_packs"] = r.packs_written
            rounds.append(res)
    finally:
        packer.SEND_BYTES = VARIANTS["streamed"]
        shutil.rmtree(repo_dir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k.endswith("_s")}
    out = {
        "command": " ".join(["python", "bench/pack_streaming.py", *sys.argv[1:]]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "size_mib": a.size_mib,
        **{k: round(v, 4) for k, v in med.items()},
        "whole_over_streamed": round(med["whole_s"] / med["streamed_s"], 3),
        "rounds": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rounds],
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"incremental of 1 % of a {a.size_mib} MiB image, in-process: streamed {med['streamed_s']:.3f} s, "
              f"whole packs {med['whole_s']:.3f} s ({out['whole_over_streamed']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
