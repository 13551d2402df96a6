"""The engine's batch compression gives exactly the frames per-block compression gives,
and every frame is a standard zstd frame of its block (content size and checksum)."""

from __future__ import annotations

import mmap
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from pyvbak import allocator
from pyvbak.engine.backup import compress_blocks


class _PerBlockOnly:
    """A compressor without the batch call: the fallback path."""

    def __init__(self, cctx):
        self.compress = cctx.compress


def _blocks(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghij klmnop") for _ in range(rnd.randint(1, 9))) for _ in range(300)]
    out = []
    for k in range(40):
        kind = k % 4
        n = 65536 if k != 39 else 12345  # a disk's short last block comes last
        if kind == 0:
            out.append(rnd.randbytes(n))
        elif kind == 1:
            out.append(b" ".join(rnd.choice(words) for _ in range(n))[:n])
        elif kind == 2:
            out.append(bytes(n - 1) + b"\x01")
        else:
            half = rnd.randbytes(n // 2)
            out.append((half + bytes(n))[:n])
    return out


@pytest.mark.parametrize("level", [1, 3, -5])
def test_batch_frames_equal_per_block_frames(level):
    blocks = _blocks(level + 10)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    assert hasattr(cctx, "multi_compress_to_buffer"), "the C backend offers the batch call"
    views = [memoryview(b) for b in blocks]
    batch = compress_blocks(cctx, views)
    single = compress_blocks(_PerBlockOnly(cctx), views)
    assert [bytes(f) for f in batch] == [bytes(f) for f in single] == [cctx.compress(b) for b in blocks]
    dctx = zstandard.ZstdDecompressor()
    for block, frame in zip(blocks, batch):
        params = zstandard.get_frame_parameters(bytes(frame))
        assert params.content_size == len(block) and params.has_checksum
        assert dctx.decompress(bytes(frame)) == block


def test_one_block_and_none():
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    assert compress_blocks(cctx, []) == []
    (frame,) = compress_blocks(cctx, [memoryview(b"x" * 70000)])
    assert bytes(frame) == cctx.compress(b"x" * 70000)


def test_batch_frames_pass_the_zstd_tool(tmp_path):
    from conftest import require_tool

    require_tool("zstd", "zstd")
    blocks = _blocks(7)
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    frames = compress_blocks(cctx, [memoryview(b) for b in blocks])
    path = tmp_path / "frames.zst"
    path.write_bytes(b"".join(bytes(f) for f in frames))
    out = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    assert out == b"".join(blocks)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_thresholds_apply_once():
    assert allocator.tune_for_throughput() is True
    assert allocator.tune_for_throughput() is True  # once per process, same answer


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = lo <= address < hi
            elif head == "VmFlags:" and current:
                return line.split()[1:]
    return []


def test_sparse_zeros_are_zeroed_writable_arrays_mapped_without_huge_pages():
    """Large per-block arrays (a thin disk's index and hashes) are written here and
    there: with transparent huge pages every first write zeroes 2 MiB, so they are
    mapped with MADV_NOHUGEPAGE; small ones are plain np.zeros."""
    from pyvbak.repo import format as fmt

    big = allocator.sparse_zeros(allocator.SPARSE_MIN_BYTES // fmt.SNAPSHOT_RECORD.itemsize + 1, fmt.SNAPSHOT_RECORD)
    assert big.dtype == fmt.SNAPSHOT_RECORD and big.flags.writeable and big.nbytes >= allocator.SPARSE_MIN_BYTES
    big["digest"][[0, len(big) // 2, len(big) - 1]] = np.frombuffer(b"\x07" * 96, "V32")
    assert (big["digest"].view("S32") != b"").sum() == 3 and not big["fast"].any()
    if sys.platform.startswith("linux") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        assert "nh" in _vm_flags(big.ctypes.data)
    pairs = allocator.sparse_zeros((allocator.SPARSE_MIN_BYTES // 16, 2), np.uint64)
    assert pairs.shape == (allocator.SPARSE_MIN_BYTES // 16, 2) and not pairs[-1].any()
    small = allocator.sparse_zeros((1000, 2), np.uint64)
    assert small.shape == (1000, 2) and small.flags.owndata and not small.any()
