"""The benchmarks this project's numbers come from still run: each at a tiny size, its JSON
checked for the fields bench/RESULTS.md quotes.  (Speed is measured by the benchmarks
themselves, never here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_bench(tmp_path, script: str, *args: str) -> dict:
    env = dict(os.environ, PYVBAK_BENCH_DATA=str(tmp_path / "bench-data"))
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_incremental_bench(tmp_path):
    doc = run_bench(tmp_path, "incremental.py", "--size-mib", "16", "--rounds", "1",
                    "--states", "warm,written,cold", "--cli")
    for state in ("warm", "written", "cold"):
        assert positive(doc[state]["engine_s"]) and positive(doc[state]["ratio"])
        assert doc[state]["changed_blocks"][0] > 0  # the rewrite was seen as a change
    assert all(positive(v) for v in doc["cli"].values())
    assert doc["window_mib"] == 32
    image = tmp_path / "bench-data" / "vm-16MiB-s1-incremental.img"
    assert json.loads((tmp_path / "bench-data" / "vm-16MiB-s1-incremental.img.json").read_text())["rewritten"] is None
    assert image.stat().st_size == 16 * 2**20


def test_startup_bench(tmp_path):
    doc = run_bench(tmp_path, "startup.py", "--runs", "1")
    for k in ("python", "imports", "snapshots_main", "snapshots_entry", "ratio"):
        assert positive(doc[k]), k


@pytest.mark.parametrize("script", ["prune_scale.py", "digest_index.py"])
def test_index_scale_benches(tmp_path, script):
    doc = run_bench(tmp_path, script, "--records", "20000", "--rounds", "1")
    if script == "prune_scale.py":
        assert positive(doc["ratio"]) and positive(doc["prune"]["maxrss_mib"])
    else:
        assert positive(doc["cached"]["total_s"]) and positive(doc["memory"]["maxrss_mib"])
    assert not os.listdir(tmp_path / "bench-data")  # its work directory is removed
