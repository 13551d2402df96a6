"""The engine's batch compression gives exactly the frames per-block compression gives,
and every frame is a standard zstd frame of its block (content size and checksum)."""

from __future__ import annotations

import platform
import random
import shutil
import subprocess

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


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_batch_frames_pass_the_zstd_tool(tmp_path):
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
