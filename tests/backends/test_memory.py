"""MemoryBackend: the conformance suite plus the memory:// naming rules."""

from __future__ import annotations

import uuid

import pytest

from pyvbak.backends import MemoryBackend, open_backend
from pyvbak.errors import UsageError

from .conformance import *  # noqa: F401,F403  (the suite: every test_* in it runs here)


@pytest.fixture
def backend():
    name = f"test-{uuid.uuid4().hex}"
    with open_backend(f"memory://{name}") as b:
        yield b
    MemoryBackend.drop(name)


@pytest.fixture
def make_leftover():
    def make(backend, name, age_seconds):
        return backend.simulate_interrupted_write(name, age_seconds)

    return make


def test_named_stores_are_shared_until_dropped():
    name = f"test-{uuid.uuid4().hex}"
    a = open_backend(f"memory://{name}")
    a.write_new("config", b"c")
    a.close()
    b = open_backend(f"memory://{name}")
    assert b.read("config") == b"c"
    assert b.location == f"memory://{name}"
    other = open_backend(f"memory://{name}-other")
    assert list(other.list()) == []
    MemoryBackend.drop(name)
    MemoryBackend.drop(f"{name}-other")
    assert list(open_backend(f"memory://{name}").list()) == []
    MemoryBackend.drop(name)


def test_private_store():
    a, b = MemoryBackend(), MemoryBackend()
    a.write_new("x", b"1")
    assert not b.exists("x")


@pytest.mark.parametrize("location", ["memory://", "memory://a/b"])
def test_bad_memory_location(location):
    with pytest.raises(UsageError):
        open_backend(location)


def test_closed_backend_refuses_use():
    b = MemoryBackend()
    b.close()
    with pytest.raises(UsageError):
        b.read("x")
