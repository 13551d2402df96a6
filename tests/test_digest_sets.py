"""digest_sets gives exactly numpy's unique / unique(return_inverse) / isin on S32 names,
including names with trailing NUL bytes (padding in S32) and empty inputs."""

from __future__ import annotations

import numpy as np
import pytest

from pyvbak.repo import digest_sets


def names(rng, n, pool):
    """n S32 names drawn from a pool (so repeats happen), some ending in NUL bytes."""
    raw = np.frombuffer(rng.bytes(32 * pool), "V32").copy()
    b = raw.view("u1").reshape(pool, 32)
    b[: pool // 4, -3:] = 0  # trailing NULs
    b[pool // 4 : pool // 3, 1:] = 0  # mostly NUL
    return raw.view("S32")[rng.integers(0, pool, n)]


@pytest.mark.parametrize("n,pool", [(0, 1), (1, 1), (2, 1), (50, 10), (5000, 3000), (20000, 100000)])
def test_same_as_numpy(n, pool):
    rng = np.random.default_rng(n + pool)
    x = names(rng, n, pool)
    u = digest_sets.unique(x)
    assert u.dtype == np.dtype("S32") and np.array_equal(u, np.unique(x))
    uu, inv = digest_sets.unique_inverse(x)
    want_u, want_inv = np.unique(x, return_inverse=True)
    assert np.array_equal(uu, want_u) and np.array_equal(inv, want_inv.reshape(-1))
    assert np.array_equal(uu[inv], x)
    other = digest_sets.unique(names(np.random.default_rng(7), max(1, n // 2), pool))
    assert np.array_equal(digest_sets.isin(x, other), np.isin(x, other))
    assert np.array_equal(digest_sets.isin(x, other[:0]), np.zeros(len(x), bool))


def test_isin_finds_every_member_and_no_other():
    rng = np.random.default_rng(3)
    members = digest_sets.unique(names(rng, 1000, 5000))
    outsiders = names(np.random.default_rng(4), 1000, 5000)
    outsiders = outsiders[~np.isin(outsiders, members)]
    q = np.concatenate([members, outsiders])
    rng.shuffle(q)
    hit = digest_sets.isin(q, members)
    assert hit.sum() == len(members)
    assert set(q[hit].tolist()) == set(members.tolist())
