"""The handler interface: what a plugin sees of the server.

A handler knows only messages and a small ``conn`` object; it never sees a
socket, a selector or a codec.  There are two forms.

The function form, for the common case of one reply per message::

    def reverse(payload: bytes) -> bytes | None:
        return payload[::-1]          # None: send no reply

The class form, for everything else.  The server makes one instance per
connection (like asyncio's protocol factories) and calls, in this order::

    connection_made(conn)
    message_received(conn, payload)   # zero or more times
    eof_received(conn)                # at most once: the peer shut down its
                                      # write side; replies are still owed
    connection_lost(conn, exc)        # exactly once; exc is None on a clean close

and, at any time between the first and the last, ``pause_writing(conn)`` /
``resume_writing(conn)`` (in turn, starting with pause) when the peer is not
reading: the output waiting for it rose above the high-water mark (1 MiB), or
fell back below the low-water mark (256 KiB).

The guarantees:

* every message arrives once, in order, and nothing after ``conn.close()``,
  ``conn.abort()`` or a framing error; messages received while reading is
  paused are handed over after ``resume_reading``, before anything later;
* every reply sent with ``conn.send`` (from any callback: these, a timer, a
  reader) is delivered in order, unless the connection was aborted or reset;
  ``send`` never closes the connection, so several sends in a row all count;
* after ``eof_received`` the connection closes once nothing is owed: no
  output pending and no ``work_started`` without its ``work_done``;
* ``connection_lost`` runs exactly once, from the loop, never inside another
  callback (``conn.abort()`` inside ``message_received`` returns first);
  sends after it are ignored;
* with ``--auth-token-file``, ``connection_made`` runs only after the client
  authenticated (``AUTH`` never reaches the handler); an instance made for a
  client that never does is told nothing at all;
* ``pause_writing`` may be called from inside ``conn.send`` (outside other
  callbacks: sends inside them only queue, and count when they return); a
  handler that produces output on its own (a timer, a child process) should
  stop until ``resume_writing``, and may send from inside it.  Reading pauses
  meanwhile too; messages already received are still handed over (at most
  what one read brought, or one large message), so bound your own queue with
  ``pause_reading``.

``conn`` (a :class:`Conn`) can send replies at any time (now or later),
close, pause reading, mark work in progress (so idle timeouts and the
shutdown drain wait for it), and reach the loop to register file descriptors
and timers, and to open connections of its own: ``conn.loop.connect(host,
port, handler)`` (``muxsrv.outbound``).  On such an outbound connection the
same handler interface speaks for us, with two differences: a failed connect
(or one the handler closed before it completed) brings
``connection_lost(conn, exc)`` without ``connection_made`` before it,
and an error frame from the server goes to ``error_received``.  A class may
also declare its own command-line options with ``add_arguments`` and build
its per-connection factory in ``configure``.

Over UDP (``--udp``) the same handlers serve datagrams: one datagram is one
message, a class handler gets one instance per peer address, and replies are
capped at 3 times the datagram until ``conn.peer_validated()``; see
``muxsrv.udp_peers``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from .codec import Buffer
    from .errors import ServerError
    from .loop import EventLoop

__all__ = ["ConfigError", "Conn", "Handler", "HandlerFactory", "HandlerFunction", "PeerAddress"]

#: A TCP peer's address as ``getpeername()`` gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
PeerAddress = tuple[str, int] | tuple[str, int, int, int]


class ConfigError(Exception):
    """A handler refuses its configuration; the CLI prints the message and exits 2."""


class Conn(Protocol):
    """The connection as a handler sees it."""

    @property
    def peer(self) -> PeerAddress | None:
        """The peer's address, as ``socket.getpeername()`` gives it (None if unknown).

        With ``--proxy-protocol``, the client's address from the PROXY header
        (in the same shape), not the balancer's.
        """
        ...

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        """With ``--tls-client-ca``: the client's verified certificate, as
        ``ssl.SSLSocket.getpeercert()`` gives it (``subject``, ``issuer``, ...); else None."""
        ...

    @property
    def loop(self) -> EventLoop:
        """The server's event loop: ``call_later``, ``add_reader``, ``time()`` ..."""
        ...

    @property
    def framing(self) -> str:
        """``"length"``, ``"line"`` or ``"raw"``."""
        ...

    @property
    def closing(self) -> bool:
        """True once the connection is closing or closed: sends are dropped."""
        ...

    def send(self, payload: Buffer, *more: Buffer) -> None:
        """Queue one reply message (framed by the connection's codec).

        Any bytes-like object is taken by its size in bytes (a ``memoryview`` of
        wider items included).  ``TypeError`` for anything else, ``ValueError``
        for a reply too large for the framing (2^31-1 bytes with ``length``).
        With ``more``, the message is ``payload`` followed by each of ``more``:
        with ``length`` framing the parts are sent as they are, never joined, so
        a large reply assembled from pieces costs no copy.  Do not change the
        buffers after the call.
        """
        ...

    def send_error(self, text: str) -> None:
        """Send an error frame (``length`` framing); with ``line``/``raw`` only logged."""
        ...

    def close(self) -> None:
        """Deliver everything queued, then close (a lingering close, never a reset)."""
        ...

    def abort(self) -> None:
        """Close at once, dropping queued output."""
        ...

    def pause_reading(self) -> None:
        """Stop handing this connection's messages to the handler until resumed."""
        ...

    def resume_reading(self) -> None:
        """Hand messages over again, those held during the pause first."""
        ...

    def work_started(self) -> None:
        """A reply is being worked on: no idle timeout, and shutdown waits for it."""
        ...

    def work_done(self) -> None:
        """Undo one ``work_started``."""
        ...

    def peer_validated(self) -> None:
        """The peer proved it owns its address (``--udp``: it echoed back a token you sent
        it): lift the 3x amplification cap for it.  Over TCP nothing to do (a no-op)."""
        ...


class Handler:
    """Base class for the class form; every method has a do-nothing default.

    Subclass it and override what you need.  ``configure`` returns the factory
    the server calls once per connection: the class itself by default.
    ``udp_unsafe``: why this handler must not serve ``--udp`` (a forged source
    address would make it act for someone else); the server refuses to start.
    A function handler may carry the same attribute.
    """

    udp_unsafe: ClassVar[str | None] = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare this handler's own command-line options (``--NAME-...``)."""

    @classmethod
    def configure(cls, options: argparse.Namespace) -> HandlerFactory:
        """Check the parsed options (raise :class:`ConfigError`) and return a factory."""
        return cls

    def connection_made(self, conn: Conn) -> None:
        """Called once, first."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        """Called for every complete message, in order."""

    def eof_received(self, conn: Conn) -> None:
        """The peer will send nothing more; queued replies are still delivered."""

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        """Called once, last, from the loop: release everything this connection owned."""

    def error_received(self, conn: Conn, error: ServerError) -> None:
        """An outbound connection (``length`` framing) got an error frame, in order.

        Only outbound connections get them.  Not overridden, the connection ends
        at once with ``connection_lost(conn, error)``; overridden, it goes on.
        """

    def pause_writing(self, conn: Conn) -> None:
        """The peer is not reading: stop producing output until ``resume_writing``."""

    def resume_writing(self, conn: Conn) -> None:
        """The output backlog fell below the low-water mark: produce again."""


#: The function form of a handler.
HandlerFunction = Callable[[bytes], "bytes | bytearray | memoryview | None"]
#: Makes the handler for one new connection.
HandlerFactory = Callable[[], Handler]
