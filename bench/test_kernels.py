"""Micro-benchmarks of the native kernels beside their references, with pytest-benchmark:

    python -m pytest bench/test_kernels.py --benchmark-only --benchmark-group-by=group

Each group runs one piece of work through every kernel this CPU offers, the reference
first; pytest-benchmark's table gives each a factor against the group's fastest, all in
the same run (this machine is shared and noisy: only ratios within a run compare).  Every
benchmark also checks its result against the reference's, bit for bit, so the suite
runs it once with ``--benchmark-disable`` (tests/test_bench_smoke.py) as a correctness
check of every kernel on the machine that runs it.

    scan     fast hash + zero flag of 64 KiB blocks (csrc/scan.c): scalar, avx2, avx512
    sha256   SHA-256 of 64 KiB blocks, many per call (csrc/sha256.c): hashlib, sha-ni
    decode   zstd frames decompressed into a staging buffer and each block's SHA-256
             checked (csrc/decode.c): python (python-zstandard + sha256_many), native

``PYVBAK_KERNEL_BENCH_MIB`` (default 64) sets the work per round.  The engine-level
numbers (scan GB/s against a memory read, backup and restore against restic) come from
the other scripts in bench/; bench/RESULTS.md records both.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pyvbak import native  # noqa: E402

MIB = 1 << 20
BS = 64 * 1024
SIZE = int(os.environ.get("PYVBAK_KERNEL_BENCH_MIB", "64")) * MIB
KEY = bytes(range(16))  # the scan's 128-bit key


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """3/4 random, 1/4 zero 1 MiB pieces, and one text piece in every eight (as the
    peers image mixes them): what the kernels see in a VM disk."""
    rng = np.random.default_rng(20261126)
    buf = np.empty(SIZE, np.uint8)
    text = np.frombuffer((b"Nov 26 21:00:00 host sshd[4242]: Accepted publickey for backup from 10.0.0.7 "
                          * (MIB // 64))[:MIB], np.uint8)
    for i, off in enumerate(range(0, SIZE, MIB)):
        piece = buf[off:off + MIB]
        if i % 4 == 3:
            piece[:] = 0
        elif i % 8 == 1:
            piece[:] = text
        else:
            piece[:] = rng.integers(0, 256, len(piece), dtype=np.uint8)
    return buf


def _scan(buf: np.ndarray, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    zero, hashes = native.new_arrays(native.block_count(len(buf), BS))
    native.scan_buffer(buf, BS, KEY, zero, hashes, kernel=kernel)
    return zero, hashes


@pytest.mark.parametrize("kernel", native.available_kernels())
def test_scan(benchmark, image, kernel):
    benchmark.group = f"scan {SIZE // MIB} MiB, 64 KiB blocks"
    benchmark.extra_info["bytes"] = SIZE
    zero, hashes = benchmark(_scan, image, kernel)
    ref_zero, ref_hashes = _scan(image, "scalar")
    assert np.array_equal(zero, ref_zero) and np.array_equal(hashes, ref_hashes)
    assert 0 < int(zero.sum()) < len(zero)  # both kinds of block were there


@pytest.mark.parametrize("kernel", native.available_sha256_kernels())
def test_sha256(benchmark, image, kernel):
    benchmark.group = f"sha256 {SIZE // MIB} MiB, 64 KiB blocks"
    benchmark.extra_info["bytes"] = SIZE
    blocks = [memoryview(image)[o:o + BS] for o in range(0, SIZE, BS)]
    digests = benchmark(native.sha256_many, blocks, kernel=kernel)
    assert digests == native.sha256_many(blocks, kernel="hashlib")


@pytest.fixture(scope="module")
def pack(image):
    """The image's non-zero blocks as one pack range of zstd frames (level 1, content
    checksum, as the engine stores them), with what decoding them must give."""
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    raw = [bytes(memoryview(image)[o:o + BS]) for o in range(0, SIZE, BS)]
    raw = [b for b in raw if b.count(0) != len(b)]
    frames = [cctx.compress(b) for b in raw]
    src = np.frombuffer(b"".join(frames), np.uint8)
    lens = np.array([len(f) for f in frames], np.int64)
    src_offsets = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    ulens = np.full(len(raw), BS, np.int64)
    dst_offsets = np.arange(len(raw), dtype=np.int64) * BS
    digests = np.frombuffer(b"".join(native.sha256_many(raw, kernel="hashlib")), np.uint8).reshape(-1, 32)
    return src, src_offsets, lens, dst_offsets, ulens, digests, b"".join(raw)


def _decode_reference(src, src_offsets, lens, dst, dst_offsets, digests) -> None:
    """What pyvbak/repo/reader.py does without the native kernel: python-zstandard per
    frame, then SHA-256 of every block, checked."""
    dctx = zstandard.ZstdDecompressor()
    mv = memoryview(src)
    blocks = [dctx.decompress(mv[o:o + n]) for o, n in zip(src_offsets.tolist(), lens.tolist())]
    got = native.sha256_many(blocks)
    for i, (b, d) in enumerate(zip(blocks, got)):
        if d != bytes(digests[i]):
            raise AssertionError(f"block {i}: digest mismatch")
        dst[dst_offsets[i]:dst_offsets[i] + len(b)] = np.frombuffer(b, np.uint8)


_LANES_ALONE = bool(native.lib.pv_sha256_kernels() >> native.lib.PV_SHA_X16_ALONE & 1)


@pytest.mark.parametrize("kernel", native.available_decode_kernels() + (["native-lanes-alone"] if _LANES_ALONE else []))
def test_decode(benchmark, pack, kernel, monkeypatch):
    """``native-lanes-alone``: the native kernel checking with the AVX-512 lanes alone, as
    on a CPU without SHA extensions (Xeons before Ice Lake)."""
    src, src_offsets, lens, dst_offsets, ulens, digests, expect = pack
    benchmark.group = f"decode + SHA-256 check, {len(ulens)} blocks of 64 KiB"
    benchmark.extra_info["bytes"] = len(expect)
    dst = np.zeros(len(expect), np.uint8)
    if kernel == "native-lanes-alone":
        monkeypatch.setattr(native, "_decode_sha_kernel", lambda: native.lib.PV_SHA_X16_ALONE)
    if kernel.startswith("native"):
        dctx = native.new_decode_context()

        def run():
            status = native.decode_blocks_into(dctx, src, src_offsets, lens, dst, dst_offsets, ulens, digests)
            assert (status == native.DECODE_OK).all(), status  # every frame decoded, matching its digest
    else:
        def run():
            _decode_reference(src, src_offsets, lens, dst, dst_offsets, digests)
    benchmark(run)
    assert dst.tobytes() == expect
