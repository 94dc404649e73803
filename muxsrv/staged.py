"""A connection whose bytes pass through stages (PROXY header, TLS, an auth gate).

:class:`StagedConnection` is a :class:`~muxsrv.connection.Connection` whose
reads and flushes first run the connection's :class:`~muxsrv.stages.StagePath`;
the plain class never checks for stages, so a plaintext connection keeps its
hot path.  Once every stage has left the path (the auth gate, a PROXY header
parser) the connection becomes a plain :class:`Connection` (the classes share
one layout), so it pays nothing more per message.  A stage that raises,
reports a violation, or passes bytes on before it is ready ends its
connection alone.
"""

from __future__ import annotations

from .connection import Connection
from .loop import EVENT_READ
from .transport import CLOSED, IN_CALLBACK, MADE, OPEN, QUIET, RECV_SIZE

__all__ = ["StagedConnection"]


class StagedConnection(Connection):
    """A connection with stages: bytes pass through them both ways."""

    takes_stages = True

    __slots__ = ()

    def handle_event(self, mask: int) -> None:
        """Received bytes go through the stages first (a plain connection never looks)."""
        if self._stages is None or not mask & EVENT_READ or self._state != OPEN:
            super().handle_event(mask)
            return
        self.last_active = self._loop.now
        try:
            data = self._sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc, "recv")
            return
        if not data:
            self._read_eof()
            return
        data = self._stages_in(data)
        if data:
            self._decode(data)
        self._flush()

    def _flush(self) -> None:
        path = self._stages
        if path is not None and not self._flags & IN_CALLBACK and self._state != CLOSED:
            try:
                self._out = path.send(self._out)
            except Exception as exc:
                self._fatal(exc, "stage send")
                return
        super()._flush()

    def _stages_in(self, data: bytes) -> bytes:
        """Received bytes through every stage; what reaches the codec."""
        path = self._stages
        assert path is not None
        try:
            data = path.receive(data)
        except Exception as exc:
            self._fatal(exc, "stage receive")
            return b""
        if path.peer is not None and path.peer is not self._peer:
            self._peer = path.peer  # a PROXY header's: conn.peer from now on
        if path.health_check:
            self._flags |= QUIET
        if path.error is not None:
            self._violation(path.error, frame=path.tell_peer)
            return b""
        if path.parting:
            parting, path.parting = path.parting, []
            self._out = parting + self._out if self._out else parting
        if not path.stages:
            self._stages = None
            self.__class__ = Connection  # type: ignore[assignment]
        if not self._flags & MADE:
            if not path.ready:
                if data:
                    self._fatal(RuntimeError("a stage passed bytes on before it was ready"),
                                "stage receive")
                return b""
            self._connection_made()
        return data if self._state == OPEN else b""
