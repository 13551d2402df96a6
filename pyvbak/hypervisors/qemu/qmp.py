"""A small QMP (QEMU Machine Protocol) client over a unix socket.

QMP is line-delimited JSON: the server greets with ``{"QMP": {...}}``, the client must
send ``qmp_capabilities`` before anything else, then each ``{"execute": ...}`` gets one
``{"return": ...}`` or ``{"error": {"class", "desc"}}`` reply.  Asynchronous events
(``{"event": ...}``) can arrive at any time, also in between a command and its reply;
they are kept aside in order (``events``, the last 10 000), apart from the replies.

Every socket operation has a timeout.  A timeout leaves the stream in an unknown state
(a late reply could be mistaken for the next one), so the client is then marked broken
and refuses further commands.

A QMP monitor socket serves ONE client at a time; a second client is accepted by the
kernel but never greeted.  That is why a missing greeting is reported as "busy".
"""

from __future__ import annotations

import collections
import json
import os
import socket
import stat
import threading
import time
import weakref
from typing import Any

from pyvbak.errors import SourceError

DEFAULT_TIMEOUT = 30.0
#: longest QMP message accepted (query-named-block-nodes of a VM with many disks and
#: bitmaps is some hundreds of KiB; this only stops a peer that never ends a line)
MAX_MESSAGE_BYTES = 64 << 20


class QmpError(SourceError):
    """QEMU answered a command with an error; ``error_class``/``desc`` are QEMU's."""

    def __init__(self, command: str, error_class: str, desc: str, socket_path: str):
        super().__init__(f"QEMU refused '{command}' on {socket_path}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


#: connected clients: a process forked from this one closes its copies of their sockets,
#: or QEMU would go on seeing a client on the monitor after this process died - and serve
#: no other (the watchdog's cleanup waited for a forked worker to exit)
_connected: "weakref.WeakSet[QmpClient]" = weakref.WeakSet()


def _close_in_child() -> None:
    for client in list(_connected):
        client._broken = "the connection belongs to the process this one was forked from"
        client.close()


os.register_at_fork(after_in_child=_close_in_child)


class QmpClient:
    """Synchronous QMP client.  Thread-safe (one command at a time)."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.events: collections.deque[dict] = collections.deque(maxlen=10000)
        self.greeting: dict = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self._lock = threading.RLock()
        self._broken: str | None = None

    # -- connection --------------------------------------------------------------

    def connect(self, sock: socket.socket | None = None) -> "QmpClient":
        """Connect, read the greeting, negotiate capabilities.  ``sock``: a socket the caller
        connected to the monitor already (the watchdog queues at the monitor first)."""
        path = self.socket_path
        if sock is not None:
            sock.settimeout(self.timeout)
            return self._start(sock)
        if not os.path.exists(path):
            raise SourceError(
                f"QMP socket {path} does not exist: is the VM running, and was it started with "
                f"a QMP monitor for pyvbak (e.g. -qmp unix:{path},server=on,wait=off)?"
            )
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISSOCK(mode):
            # connect() says "refused" for a regular file too: that is no stopped VM
            kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "not a socket"
            raise SourceError(f"{path} is {kind}, not a socket: give the VM's QMP monitor socket "
                              f"(e.g. the path of -qmp unix:PATH,server=on,wait=off)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError) as e:
            sock.close()
            raise SourceError(
                f"QMP socket {path} refuses connections ({e.strerror}): the VM is probably not "
                f"running any more (stale socket file); start the VM or fix the qemu:// URI"
            ) from None
        except socket.timeout:
            sock.close()
            raise SourceError(f"connecting to QMP socket {path} timed out after {self.timeout}s") from None
        except OSError as e:
            sock.close()
            raise SourceError(f"cannot connect to QMP socket {path}: {e.strerror or e}") from None
        return self._start(sock)

    def _start(self, sock: socket.socket) -> "QmpClient":
        path = self.socket_path
        self._sock = sock
        _connected.add(self)
        try:
            greeting = self._read_message(
                what="the QMP greeting",
                hint=(
                    "another client is probably connected to this monitor (QEMU serves one client "
                    "per QMP socket); give pyvbak its own monitor, e.g. an extra "
                    "-qmp unix:PATH,server=on,wait=off"
                ),
            )
            if "QMP" not in greeting:
                raise SourceError(f"{path} is not a QMP socket (got {str(greeting)[:80]!r})")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "QmpClient":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def version_tuple(self) -> tuple[int, int]:
        """(major, minor) of the QEMU at the other end; (0, 0) when it did not say."""
        v = self.greeting.get("version", {}).get("qemu", {})
        try:
            return int(v.get("major", 0)), int(v.get("minor", 0))
        except (TypeError, ValueError):
            return 0, 0

    @property
    def qemu_version(self) -> str:
        v = self.greeting.get("version", {}).get("qemu", {})
        pkg = self.greeting.get("version", {}).get("package", "")
        s = f"{v.get('major', '?')}.{v.get('minor', '?')}.{v.get('micro', '?')}"
        return f"{s} {pkg}".strip()

    # -- I/O ---------------------------------------------------------------------

    def _fail(self, msg: str) -> SourceError:
        self._broken = msg
        self.close()
        return SourceError(msg)

    def _read_message(self, *, what: str = "a QMP reply", hint: str = "", deadline: float | None = None) -> dict:
        """Read one JSON message; raises SourceError on timeout/EOF."""
        if self._sock is None:
            raise SourceError(f"QMP connection to {self.socket_path} is closed" + (f" ({self._broken})" if self._broken else ""))
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"timed out after {self.timeout}s waiting for {what} on {self.socket_path}" + (f": {hint}" if hint else ""))
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise self._fail(f"QMP connection to {self.socket_path} failed while waiting for {what}: {e.strerror or e}")
            if not chunk:
                raise self._fail(f"QEMU closed the QMP connection {self.socket_path} while pyvbak waited for {what} (did the VM stop?)")
            self._buf += chunk
            # Every QMP message is a JSON object on one line: anything else is not QEMU's
            # monitor, and is refused at once instead of at the timeout (an NBD server
            # greets with NBDMAGIC) or after buffering a peer's endless stream.
            head = self._buf.lstrip()
            if head and not head.startswith(b"{"):
                raise self._fail(self._not_qmp(head))
            if len(self._buf) > MAX_MESSAGE_BYTES and b"\n" not in self._buf:
                raise self._fail(f"{self.socket_path} sent over {MAX_MESSAGE_BYTES >> 20} MiB without ending a "
                                 f"message: not a QMP socket, or a QEMU that misbehaves")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise self._fail(f"garbled QMP message on {self.socket_path}: {line[:80]!r}")
        if not isinstance(msg, dict):
            raise self._fail(self._not_qmp(line))
        return msg

    def _not_qmp(self, head: bytes) -> str:
        if head.startswith(b"NBDMAGIC"):
            return (f"{self.socket_path} is an NBD server's socket, not a QMP monitor: give the VM's QMP "
                    f"socket in qemu:///PATH?node=NODE (or read the export with nbd+unix:///EXPORT?socket=PATH)")
        return f"{self.socket_path} is not a QMP socket (got {head[:80]!r}): give the VM's QMP monitor socket"

    def _send(self, obj: dict) -> None:
        if self._sock is None:
            raise SourceError(f"QMP connection to {self.socket_path} is closed" + (f" ({self._broken})" if self._broken else ""))
        data = json.dumps(obj).encode() + b"\n"
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise self._fail(f"timed out after {self.timeout}s sending to QMP socket {self.socket_path}")
        except OSError as e:
            raise self._fail(f"QMP connection to {self.socket_path} failed: {e.strerror or e}")

    # -- commands and events -----------------------------------------------------

    def execute(self, command: str, /, **arguments: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises ``QmpError`` (a SourceError) carrying QEMU's error class and description.
        """
        with self._lock:
            self._next_id += 1
            msg_id = f"pyvbak-{self._next_id}"
            msg: dict = {"execute": command, "id": msg_id}
            if arguments:
                msg["arguments"] = arguments
            self._send(msg)
            deadline = time.monotonic() + self.timeout
            while True:
                reply = self._read_message(what=f"the reply to '{command}'", deadline=deadline)
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if reply.get("id") != msg_id:
                    continue  # a reply to a command of an earlier, timed-out exchange
                if "error" in reply:
                    err = reply["error"]
                    raise QmpError(command, err.get("class", "?"), err.get("desc", "?"), self.socket_path)
                return reply.get("return")

    def try_execute(self, command: str, /, **arguments: Any) -> tuple[bool, Any]:
        """Like ``execute`` but returns ``(False, QmpError)`` instead of raising on a
        QEMU-level error (connection errors still raise)."""
        try:
            return True, self.execute(command, **arguments)
        except QmpError as e:
            return False, e
