"""Outbound connections: the loop connects to another server, a handler speaks for us.

``conn.loop.connect(host, port, handler)`` returns at once an
:class:`Outbound`, a :class:`~muxsrv.connection.Connection` whose socket is
still connecting.  Everything after that is the same machinery as an accepted
connection (the codec, the output queue, the water marks, pausing, the
lingering close); only the start and the end differ:

* the connect is non-blocking: ``connect_ex`` (``EINPROGRESS``), then the
  socket's first writability, then ``SO_ERROR``.  ``connection_made`` runs once
  it succeeded; ``send`` before that only queues (with no water marks: the
  handler bounds it), and the queue leaves once connected.  ``host`` must be
  a numeric address or ``localhost`` (a name would need ``getaddrinfo``,
  which blocks the loop): resolve names once, at start-up, in
  ``Handler.configure``;
* ``connection_lost(conn, exc)`` runs exactly once, from the loop, whether or
  not ``connection_made`` ran: a refused connect brings ``ConnectionRefusedError``,
  the ``timeout`` a ``TimeoutError``, a reset ``ConnectionResetError``, the
  server's EOF in the middle of a reply :class:`~muxsrv.errors.ConnectionClosed`;
* with ``length`` framing, an error frame from the server is an error, not a
  message: ``error_received(conn, ServerError)`` if the handler defines it (the
  connection goes on), else the connection ends with
  ``connection_lost(conn, ServerError(text))``.

Outbound connections are not the server's: they count toward no
``--max-conns``, no idle timeout closes them, and the drain does not wait for
them.  Each loop's are kept by its :class:`Connector`; when the server stops,
they get the handlers' clean-up time to close, then are aborted.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .codec import ErrorFrame
from .connection import Connection
from .errors import ConnectionClosed, ServerError
from .framing import LengthDecoder, make_decoder
from .handler import Handler
from .loop import EVENT_WRITE
from .stats import Histogram
from .transport import OPEN

if TYPE_CHECKING:
    from .codec import Decoder
    from .handler import Conn
    from .loop import EventLoop, Timer

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "Connector", "Outbound", "connect", "connector_of"]

log = logging.getLogger("muxsrv.outbound")

#: Seconds a connect may take unless told otherwise (the kernel's own SYN
#: retries would take about two minutes).
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: The largest reply taken from the server unless told otherwise (as --max-frame).
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
_IN_PROGRESS: Final = frozenset({0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})


class Connector:
    """The owner of one loop's outbound connections (``connection.Owner``)."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.conns: dict[Outbound, None] = {}  # an ordered set
        self.latency = Histogram()  # (a connection's owner keeps one; nobody reads this)

    def connection_closed(self, conn: Connection) -> None:
        self.conns.pop(conn, None)  # type: ignore[call-overload]

    def abort_all(self) -> None:
        for conn in list(self.conns):
            conn.abort()


def connector_of(loop: EventLoop) -> Connector:
    """The loop's connector, made on first use."""
    found = loop._connector
    if found is None:
        found = loop._connector = Connector(loop)
    assert isinstance(found, Connector)
    return found


class _ErrorFrames(Handler):
    """Between the connection and its handler: error frames go to ``error_received``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.handles_errors = type(handler).error_received is not Handler.error_received

    def connection_made(self, conn: Conn) -> None:
        self.handler.connection_made(conn)

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if type(payload) is not ErrorFrame:
            self.handler.message_received(conn, payload)
            return
        assert isinstance(payload, ErrorFrame) and isinstance(conn, Outbound)
        error = ServerError(payload.text)
        if self.handles_errors:
            self.handler.error_received(conn, error)
        else:
            log.info("%s: error frame from the server: %s", conn._peer_text(), error.message,
                     extra=conn._extra())
            conn._close(error)

    def eof_received(self, conn: Conn) -> None:
        self.handler.eof_received(conn)

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self.handler.connection_lost(conn, exc)

    def pause_writing(self, conn: Conn) -> None:
        self.handler.pause_writing(conn)

    def resume_writing(self, conn: Conn) -> None:
        self.handler.resume_writing(conn)


class Outbound(Connection):
    """A connection this process opened; handlers see it as a :class:`~muxsrv.handler.Conn`."""

    __slots__ = ("_connect_timer", "_connecting")

    def __init__(
        self, owner: Connector, sock: _socket.socket, peer: Any, decoder: Decoder,
        handler: Handler,
    ) -> None:
        wrapped = _ErrorFrames(handler) if decoder.framing == "length" else handler
        super().__init__(owner, sock, peer, decoder, None, wrapped)
        self._connecting = True
        self._connect_timer: Timer | None = None

    def _begin(self, address: tuple[Any, ...], timeout: float | None) -> None:
        """Start the connect; every outcome is reported later, from the loop."""
        err = self._sock.connect_ex(address)
        if err not in _IN_PROGRESS:
            self._loop.call_soon(self._failed, OSError(err, os.strerror(err)))
            return
        self._loop.register(self._sock, EVENT_WRITE, self)
        self._mask = EVENT_WRITE
        if timeout is not None:
            self._connect_timer = self._loop.call_later(timeout, self._timed_out, timeout)

    # -- the connect ------------------------------------------------------

    def handle_event(self, mask: int) -> None:
        if not self._connecting:
            super().handle_event(mask)
            return
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(OSError(err, os.strerror(err)))
            return
        self._connecting = False
        self._cancel_connect_timer()
        self.last_active = self._loop.now
        if self._state == OPEN:
            self._connection_made()  # (flushes what was sent meanwhile)
        else:
            self._flush()  # closed while connecting: deliver the queue, then close

    def _timed_out(self, timeout: float) -> None:
        if self._connecting:
            self._failed(TimeoutError(
                errno.ETIMEDOUT, f"connect to {self._peer_text()} timed out after {timeout:g} s"))

    def _failed(self, exc: OSError) -> None:
        log.info("connect to %s failed: %s", self._peer_text(), exc.strerror or exc,
                 extra=self._extra())
        self._close(exc)

    def _cancel_connect_timer(self) -> None:
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None

    # -- what differs from an accepted connection ------------------------------

    def _flush(self) -> None:
        if not self._connecting:
            super()._flush()

    def _update_mask(self) -> None:
        if not self._connecting:
            super()._update_mask()

    def _queue_error(self, text: str) -> bool:
        # Error frames go from server to client only: toward a server there is no
        # error channel, so a failing handler closes this connection instead.
        return False

    @property
    def peer(self) -> Any:
        return self._peer  # where we connect to, known from the start

    def _input_done(self) -> None:
        decoder = self._decoder
        if decoder.error is None and decoder.buffered:
            n = decoder.buffered
            log.info("%s closed in the middle of a reply", self._peer_text(), extra=self._extra())
            self._close(ConnectionClosed(
                f"{self._peer_text()} closed the connection in the middle of a reply "
                f"({n} bytes of it received)"))
            return
        super()._input_done()

    def _closed(self, exc: BaseException | None) -> None:
        # Told even if never connected: the handler hears how the connect failed.
        self._cancel_connect_timer()
        self._held = None
        self._owner.connection_closed(self)
        self._loop.call_soon(self._connection_lost, exc)


def connect(
    loop: EventLoop, host: str, port: int, handler: Handler, *, framing: str = "length",
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT, max_frame: int = DEFAULT_MAX_FRAME,
    sock: Any = None,
) -> Outbound:
    """``EventLoop.connect`` (see the module docstring); ``sock``: a socket to use (tests).

    Raises ValueError for a host that is not a numeric address or ``localhost``,
    a port outside 1-65535 and an unknown framing; OSError if no socket can be
    made.
    """
    if not isinstance(handler, Handler):
        raise TypeError(f"connect() takes a Handler instance, not {type(handler).__name__}")
    decoder = (LengthDecoder(max_frame, accept_errors=True) if framing == "length"
               else make_decoder(framing, max_frame))
    family, address = numeric_address(host, port)
    if sock is None:
        sock = _socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
    owner = connector_of(loop)
    conn = Outbound(owner, sock, address[:2], decoder, handler)
    owner.conns[conn] = None
    try:
        conn._begin(address, timeout)
    except BaseException:
        owner.conns.pop(conn, None)
        sock.close()
        raise
    return conn


def numeric_address(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """``(family, sockaddr)`` for a numeric host (or ``localhost``), without a DNS lookup."""
    if not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"cannot connect to port {port!r}: a port is from 1 to 65535")
    name = "127.0.0.1" if host == "localhost" else host.strip("[]")
    try:
        infos = socket.getaddrinfo(
            name, port, type=socket.SOCK_STREAM,
            flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
        )
    except (socket.gaierror, UnicodeError):
        raise ValueError(
            f"cannot connect to {format_address((host, port))}: not a numeric address "
            "(resolve names at start-up, in Handler.configure: a lookup would block the loop)"
        ) from None
    family, _type, _proto, _name, address = infos[0]
    return int(family), tuple(address)

