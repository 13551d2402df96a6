"""The native SHA-256 kernels (csrc/sha256.c, csrc/sha256_x16.c) against their reference,
hashlib.

Block names are SHA-256: a kernel that differs by one bit in one length would make every
block it hashes unreadable (restore checks every digest), so every padding boundary is
covered, every code path (one message, two interleaved, sixteen lanes full or partly
repeated, runs cut by a length change), and the reader's batch check.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvbak import native
from pyvbak.errors import UsageError
from pyvbak.repo.reader import decode_block, decode_blocks

KERNELS = native.available_sha256_kernels()
NATIVE = [k for k in KERNELS if k != "hashlib"]


def ref(data) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.mark.skipif(not NATIVE, reason="this CPU has no SHA extensions: only the hashlib path runs here")
def test_native_kernel_is_the_default_where_available(monkeypatch):
    # Where a kernel exists one of them is what backups use, so the comparisons below exercise it.
    monkeypatch.delenv("PYVBAK_SHA256", raising=False)
    assert NATIVE[0] == "sha-ni" and set(NATIVE) <= {"sha-ni", "avx512"}
    assert native.selected_sha256_kernel() in NATIVE


def test_the_default_is_the_faster_native_kernel_by_measurement(monkeypatch):
    monkeypatch.delenv("PYVBAK_SHA256", raising=False)
    calls = []

    def fake_blocks(buf, offs, lens, *, kernel):
        calls.append(kernel)
        clock[0] += {"sha-ni": 2.0, "avx512": 1.0, "slow": 5.0}[kernel]
        return b""

    clock = [0.0]
    monkeypatch.setattr(native, "sha256_blocks", fake_blocks)
    monkeypatch.setattr(native.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(native, "_FASTEST_SHA256", {})
    assert native._fastest_sha256_kernel(("hashlib", "sha-ni", "avx512")) == "avx512"
    assert native._fastest_sha256_kernel(("hashlib", "slow", "sha-ni")) == "sha-ni"
    assert set(calls) == {"sha-ni", "avx512", "slow"}  # both timed, never the reference
    timed = len(calls)
    assert native._fastest_sha256_kernel(("hashlib", "sha-ni", "avx512")) == "avx512"
    assert len(calls) == timed  # measured once, then remembered
    assert native._fastest_sha256_kernel(("hashlib", "sha-ni")) == "sha-ni"  # nothing to time
    assert native._fastest_sha256_kernel(("hashlib",)) == "hashlib"


def test_threads_that_first_hash_at_once_share_one_timing(monkeypatch):
    # The timing is measured once per process: threads that ask at the same moment wait
    # for it rather than each timing (and each perhaps choosing another kernel).
    import threading

    monkeypatch.setattr(native, "_FASTEST_SHA256", {})
    timings, inside = [], threading.Event()
    release = threading.Event()

    def slow_timing(avail):
        timings.append(avail)
        inside.set()
        assert release.wait(10)
        return "sha-ni" if len(timings) == 1 else "avx512"

    monkeypatch.setattr(native, "_time_sha256_kernels", slow_timing)
    got = []
    threads = [threading.Thread(target=lambda: got.append(native._fastest_sha256_kernel(("hashlib", "sha-ni", "avx512"))))
               for _ in range(8)]
    for t in threads:
        t.start()
    assert inside.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    assert len(timings) == 1 and got == ["sha-ni"] * 8


LANES = [k for k in NATIVE if k == "avx512"]


@pytest.mark.skipif(not LANES, reason="this CPU has no AVX-512: the 16-lane kernel does not run here")
@pytest.mark.parametrize("run", [1, 8, 9, 15, 16, 17, 24, 25, 32, 33, 40])
def test_lanes_every_run_length_with_distinct_messages(run):
    # Every lane different, so a lane mixed up in the transposition shows; runs below 9 go
    # through SHA-NI pairs, from 9 through the lanes (the last group's spare lanes repeat)
    for size in (64 * 1024, 1000, 55, 56, 64, 0):
        bufs = [os.urandom(size) for _ in range(run)]
        assert native.sha256_many(bufs, kernel="avx512") == [ref(b) for b in bufs], (run, size)


@pytest.mark.skipif(not LANES, reason="this CPU has no AVX-512: the 16-lane kernel does not run here")
def test_lanes_without_sha_ni_every_run_through_the_lanes_and_short_calls_to_hashlib(monkeypatch):
    # What a CPU with AVX-512 but no SHA-NI (Skylake-SP, Cascade Lake) runs: every run of
    # equal lengths through the lanes, spare lanes and all, and calls of fewer than 9
    # messages through hashlib.  Run here by giving "avx512" that kernel's number.
    lib = native.lib
    monkeypatch.setattr(native, "_sha_kernel_id",
                        lambda k: lib.PV_SHA_NI if k == "sha-ni" else lib.PV_SHA_X16_ALONE)
    hashed_by_hashlib = []
    real = hashlib.sha256

    class Spy:
        @staticmethod
        def sha256(data):
            hashed_by_hashlib.append(len(data))
            return real(data)

    monkeypatch.setattr(native, "hashlib", Spy)
    for run in (1, 2, 8, 9, 15, 16, 17, 25, 33):
        for size in (4096, 1000, 55, 56, 0):
            bufs = [os.urandom(size) for _ in range(run)]
            hashed_by_hashlib.clear()
            assert native.sha256_many(bufs, kernel="avx512") == [ref(b) for b in bufs], (run, size)
            assert len(hashed_by_hashlib) == (run if run < 9 else 0)
    # runs shorter than 9 inside a longer call: through the lanes too (no SHA-NI to take them)
    lens = [4096] * 3 + [100] + [4095] * 20 + [4096] * 2 + [7]
    chunk = os.urandom(30 * 4096)
    offs = [(i * 4093 + 1) % (len(chunk) - 4096) for i in range(len(lens))]
    hashed_by_hashlib.clear()
    got = native.sha256_blocks(chunk, np.array(offs, np.int64), np.array(lens, np.int64), kernel="avx512")
    assert got == b"".join(ref(chunk[o : o + ln]) for o, ln in zip(offs, lens)) and not hashed_by_hashlib


def test_without_sha_ni_the_lanes_are_timed_against_hashlib(monkeypatch):
    clock = [0.0]

    def fake_blocks(buf, offs, lens, *, kernel):
        clock[0] += {"hashlib": 2.0, "avx512": 1.0}[kernel]
        return b""

    monkeypatch.setattr(native, "sha256_blocks", fake_blocks)
    monkeypatch.setattr(native.time, "perf_counter", lambda: clock[0])
    assert native._time_sha256_kernels(("hashlib", "avx512")) == "avx512"
    clock[0] = 0.0
    monkeypatch.setattr(native, "sha256_blocks",
                        lambda buf, offs, lens, *, kernel: clock.__setitem__(0, clock[0] + {"hashlib": 1.0, "avx512": 3.0}[kernel]))
    assert native._time_sha256_kernels(("hashlib", "avx512")) == "hashlib"


@pytest.mark.skipif(not LANES, reason="this CPU has no AVX-512: the 16-lane kernel does not run here")
def test_lanes_every_length_through_two_padding_blocks():
    data = os.urandom(300 + 16)
    for n in range(300):
        bufs = [data[lane : lane + n] for lane in range(16)] + [data[:n]]  # 17: 16 lanes, then one
        assert native.sha256_many(bufs, kernel="avx512") == [ref(b) for b in bufs], n


@pytest.mark.skipif(not LANES, reason="this CPU has no AVX-512: the 16-lane kernel does not run here")
def test_lanes_runs_cut_by_length_changes_and_odd_addresses():
    chunk = memoryview(bytearray(os.urandom(40 * 4096 + 7)))
    # runs of 12, 1, 20 and 3 equal lengths; odd offsets, overlapping and repeated blocks
    lens = [4096] * 12 + [100] + [4095] * 20 + [4096] * 3
    offs = [(i * 4093 + 1) % (len(chunk) - 4096) for i in range(len(lens))]
    offs[5] = offs[6]
    got = native.sha256_blocks(chunk, np.array(offs, np.int64), np.array(lens, np.int64), kernel="avx512")
    assert got == b"".join(ref(chunk[o : o + ln]) for o, ln in zip(offs, lens))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_length_through_two_padding_blocks(kernel):
    data = os.urandom(300)
    # singles (lengths differ) and pairs (equal neighbours) for every length 0..299
    bufs = []
    for n in range(300):
        bufs += [data[:n], data[1 : n + 1], data[:n]]
    assert native.sha256_many(bufs, kernel=kernel) == [ref(b) for b in bufs]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [64 * 1024, 64 * 1024 + 1, 1 << 20, 4 * 1024 * 1024 - 7])
def test_large_blocks(kernel, n):
    a, b = os.urandom(n), os.urandom(n)
    assert native.sha256_many([a, b, a], kernel=kernel) == [ref(a), ref(b), ref(a)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=700), max_size=9))
def test_many_matches_hashlib(bufs):
    assert native.sha256_many(bufs) == [ref(b) for b in bufs]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=5000), st.data())
def test_blocks_matches_hashlib(buf, data):
    n = data.draw(st.integers(0, 8))
    offs = [data.draw(st.integers(0, len(buf))) for _ in range(n)]
    lens = [data.draw(st.integers(0, len(buf) - o)) for o in offs]
    got = native.sha256_blocks(buf, np.array(offs, np.int64), np.array(lens, np.int64))
    assert got == b"".join(ref(buf[o : o + ln]) for o, ln in zip(offs, lens))


def test_blocks_of_a_chunk_like_the_engine():
    bs = 64 * 1024
    chunk = memoryview(bytearray(os.urandom(10 * bs + 100)))
    offs = np.arange(11, dtype=np.int64) * bs
    lens = np.minimum(len(chunk) - offs, bs)  # the last block is partial
    for kernel in KERNELS:
        got = native.sha256_blocks(chunk, offs, lens, kernel=kernel)
        assert got == b"".join(ref(chunk[o : o + ln]) for o, ln in zip(offs.tolist(), lens.tolist()))


def test_bad_arguments():
    with pytest.raises(UsageError, match="outside the 10-byte buffer"):
        native.sha256_blocks(bytes(10), np.array([5]), np.array([6]))
    with pytest.raises(UsageError, match="outside"):
        native.sha256_blocks(bytes(10), np.array([-1]), np.array([1]))
    with pytest.raises(UsageError, match="one length"):
        native.sha256_blocks(bytes(10), np.array([0, 1]), np.array([1]))
    if NATIVE:
        with pytest.raises(UsageError, match="bytes-like"):
            native.sha256_many([b"x", 3], kernel=NATIVE[0])
    assert native.sha256_many([]) == [] and native.sha256_blocks(b"", np.array([], np.int64), np.array([], np.int64)) == b""


def test_kernel_selection(monkeypatch):
    monkeypatch.delenv("PYVBAK_SHA256", raising=False)
    assert native.selected_sha256_kernel() == native._fastest_sha256_kernel(tuple(KERNELS))
    for kernel in KERNELS:
        monkeypatch.setenv("PYVBAK_SHA256", kernel)
        assert native.selected_sha256_kernel() == kernel
    monkeypatch.setenv("PYVBAK_SHA256", "hashlib")
    assert native.selected_sha256_kernel() == "hashlib"
    monkeypatch.setenv("PYVBAK_SHA256", "md5")
    with pytest.raises(UsageError, match="unknown SHA-256 kernel 'md5'.*PYVBAK_SHA256"):
        native.sha256_many([b"x"])
    monkeypatch.delenv("PYVBAK_SHA256")
    monkeypatch.setattr(native, "available_sha256_kernels", lambda: ["hashlib"])
    with pytest.raises(UsageError, match="'sha-ni'.*not supported by this CPU"):
        native.sha256_many([b"x"], kernel="sha-ni")
    assert native.sha256_many([b"x"]) == [ref(b"x")]  # falls back to the reference


def test_decode_blocks_reports_each_bad_frame_in_place():
    cctx, dctx = zstandard.ZstdCompressor(level=1, write_checksum=True), zstandard.ZstdDecompressor()
    blocks = [os.urandom(4096), b"text " * 800, b"more text " * 400, os.urandom(4096)]
    frames = [memoryview(cctx.compress(b)) for b in blocks]
    digests = [ref(b) for b in blocks]
    ulens = [len(b) for b in blocks]
    good = decode_blocks(dctx, frames, ulens, digests)
    assert [bytes(d) for d, p in good] == blocks and all(p is None for _, p in good)

    bad_digests = list(digests)
    bad_digests[1] = ref(b"other")
    garbage = list(frames)
    garbage[3] = memoryview(b"\x28\xb5\x2f\xfd" + bytes(20))
    wrong_len = list(ulens)
    wrong_len[0] += 1
    out = decode_blocks(dctx, garbage, wrong_len, bad_digests)
    assert out[0] == (None, "does not match its digest")  # wrong length
    assert out[1] == (None, "does not match its digest")  # wrong digest
    assert bytes(out[2][0]) == blocks[2] and out[2][1] is None
    assert out[3][0] is None and "corrupt frame" in out[3][1]
    assert decode_block(dctx, frames[2], ulens[2], digests[2])[1] is None
