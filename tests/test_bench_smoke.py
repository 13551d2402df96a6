"""The benchmarks this project's numbers come from still run: each at a tiny size, its JSON
checked for the fields bench/RESULTS.md quotes.  (Speed is measured by the benchmarks
themselves, never here.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_bench(tmp_path, script: str, *args: str, data=None) -> dict:
    env = dict(os.environ, PYVBAK_BENCH_DATA=str(data or tmp_path / "bench-data"))
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


def test_scan_and_sha256_benches(tmp_path):
    doc = run_bench(tmp_path, "scan.py", "--size-mib", "64", "--reps", "1")
    assert positive(doc["scan_gbps"]) and positive(doc["memread_gbps"]) and positive(doc["ratio"])
    doc = run_bench(tmp_path, "sha256.py", "--mib", "8", "--reps", "1")
    assert doc["block_bytes"] == 65536 and doc["results"]


def test_peers_bench_pyvbak_only(tmp_path):
    doc = run_bench(tmp_path, "peers.py", "--size-mib", "16", "--tools", "pyvbak", "--settle", "0")
    p = doc["tools"]["pyvbak"]
    assert p["restore_identical"] is True
    assert positive(p["full_s"]) and positive(p["incr_s"]) and positive(p["restore_s"])
    assert doc["rounds"][0]["evicted_by"] is None
    assert doc["settle_s"] == 0


def test_peers_bench_cold_restore_evicts_without_privilege(tmp_path):
    # root in a container may not write /proc/sys/vm/drop_caches: the repositories are then
    # dropped file by file (posix_fadvise), and the restore still comes out identical
    doc = run_bench(tmp_path, "peers.py", "--size-mib", "16", "--tools", "pyvbak", "--cold-restore", "--settle", "0.1")
    assert doc["cold_restore"] is True
    assert doc["rounds"][0]["evicted_by"] in ("drop_caches", "fadvise")
    assert doc["tools"]["pyvbak"]["restore_identical"] is True


def test_backend_write_and_blocksize_benches(tmp_path):
    doc = run_bench(tmp_path, "backend_write.py", "--total-mib", "32", "--reps", "1", "--settle", "0",
                    "--work-dir", str(tmp_path / "bw"))
    assert doc["packs"] == 2 and doc["packs_result"]
    doc = run_bench(tmp_path, "blocksize.py", "--size-mib", "32", "--sizes", "64K,1M")
    assert list(doc["block_sizes"]) == ["64K", "1M"]


def test_qemu_benches(tmp_path):
    # a short data path: the bench's QEMU and pyvbak's NBD server make UNIX sockets in it
    short = tempfile.mkdtemp(prefix="pvb-", dir="/tmp")
    try:
        doc = run_bench(tmp_path, "qemu_incremental.py", "--size-mib", "64", "--rounds", "1",
                        "--in-process-rounds", "2", data=short)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert positive(doc["incremental_s"]) and positive(doc["ratio"])
    assert len(doc["in_process"]["rounds"]) == 2 and positive(doc["in_process"]["ratio_vs_qemu_read"])
    assert all(r["bitmap_exact"] for r in doc["in_process"]["rounds"])
    # the in-process round wraps pyvbak internals by name: it must keep up with them
    phases = doc["profile"]["phases"]
    assert phases["run_backup (total)"]["calls"] == 1 and phases["  settle bitmaps"]["calls"] == 1
    assert all(r["bitmap_exact"] for r in doc["rounds"])
    doc = run_bench(tmp_path, "qemu_multidisk.py", "--disks", "2", "--size-mib", "16", "--rounds", "1")
    assert positive(doc["together_s"]) and positive(doc["apart_s"]) and doc["rounds"][0]["rewritten_bytes"] > 0
    doc = run_bench(tmp_path, "qemu_fleecing.py", "--disks", "2", "--size-mib", "16", "--rounds", "2")
    assert positive(doc["snapshot_access_s"]) and positive(doc["qcow2_s"]) and len(doc["rounds"]) == 2
    doc = run_bench(tmp_path, "qemu_fragmented.py", "--size-gib", "1", "--clusters", "50", "--rounds", "1")
    assert positive(doc["full_s"]) and positive(doc["incr_s"]) and positive(doc["map_s"]) and doc["map_extents"] > 50
    doc = run_bench(tmp_path, "nbd_read.py", "--size-mib", "64", "--repeat", "1")
    assert positive(doc["client_gbps"]) and positive(doc["qemu_img_gbps"]) and positive(doc["ratio"])


def test_ab_qemu_incremental_bench(tmp_path):
    root = os.path.dirname(BENCH)
    short = tempfile.mkdtemp(prefix="pvb-", dir="/tmp")  # UNIX socket paths stay short
    try:
        doc = run_bench(tmp_path, "ab_qemu_incremental.py", root, root, "--size-mib", "16", "--rounds", "1",
                        "--work-dir", short)
        assert os.listdir(short) == []  # its work directory is removed
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert sorted(doc["checkouts"]) == [f"{root} (1)", f"{root} (2)"]  # an A/A run: one child each
    assert all(positive(d["median_ms"]) and len(d["sorted_ms"]) == 1 for d in doc["checkouts"].values())
    assert isinstance(doc["paired_median_diff_ms"][f"{root} (2)"], float)


def test_pack_streaming_bench(tmp_path):
    doc = run_bench(tmp_path, "pack_streaming.py", "--size-mib", "64", "--rounds", "2")
    assert positive(doc["streamed_s"]) and positive(doc["whole_s"]) and positive(doc["whole_over_streamed"])
    assert all(r["streamed_packs"] >= 1 and r["whole_packs"] >= 1 for r in doc["rounds"])


def test_restore_disk_bench(tmp_path):
    doc = run_bench(tmp_path, "restore_disk.py", "--size-mib", "32", "--rounds", "1")
    assert positive(doc["cold_s"]) and positive(doc["warm_s"]) and positive(doc["copy_s"]) and positive(doc["ratio"])
    assert doc["bytes_written"] > 0
    assert not os.path.exists(tmp_path / "bench-data" / "restore_disk")  # its work directory is removed


def test_allocator_bench(tmp_path):
    doc = run_bench(tmp_path, "allocator.py", "--size-mib", "16", "--rounds", "2")
    for kind in ("full", "incremental"):
        assert positive(doc["summary"][f"{kind}_wall_s"]["default_over_tuned"])
    for variant in ("tuned", "default"):
        assert len(doc["runs"][variant]) == 2
        assert all(positive(r["full"]["duration_s"]) for r in doc["runs"][variant])


def test_job_size_bench(tmp_path):
    doc = run_bench(tmp_path, "job_size.py", "--size-mib", "16", "--rounds", "2", "--sizes-mib", "1,4")
    assert [r["job_mib"] for r in doc["results"]] == [1, 4, doc["engine_choice_mib"]]
    assert all(positive(r["wall_s"]) and positive(r["cpu_s"]) and len(r["wall_rounds"]) == 2 for r in doc["results"])
    assert doc["results"][-1]["wall_vs_engine_choice"] == 1 and doc["stored_bytes_identical"] is True


def test_thin_disk_bench(tmp_path):
    doc = run_bench(tmp_path, "thin_disk.py", "--size-gib", "1", "--data-mib", "2", "--rounds", "1")
    for kind in ("full", "incremental", "restore", "verify"):
        assert positive(doc["median"][kind]["wall_s"]) and positive(doc["median"][kind]["peak_rss_mib"])
    assert doc["blocks"] == 16384 and doc["rounds"][0]["full"]["duration_s"] > 0


def test_restore_device_bench(tmp_path):
    from conftest import IN_CI

    if not (os.geteuid() == 0 and os.path.exists("/dev/loop-control") and shutil.which("losetup")):
        msg = "restore_device.py needs root, /dev/loop-control and losetup"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    doc = run_bench(tmp_path, "restore_device.py", "--size-mib", "16", "--data-mib", "4", "--rounds", "1",
                    "--work-dir", str(tmp_path / "w"))
    assert positive(doc["device_s"]) and positive(doc["written_s"]) and positive(doc["ratio_written_over_device"])
    assert os.listdir(tmp_path / "w") == []  # its work directory is removed


def test_kernel_micro_benchmarks_run_and_agree_with_their_references(tmp_path):
    """bench/test_kernels.py (pytest-benchmark) once per kernel, timing off: every kernel
    this CPU offers gives its reference's result."""
    from pyvbak import native

    lanes_alone = native.lib.pv_sha256_kernels() >> native.lib.PV_SHA_X16_ALONE & 1  # (a decode variant)
    want = len(native.available_kernels()) + len(native.available_sha256_kernels()) + len(
        native.available_decode_kernels()) + lanes_alone
    env = dict(os.environ, PYVBAK_KERNEL_BENCH_MIB="4")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          os.path.join(BENCH, "test_kernels.py")], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"{want} passed" in out.stdout, out.stdout[-2000:]
