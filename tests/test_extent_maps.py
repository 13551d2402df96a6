"""Allocation and dirty maps as arrays: the vectorised parsing and marking against
straightforward per-extent references, on random maps (edge cases included)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from pyvbak.engine.backup import _mask_edges, _mask_run_arrays, _run_arrays, _runs, _runs_within, _zero_extent_blocks
from pyvbak.sources import nbd_protocol as P
from pyvbak.sources.base import Extent
from pyvbak.sources.nbd import _merge_ranges, _status_descriptors


def reference_descriptors(pairs, length):
    """The per-descriptor loop the client used before: cut at ``length``, merge equal flags."""
    out, remaining = [], length
    for ln, fl in pairs:
        if ln == 0:
            return None
        if remaining == 0:
            break
        ln = min(ln, remaining)
        remaining -= ln
        if out and out[-1][1] == fl:
            out[-1] = (out[-1][0] + ln, fl)
        else:
            out.append((ln, fl))
    return out


def encode(pairs):
    return b"".join(P.S_EXTENT.pack(ln, fl) for ln, fl in pairs)


@pytest.mark.parametrize("seed", range(40))
def test_status_descriptors_match_the_reference(seed):
    rng = random.Random(seed)
    pairs = [(rng.choice([1, 512, 4096, 65536, rng.randrange(1, 1 << 20)]), rng.choice([0, 1, 2, 3]))
             for _ in range(rng.randrange(1, 60))]
    total = sum(ln for ln, _ in pairs)
    # a request shorter than, equal to, or (a server may describe less) longer than the map
    length = rng.choice([total, max(1, total - rng.randrange(total)), total + 4096, pairs[0][0]])
    got = _status_descriptors(memoryview(encode(pairs)), length)
    want = reference_descriptors(pairs, length)
    assert [tuple(r) for r in got.tolist()] == want
    assert got[:, 0].sum() == min(total, length)


def test_status_descriptors_refuse_a_zero_length_extent():
    assert _status_descriptors(memoryview(encode([(4096, 0), (0, 1), (4096, 0)])), 8192) is None


def test_merge_ranges_joins_touching_neighbours_only():
    offsets = np.array([0, 10, 20, 35, 40, 100], np.int64)
    lengths = np.array([10, 10, 5, 5, 1, 7], np.int64)
    o, ln = _merge_ranges(offsets, lengths)
    assert list(zip(o.tolist(), ln.tolist())) == [(0, 25), (35, 6), (100, 7)]
    o, ln = _merge_ranges(np.empty(0, np.int64), np.empty(0, np.int64))
    assert len(o) == len(ln) == 0


@dataclass
class MapSource:
    size: int
    zero_extents: list  # (offset, length), disjoint and ascending

    def extents(self):
        pos = 0
        for off, ln in self.zero_extents:
            if off > pos:
                yield Extent(pos, off - pos)
            yield Extent(off, ln, True)
            pos = off + ln
        if pos < self.size:
            yield Extent(pos, self.size - pos)


class ArraySource(MapSource):
    def zero_ranges(self):
        return np.array(self.zero_extents, np.int64).reshape(-1, 2)


def reference_blocks(size, zero_extents, n, bs):
    covered = np.zeros(n, dtype=bool)
    for off, ln in zero_extents:
        first = -(-off // bs)
        last = n if off + ln >= size else (off + ln) // bs
        if last > first:
            covered[first:last] = True
    return covered


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("kind", [MapSource, ArraySource])
def test_zero_extent_blocks_match_the_reference(seed, kind):
    rng = random.Random(seed)
    bs = 1 << rng.choice([12, 16])
    size = rng.randrange(1, 200) * bs + rng.choice([0, 0, 512, bs - 512])  # short last block too
    n = -(-size // bs)
    extents, pos = [], 0
    while pos < size:
        gap = rng.choice([0, 512, bs, 3 * bs, rng.randrange(1, 4 * bs)])
        ln = rng.choice([512, bs, 2 * bs + 512, rng.randrange(1, 8 * bs)])
        off = pos + gap
        if off >= size:
            break
        ln = min(ln, size - off)
        if extents and extents[-1][0] + extents[-1][1] == off:  # a map joins touching zero extents
            extents[-1] = (extents[-1][0], extents[-1][1] + ln)
        else:
            extents.append((off, ln))
        pos = off + ln
    got = _zero_extent_blocks(kind(size, extents), n, bs)
    assert got.dtype == bool and len(got) == n
    assert np.array_equal(got, reference_blocks(size, extents, n, bs))


def test_zero_extent_blocks_of_a_source_without_a_map_read_everything():
    class Broken:
        size = 1 << 20

        def extents(self):
            raise OSError("no map")

    assert not _zero_extent_blocks(Broken(), 16, 65536).any()


def reference_runs(indices, max_blocks):
    out = []
    if not len(indices):
        return out
    for part in np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1):
        start, end = int(part[0]), int(part[-1]) + 1
        out += [(a, min(a + max_blocks, end)) for a in range(start, end, max_blocks)]
    return out


@pytest.mark.parametrize("seed", range(60))
def test_block_runs_and_their_masks_match_the_references(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 3000)
    density = rng.choice([0.05, 0.5, 0.95, 1.0])
    indices = np.flatnonzero(np.array([rng.random() < density for _ in range(n)]))
    max_blocks = rng.choice([1, 2, 3, 64, 4096])
    assert list(_runs(indices, max_blocks)) == reference_runs(indices, max_blocks)
    firsts, ends = _run_arrays(indices, max_blocks)
    from_mask = _mask_run_arrays(np.isin(np.arange(n), indices), max_blocks)
    assert np.array_equal(from_mask[0], firsts) and np.array_equal(from_mask[1], ends)
    mask = np.array([rng.random() < 0.8 for _ in range(n)])
    want = [bool(mask[a:b].all()) for a, b in zip(firsts.tolist(), ends.tolist())]
    assert _runs_within(mask, firsts, ends).tolist() == want


@pytest.mark.parametrize("seed", range(40))
def test_mask_edges_match_the_diff_reference(seed):
    rng = random.Random(seed)
    mask = np.array([rng.random() < rng.choice([0.0, 0.1, 0.5, 1.0]) for _ in range(rng.randrange(0, 400))], dtype=bool)
    want = np.flatnonzero(np.diff(mask.astype(np.int64), prepend=0, append=0))
    got = _mask_edges(mask)
    assert got.dtype == np.int64 and got.tolist() == want.tolist()
