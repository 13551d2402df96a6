"""A small threaded NBD server for tests, able to misbehave on purpose.

It speaks enough of the fixed-newstyle protocol for pyvbak's client (structured replies,
``base:allocation``, NBD_OPT_GO with block sizes, READ, BLOCK_STATUS, DISC) and serves
``data`` from memory.  ``behaviour`` selects one fault; every stall waits on the server's
stop event so closing the server ends all its threads at once.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import tempfile
import threading

from pyvbak.sources import nbd_protocol as P

BEHAVIOURS = {
    "ok",               # correct replies; reads are answered as two chunks, second half first
    "holes",            # reads answered as a data chunk then a hole chunk for the second half
    "no_structured",    # refuses structured replies; simple replies carry the data
    "out_of_order",     # collects requests and answers them in reverse order
    "short_reply",      # DONE after a data chunk covering only half the request
    "garbage_magic",    # reply starts with a wrong magic
    "unknown_handle",   # reply carries a handle the client never sent
    "outside_range",    # data chunk that starts inside but ends past the request
    "too_long",         # simple reply path: data chunk longer than the request
    "stall_handshake",  # sends half the greeting, then nothing
    "stall_mid_reply",  # sends a reply header and part of the data, then nothing
    "close_mid_reply",  # sends a reply header and part of the data, then closes
    "close_on_read",    # closes the connection at a read, no reply (QEMU 7.2 on a read error of its disk)
    "error",            # structured NBD_REPLY_TYPE_ERROR with EIO and a message
    "error_offset",     # NBD_REPLY_TYPE_ERROR_OFFSET: EIO at an offset inside the request
    "simple_error",     # simple reply with EPERM
    "bs_partial",       # block status: at most one 4 KiB extent per reply, last one past the end
    "stall_reply",      # reads the request and never answers
    "endless_holes",    # answers a read with hole chunks covering it, over and over, never DONE
    "endless_errors",   # answers a read with error chunks, over and over, never DONE
    "dup_context_ids",  # gives base:allocation and every other requested context one id
    "endless_info",     # answers NBD_OPT_GO with NBD_REP_INFO replies forever
    "huge_size",        # advertises an export of 2^62 bytes
    "error_then_more",  # ends a read's reply with an error chunk (DONE), then sends another chunk for it
}


class FakeNbdServer:
    def __init__(self, data: bytes, behaviour: str = "ok", *, export: str = "disk0",
                 block_size: tuple[int, int, int] | None = (1, 4096, 32 << 20),
                 extents: list[tuple[int, int]] | None = None):
        if behaviour not in BEHAVIOURS:
            raise ValueError(behaviour)
        self.data = data
        self.behaviour = behaviour
        self.export = export
        self.block_size = block_size
        # base:allocation extents as (length, flags); default: all data
        self.extents = extents or [(len(data), 0)]
        self.requests: list[tuple[int, int, int, int]] = []  # (type, flags, offset, length)
        self._dir = tempfile.mkdtemp(prefix="pyvbak-fake-nbd-")
        self.path = os.path.join(self._dir, "nbd.sock")
        self.uri = f"nbd+unix:///{export}?socket={self.path}"
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    # ---- lifecycle ---------------------------------------------------------------
    def close(self):
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self._threads:
            t.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.rmdir(self._dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve_safely, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve_safely(self, conn):
        try:
            self._serve(conn)
        except (OSError, EOFError, struct.error):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    # ---- helpers -------------------------------------------------------------------
    @staticmethod
    def _recv(conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _stall(self):
        self._stop.wait()
        raise EOFError

    def _opt_reply(self, conn, opt, rtype, data=b""):
        conn.sendall(P.S_OPTION_REPLY.pack(P.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    @staticmethod
    def _chunk(flags, rtype, handle, payload=b""):
        return P.S_U32.pack(P.STRUCTURED_REPLY_MAGIC) + P.S_STRUCTURED_TAIL.pack(flags, rtype, handle, len(payload)) + payload

    # ---- protocol ------------------------------------------------------------------
    def _serve(self, conn):
        b = self.behaviour
        greeting = P.S_SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        if b == "stall_handshake":
            conn.sendall(greeting[:9])
            self._stall()
        conn.sendall(greeting)
        self._recv(conn, 4)
        structured = False
        contexts = {}
        while True:
            _, opt, ln = P.S_OPTION.unpack(self._recv(conn, P.S_OPTION.size))
            payload = self._recv(conn, ln) if ln else b""
            if opt == P.OPT_STRUCTURED_REPLY and b != "no_structured":
                structured = True
                self._opt_reply(conn, opt, P.REP_ACK)
            elif opt == P.OPT_SET_META_CONTEXT and structured:
                nlen = struct.unpack_from(">I", payload)[0]
                pos = 4 + nlen
                count = struct.unpack_from(">I", payload, pos)[0]
                pos += 4
                for _ in range(count):
                    qlen = struct.unpack_from(">I", payload, pos)[0]
                    q = payload[pos + 4:pos + 4 + qlen].decode()
                    pos += 4 + qlen
                    if q == "base:allocation" or b == "dup_context_ids":
                        contexts[q] = 7
                        self._opt_reply(conn, opt, P.REP_META_CONTEXT, struct.pack(">I", 7) + q.encode())
                self._opt_reply(conn, opt, P.REP_ACK)
            elif opt == P.OPT_GO:
                nlen = struct.unpack_from(">I", payload)[0]
                name = payload[4:4 + nlen].decode()
                if name != self.export:
                    self._opt_reply(conn, opt, P.REP_FLAG_ERROR | 6, b"no such export")
                    continue
                size = (1 << 62) if b == "huge_size" else len(self.data)
                self._opt_reply(conn, opt, P.REP_INFO, P.S_INFO_EXPORT.pack(
                    P.INFO_EXPORT, size, P.TFLAG_HAS_FLAGS | P.TFLAG_READ_ONLY))
                while b == "endless_info" and not self._stop.is_set():
                    self._opt_reply(conn, opt, P.REP_INFO, P.S_INFO_EXPORT.pack(
                        P.INFO_EXPORT, size, P.TFLAG_HAS_FLAGS | P.TFLAG_READ_ONLY))
                if self.block_size:
                    self._opt_reply(conn, opt, P.REP_INFO, P.S_INFO_BLOCK_SIZE.pack(P.INFO_BLOCK_SIZE, *self.block_size))
                self._opt_reply(conn, opt, P.REP_ACK)
                break
            else:
                self._opt_reply(conn, opt, P.REP_FLAG_ERROR | 1)
        self._transmission(conn, structured)

    def _transmission(self, conn, structured):
        b = self.behaviour
        held = []
        while True:
            if b == "out_of_order" and held:
                # Answer the held requests, newest first, once the client pauses sending.
                ready, _, _ = select.select([conn], [], [], 0.05)
                if not ready:
                    for req in reversed(held):
                        self._answer(conn, structured, *req)
                    held.clear()
                    continue
            magic, flags, cmd, handle, off, ln = P.S_REQUEST.unpack(self._recv(conn, P.S_REQUEST.size))
            assert magic == P.REQUEST_MAGIC
            self.requests.append((cmd, flags, off, ln))
            if cmd == P.CMD_DISC:
                return
            if b == "out_of_order":
                held.append((cmd, handle, off, ln))
                continue
            self._answer(conn, structured, cmd, handle, off, ln)

    def _answer(self, conn, structured, cmd, handle, off, ln):
        b = self.behaviour
        data = self.data[off:off + ln]
        DONE = P.REPLY_FLAG_DONE
        if cmd == P.CMD_BLOCK_STATUS:
            conn.sendall(self._block_status(handle, off, ln))
            return
        if cmd != P.CMD_READ:
            conn.sendall(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 22, handle))
            return
        if b == "stall_reply":
            self._stall()
        if b == "simple_error":
            conn.sendall(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 1, handle))
            return
        if not structured:
            conn.sendall(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle) + data)
            return
        if b == "close_on_read":
            conn.shutdown(socket.SHUT_RDWR)
            raise EOFError
        if b == "garbage_magic":
            conn.sendall(b"\xde\xad\xbe\xef" + bytes(16))
            return
        if b == "unknown_handle":
            conn.sendall(self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle + 1000, P.S_U64.pack(off) + data))
            return
        if b == "outside_range":
            conn.sendall(self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off + 16) + data))
            return
        if b == "too_long":
            conn.sendall(self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data + bytes(4096)))
            return
        if b == "short_reply":
            conn.sendall(self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data[:ln // 2]))
            return
        if b in ("stall_mid_reply", "close_mid_reply"):
            msg = self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data)
            conn.sendall(msg[:len(msg) // 2])
            if b == "stall_mid_reply":
                self._stall()
            conn.shutdown(socket.SHUT_RDWR)
            raise EOFError
        if b in ("error", "error_then_more"):
            msg = b"injected failure"
            conn.sendall(self._chunk(DONE, P.REPLY_TYPE_ERROR, handle, P.S_ERROR.pack(5, len(msg)) + msg))
            if b == "error_then_more":  # as QEMU 7.2's block status does once the view is gone
                conn.sendall(self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data))
            return
        if b == "error_offset":
            msg = b"bad sector"
            conn.sendall(self._chunk(DONE, P.REPLY_TYPE_ERROR_OFFSET, handle,
                                     P.S_ERROR.pack(5, len(msg)) + msg + P.S_U64.pack(off + 1)))
            return
        if b in ("endless_holes", "endless_errors"):
            msg = b"again"
            chunk = (self._chunk(0, P.REPLY_TYPE_OFFSET_HOLE, handle, P.S_HOLE.pack(off, ln)) if b == "endless_holes"
                     else self._chunk(0, P.REPLY_TYPE_ERROR, handle, P.S_ERROR.pack(5, len(msg)) + msg))
            while not self._stop.is_set():
                conn.sendall(chunk * 64)
            return
        half = ln // 2
        if b == "holes":
            out = self._chunk(0, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data[:half])
            out += self._chunk(DONE, P.REPLY_TYPE_OFFSET_HOLE, handle, P.S_HOLE.pack(off + half, ln - half))
            conn.sendall(out)
            return
        if half:  # "ok" / "out_of_order": second half first, then the first half
            out = self._chunk(0, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off + half) + data[half:])
            out += self._chunk(0, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data[:half])
            out += self._chunk(DONE, P.REPLY_TYPE_NONE, handle)
        else:
            out = self._chunk(DONE, P.REPLY_TYPE_OFFSET_DATA, handle, P.S_U64.pack(off) + data)
        conn.sendall(out)

    def _block_status(self, handle, off, ln):
        # Walk the configured extents from `off`.
        descs = []
        pos = 0
        for elen, flags in self.extents:
            s, e = max(pos, off), min(pos + elen, off + ln)
            if s < e:
                descs.append((e - s, flags))
            pos += elen
        if self.behaviour == "bs_partial":
            first_len, first_flags = descs[0]
            # one extent, at most 4 KiB, unless that would reach the end: then past it
            n = min(first_len, 4096)
            if n == ln:
                n += 4096
            descs = [(n, first_flags)]
        payload = struct.pack(">I", 7) + b"".join(P.S_EXTENT.pack(a, f) for a, f in descs)
        return self._chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, handle, payload)
