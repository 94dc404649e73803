"""A connection whose bytes pass through stages (PROXY header, TLS, an auth gate).

:class:`StagedConnection` is a :class:`~muxsrv.connection.Connection` whose
reads and flushes first run the connection's :class:`~muxsrv.stages.StagePath`;
the plain class never checks for stages, so a plaintext connection keeps its
hot path.  Once every stage has left the path (the auth gate, a PROXY header
parser) the connection becomes a plain :class:`Connection` (the classes share
one layout), so it pays nothing more per message.  A stage that raises,
reports a violation, or passes bytes on before it is ready ends its
connection alone.

A stage that stays (TLS) may end the peer's stream inside it (close_notify,
``eof``): that is the peer's EOF, a half-close, as a FIN is on a plain
connection.  Closing then goes through ``close`` (not straight to the
socket's close) so that each stage's last bytes (``finish``: our own
close_notify) leave before the write side shuts.
"""

from __future__ import annotations

from .connection import BODY_RECV_MAX, Connection
from .loop import EVENT_READ
from .transport import (
    CLOSED,
    EOF,
    EOF_TOLD,
    IN_CALLBACK,
    MADE,
    OPEN,
    PAUSED,
    QUIET,
    RECV_SIZE,
)

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
        size = RECV_SIZE
        want = self._decoder.want
        if want:  # inside a large message: the input budget's say first
            budget = getattr(self._owner, "input_budget", None)
            if budget is not None and not budget.admits(self, self._decoder.buffered):
                return
            # Up to the rest of its body at once, as a plain connection reads: the
            # stages' fixed costs are per read (a TLS record's overhead makes the
            # plaintext a little shorter, never longer, than the bytes read).
            size = max(RECV_SIZE, min(want, BODY_RECV_MAX))
        try:
            data = self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc, "recv")
            return
        if self._counted:  # (not over TCP: the kernel counts those)
            self._bin += len(data)
        if not data:
            self._stages.receive_eof()
            self._read_eof()
            return
        data = self._stages_in(data)
        if data:
            self._decode(data)
        path = self._stages
        if path is not None and path.eof and not self._flags & EOF and self._state == OPEN:
            self._stream_ended()
        self._flush()

    def _stream_ended(self) -> None:
        """A stage saw the peer's end of stream (close_notify): the peer's EOF."""
        if self._decoder.more or self._held or self._flags & PAUSED:
            # Messages still to hand over first: _step (or resume_reading) tells EOF after.
            self._flags |= EOF
            self._update_mask()
        else:
            self._read_eof()

    def _flush(self) -> None:
        path = self._stages
        if path is not None and not self._flags & IN_CALLBACK and self._state != CLOSED:
            try:
                out = path.send(self._out)
                if self._state != OPEN:  # closing: the stages' last words go last
                    last = path.finish()
                    if last:
                        out = out + last if out else last
                self._out = out
            except Exception as exc:
                self._fatal(exc, "stage send")
                return
        super()._flush()

    def _finish_if_owed_nothing(self) -> None:
        """After EOF with nothing owed: close through the stages (TLS says close_notify)."""
        if self._stages is None:
            super()._finish_if_owed_nothing()
            return
        told = self._flags & (EOF | EOF_TOLD) == EOF | EOF_TOLD
        if told and self._state == OPEN and self.owes_nothing():
            self.close()

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
