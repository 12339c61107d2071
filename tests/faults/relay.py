"""A loopback TCP relay to PostgreSQL that a test can cut, restore, or make deaf to NOTIFY.

Between one replica and the database, it injects the faults of shared/FAULT-TESTING.md
that a replica must survive: the database gone (``cut``), and lost notifications with
healthy queries (``drop_notifications``), which leaves the replica learning only from
its periodic re-read.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from tests.conftest import free_port

PG_ADDRESS = ("127.0.0.1", 5432)
# PostgreSQL's backend message carrying a NOTIFY: type byte 'A'.
NOTIFICATION_RESPONSE = b"A"


def close_quietly(sock: socket.socket, *, shutdown_only: bool) -> None:
    """Wake whatever reads ``sock`` (shutdown), then maybe close it; it may be gone."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if not shutdown_only:
        sock.close()


class TcpProxy:
    """Relays loopback connections to ``target``; ``cut`` kills every one of them."""

    def __init__(self, target: tuple[str, int] = PG_ADDRESS) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        # While set, NotificationResponse messages from the server are dropped. Only
        # meaningful on plaintext connections (see ``dsn``).
        self.drop_notifications = False
        self.notifications_dropped = 0

    def dsn(self, dsn: str) -> str:
        """``dsn`` through this relay, in plaintext so the relay can read the protocol."""
        through = dsn.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")
        separator = "&" if "?" in through else "?"
        return f"{through}{separator}sslmode=disable&gssencmode=disable"

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, self._server_messages()), daemon=True
            ).start()

    @staticmethod
    def _pump(
        source: socket.socket,
        sink: socket.socket,
        passed: Callable[[bytes], bytes] = lambda data: data,
    ) -> None:
        """What ``source`` sends, as far as ``passed`` lets it through, to ``sink``, until
        either end goes."""
        try:
            while data := source.recv(65536):
                if out := passed(data):
                    sink.sendall(out)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                close_quietly(s, shutdown_only=True)

    def _server_messages(self) -> Callable[[bytes], bytes]:
        """Server to client, message by message (every backend message is a type byte
        and a length, startup included with ``sslmode=disable``), without the NOTIFYs
        while ``drop_notifications`` is set."""
        buffer = b""

        def passed(data: bytes) -> bytes:
            nonlocal buffer
            buffer += data
            out = bytearray()
            while len(buffer) >= 5:
                (length,) = struct.unpack("!I", buffer[1:5])
                if len(buffer) < 1 + length:
                    break
                message, buffer = buffer[: 1 + length], buffer[1 + length :]
                if self.drop_notifications and message[:1] == NOTIFICATION_RESPONSE:
                    self.notifications_dropped += 1
                    continue
                out += message
            return bytes(out)

        return passed

    def cut(self) -> None:
        """The database is gone: no new connections, and every open one dies."""
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            close_quietly(self._listener, shutdown_only=False)
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            close_quietly(s, shutdown_only=False)
