"""The NBD client against a misbehaving server: each fault is a clear SourceError within
the timeout, never a hang; legal oddities (out-of-order replies, holes, chunks in any
order, short block status) still work."""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import wait_until
from nbd_fakes import FakeNbdServer
from pyvbak.errors import SourceError, UsageError
from pyvbak.sources import nbd_protocol as P
from pyvbak.sources.base import Extent
from pyvbak.sources.nbd import NbdSource

#: the reply timeout of the tests of misbehaving servers; the others wait far longer, since
#: the fake server's threads run in this process and a loaded machine may stall it for a
#: second
TIMEOUT = 1.0
PATIENT = 30.0
DATA = os.urandom(256 * 1024)


def open_source(server, **kw):
    kw.setdefault("timeout", PATIENT)
    return NbdSource(server.uri, **kw)


def expect_error(behaviour, match, *, op=lambda s: s.read(0, 8192), **srv):
    with FakeNbdServer(DATA, behaviour, **srv) as server:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=match) as ei:
            with open_source(server, timeout=TIMEOUT) as src:
                op(src)
        # Generous bound: the point is "no hang", not a timing assertion.
        assert time.monotonic() - t0 < TIMEOUT * 5 + 2
        assert server.uri in str(ei.value)
        return ei.value


@pytest.mark.parametrize("behaviour", ["ok", "out_of_order", "no_structured"])
def test_reads_correct(behaviour):
    with FakeNbdServer(DATA, behaviour) as server, open_source(server) as src:
        assert src.size == len(DATA)
        assert src.read(0, len(DATA)) == DATA
        assert src.read(1000, 3) == DATA[1000:1003]
        assert src.read(len(DATA) - 10, 100) == DATA[-10:]  # short at the end
        assert src.read(len(DATA), 10) == b""
        ranges = [(i * 4096 + 7, 5000) for i in range(40)]
        assert list(src.read_many(ranges, depth=8)) == [DATA[o:o + n] for o, n in ranges]


@pytest.mark.parametrize("behaviour", ["ok", "out_of_order", "no_structured"])
def test_read_ranges_into_correct(behaviour):
    ranges = [(i * 8192, 4096) for i in range(20)] + [(3, 100), (len(DATA) - 4096, 8192)]
    with FakeNbdServer(DATA, behaviour) as server, open_source(server) as src:
        buf = bytearray(sum(n for _, n in ranges))
        assert src.read_ranges_into(ranges, buf) == len(buf) - 4096
        assert bytes(buf[:len(buf) - 4096]) == b"".join(DATA[o:o + n] for o, n in ranges)
        with pytest.raises(UsageError):
            src.read_ranges_into([(0, 10)], bytearray(5))


@pytest.mark.parametrize("behaviour,match", [("stall_reply", "timed out after 1s waiting for a reply"),
                                             ("garbage_magic", "bad reply magic"),
                                             ("close_mid_reply", "closed the connection in the middle|connection error while receiving read data")])
def test_read_ranges_into_misbehaving_server(behaviour, match):
    """Every request of the batch in flight, the server fails: one clear error, no hang."""
    expect_error(behaviour, match, op=lambda s: s.read_ranges_into([(i * 8192, 4096) for i in range(16)],
                                                                   bytearray(16 * 4096)))


def test_out_of_order_replies_from_threads():
    with FakeNbdServer(DATA, "out_of_order") as server, open_source(server) as src:
        results = {}

        def worker(i):
            off = (i * 12345) % (len(DATA) - 9000)
            results[i] = src.read(off, 9000) == DATA[off:off + 9000]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == {i: True for i in range(16)}


def test_hole_chunks_read_as_zero():
    with FakeNbdServer(DATA, "holes") as server, open_source(server) as src:
        got = src.read(0, 8192)
        assert got == DATA[:4096] + bytes(4096)


def test_block_size_constraints_split_and_align():
    # minimum 512, maximum 64 KiB: a 1 MiB unaligned read becomes aligned requests of
    # at most 64 KiB, and the caller still gets exactly the bytes asked for.
    with FakeNbdServer(DATA, "ok", block_size=(512, 4096, 65536)) as server, open_source(server) as src:
        assert src.client.max_payload == 65536
        got = src.read(100, 200_000)
        assert got == DATA[100:200_100]
        reads = [r for r in server.requests if r[0] == P.CMD_READ]
        assert len(reads) == 4
        assert all(ln <= 65536 and off % 512 == 0 and ln % 512 == 0 for _, _, off, ln in reads)


def test_client_payload_cap():
    with FakeNbdServer(DATA, "ok") as server, open_source(server, max_payload=16384) as src:
        assert src.read(0, len(DATA)) == DATA
        assert max(ln for cmd, _, _, ln in server.requests if cmd == P.CMD_READ) == 16384


@pytest.mark.parametrize("bad", [(3, 4096, 65536), (512, 256, 65536), (512, 4096, 1000)])
def test_invalid_block_size_rejected(bad):
    expect_error("ok", "block size", block_size=bad)


def test_block_status_partial_replies_loop():
    extents = [(8192, 0), (65536, P.STATE_HOLE | P.STATE_ZERO), (len(DATA) - 8192 - 65536, 0)]
    with FakeNbdServer(DATA, "bs_partial", extents=extents) as server, open_source(server) as src:
        assert src.allocated_extents() == [Extent(0, 8192), Extent(8192, 65536, True),
                                           Extent(8192 + 65536, len(DATA) - 8192 - 65536)]
        assert sum(1 for r in server.requests if r[0] == P.CMD_BLOCK_STATUS) > 10
        assert src.change_tracking(None) is None


def test_short_reply():
    expect_error("short_reply", "covered only 4096 bytes")


def test_garbage_magic():
    expect_error("garbage_magic", "bad reply magic 0xdeadbeef")


def test_unknown_handle():
    expect_error("unknown_handle", "did not send")


def test_chunk_outside_range():
    expect_error("outside_range", "outside the request")


def test_reply_longer_than_request():
    expect_error("too_long", "outside the request")


def test_stall_mid_handshake():
    expect_error("stall_handshake", r"timed out after 1s waiting for the greeting", op=lambda s: None)


def test_stall_mid_reply():
    expect_error("stall_mid_reply", "timed out after 1s")


def test_stall_before_reply():
    expect_error("stall_reply", "timed out after 1s waiting for a reply")


def test_close_mid_reply():
    expect_error("close_mid_reply", "closed the connection in the middle")


def test_a_connection_closed_at_a_read_says_it_may_be_a_read_error_of_the_servers_disk():
    """QEMU 7.2's server closes the connection at a read its disk fails (structured
    replies on); "closed the connection with requests outstanding" alone hid the I/O
    error (session 26's audit)."""
    expect_error("close_on_read", r"closed the connection with requests outstanding \(it stopped, or could not read "
                                  r"its disk: QEMU closes the connection at a read error\)")


def test_error_chunk_names_errno():
    expect_error("error", "EIO for NBD_CMD_READ at offset 0 length 8192: injected failure")


def test_more_chunks_after_an_error_reply_name_the_error():
    """QEMU 7.2 ends a block-status reply with an error chunk and then sends the next
    context's chunk for the same handle when the export's view went away (a cancelled
    job): the user read 'reply for handle 1, which the client did not send', which looks
    like a client bug.  The error the reply ended with is named now."""
    expect_error("error_then_more", r"went on replying after it had ended a reply with an error "
                                    r"\(EIO for NBD_CMD_READ.*injected failure\).*view may have gone away",
                 op=_read_after_an_error)


def _read_after_an_error(src):
    with pytest.raises(SourceError, match="injected failure"):
        src.read(0, 8192)  # the reply the server ends with its error: said as it is
    src.read(8192, 8192)  # the chunk that came after it broke the connection: said why


def test_error_offset_chunk():
    expect_error("error_offset", r"EIO .*at offset 1\): bad sector")


def test_simple_error_reply():
    expect_error("simple_error", "EPERM")


def test_unknown_export():
    with FakeNbdServer(DATA, "ok") as server:
        with pytest.raises(SourceError, match="NBD_REP_ERR_UNKNOWN.*no such export"):
            NbdSource(server.uri.replace("disk0", "nope"), timeout=TIMEOUT).open()


def test_error_poisons_connection_and_pending_reads():
    with FakeNbdServer(DATA, "garbage_magic") as server, open_source(server) as src:
        with pytest.raises(SourceError):
            list(src.read_many([(0, 4096)] * 4))
        with pytest.raises(SourceError, match="bad reply magic"):
            src.read(0, 10)


def test_nbd_error_reply_keeps_connection_usable():
    # An NBD error is about one request, not the stream: the next request still runs.
    with FakeNbdServer(DATA, "error") as server, open_source(server) as src:
        for _ in range(2):
            with pytest.raises(SourceError, match="EIO"):
                src.read(0, 100)
        assert src.client._fatal is None


def test_stalled_server_does_not_block_close():
    with FakeNbdServer(DATA, "stall_reply") as server:
        src = open_source(server, timeout=TIMEOUT).open()
        t = threading.Thread(target=lambda: pytest.raises(SourceError, src.read, 0, 100), daemon=True)
        t.start()
        wait_until(lambda: src.client._pending, timeout=5, what="the read to be submitted")
        # close must fail the outstanding read, not wait for the stalled server
        src.close()
        t.join(TIMEOUT * 5)
        assert not t.is_alive()


def test_connection_refused(tmp_path):
    with pytest.raises(SourceError, match="cannot connect") as info:
        NbdSource(f"nbd+unix:///x?socket={tmp_path}/missing.sock", timeout=TIMEOUT).open()
    # where, why and what to check; not a bare "[Errno 2]"
    assert f"socket {tmp_path}/missing.sock (No such file or directory)" in str(info.value)
    assert "NBD server" in str(info.value) and "running" in str(info.value) and "Errno" not in str(info.value)


def test_relative_xdg_directories_are_ignored(monkeypatch, tmp_path):
    """The XDG spec: a relative XDG_DATA_HOME / XDG_CACHE_HOME is invalid; it made a
    repository under whatever the working directory was."""
    from pyvbak.repo.cache import repo_cache_dir
    from pyvbak.repo.repository import default_repository_path

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", "relative")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.delenv("PYVBAK_CACHE_DIR", raising=False)
    assert default_repository_path() == f"{tmp_path}/.local/share/pyvbak/repository"
    assert repo_cache_dir("a" * 32).startswith(f"{tmp_path}/.cache/pyvbak")


def test_read_into_and_hole_zeroing_in_reused_buffers():
    with FakeNbdServer(DATA, "holes") as server, open_source(server) as src:
        buf = bytearray(b"\xff" * 10000)
        assert src.read_into(0, memoryview(buf)[:8192]) == 8192
        assert buf[:8192] == DATA[:4096] + bytes(4096) and buf[8192:] == b"\xff" * (10000 - 8192)
        for _ in range(3):  # pooled buffers carry old data: holes must still read as zero
            assert src.read(0, 8192) == DATA[:4096] + bytes(4096)
        assert src.read_into(len(DATA) - 100, buf) == 100
        with pytest.raises(UsageError):
            src.read_into(0, b"readonly")


def test_read_into_unaligned_falls_back():
    with FakeNbdServer(DATA, "ok", block_size=(512, 4096, 65536)) as server, open_source(server) as src:
        buf = bytearray(100_000)
        assert src.read_into(3, buf) == 100_000
        assert buf == DATA[3:100_003]
        assert src.read_into(65536, buf) == 100_000
        assert buf == DATA[65536:165536]


def test_zero_ranges_within_windows_loop_over_partial_replies(monkeypatch):
    """Allocation asked only in windows around given ranges: a server that describes at
    most 4 KiB per reply is asked again for the rest of each window, every window's
    requests in flight together; nothing outside the windows is asked or reported."""
    from pyvbak.sources import nbd as nbd_module

    extents = [(8192, 0), (65536, P.STATE_HOLE | P.STATE_ZERO), (len(DATA) - 8192 - 65536, 0)]
    monkeypatch.setattr(nbd_module, "STATUS_WINDOW_GAP", 1024)
    with FakeNbdServer(DATA, "bs_partial", extents=extents) as server, open_source(server) as src:
        assert src.zero_ranges().tolist() == [[8192, 65536]]
        server.requests.clear()
        got = src.zero_ranges(within=[(4096, 8192), (70000, 1000)])
        assert got.tolist() == [[8192, 4096], [70000, 1000]]
        asked = [(off, ln) for cmd, _, off, ln in server.requests if cmd == P.CMD_BLOCK_STATUS]
        assert all(4096 <= off and off + ln <= 12288 or 70000 <= off and off + ln <= 71000 for off, ln in asked)
        assert len(asked) > 2  # the 4 KiB replies were continued


# -- hostile servers: each of these once hung, ate memory or mixed up data ------------

def test_a_tiny_maximum_block_size_is_refused():
    """(1, 1, 1) made a 4 MiB read 4 M requests held at once: gigabytes of memory."""
    expect_error("ok", "maximum block size 1 is below 4096", block_size=(1, 1, 1))


def test_endless_hole_chunks_are_an_overlap_at_once():
    expect_error("endless_holes", "overlaps itself")


def test_endless_error_chunks_are_cut_off():
    """The first error is the one reported; the endless rest no longer keeps the reply
    (and the caller) going forever."""
    expect_error("endless_errors", "EIO for NBD_CMD_READ at offset 0 length 8192: again")


def test_one_context_id_for_two_contexts_is_refused():
    """Block status is told apart by context id alone: a server giving the dirty bitmap and
    the allocation map one id made an incremental read the allocation map as the bitmap
    (every change missed)."""
    with FakeNbdServer(DATA, "dup_context_ids") as server:
        with pytest.raises(SourceError, match="context id 7 to both"):
            with open_source(server, dirty_bitmap="bm0", bitmap_connection=False) as src:
                src.change_tracking(None)


def test_endless_option_replies_are_cut_off():
    expect_error("endless_info", "more than 256 replies")


def test_an_export_beyond_any_disk_is_refused():
    expect_error("huge_size", "beyond any disk")
