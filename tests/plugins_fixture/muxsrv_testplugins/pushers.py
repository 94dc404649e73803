"""A handler that pushes output from a timer, with no input: what the output limits bound."""

from __future__ import annotations

from typing import Any

from muxsrv import Conn, Handler

#: Each push, and the pace: 64 KiB every 10 ms (6.4 MB/s), for 60 s at most.
CHUNK = b"p" * 65536
INTERVAL = 0.01
MAX_PUSHES = 6000


class Pusher(Handler):
    """From connection_made on, pushes CHUNK every INTERVAL until the connection is gone.

    Messages it receives are echoed (so a fresh client can check the server answers).
    """

    def __init__(self) -> None:
        self._timer: Any = None
        self._pushes = 0

    def connection_made(self, conn: Conn) -> None:
        self._timer = conn.loop.call_later(INTERVAL, self._push, conn)

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)

    def _push(self, conn: Conn) -> None:
        if conn.closing or self._pushes >= MAX_PUSHES:
            return
        self._pushes += 1
        conn.send(CHUNK)
        self._timer = conn.loop.call_later(INTERVAL, self._push, conn)

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
