"""The socket side of a connection: writing, the event mask, closing.

A :class:`Transport` owns one non-blocking socket and knows nothing of
messages (asyncio's ``_SelectorTransport`` plays the same part);
:class:`~muxsrv.connection.Connection` adds the codec and the handler on top.

Writing, the asyncio way: try ``send`` at once; keep exactly what it did not
take in an :class:`~muxsrv.output.OutputQueue` (a running byte count, linear
cost); ask for ``EVENT_WRITE`` only while output is pending.  Above
``HIGH_WATER`` pending bytes the connection stops reading and its handler
hears ``pause_writing``; below ``LOW_WATER``, ``resume_writing``.  Each time
the queue grows, ``_output_grew`` lets the read side check the output limit
(``--max-output``): never when the kernel took everything.

State decides the event mask: ``_update_mask`` computes it from state (the
read side says whether it wants input, ``_wants_input``) and asks the loop to
change the registration only when it changes.

The wire bytes in and out (``byte_counts``) cost nothing per read or send
over TCP: the kernel keeps them (``TCP_INFO``'s ``tcpi_bytes_received`` and
``tcpi_bytes_acked``, less what waits in the receive queue, plus what waits in
the send queue), asked only when someone wants them and once at the close.
Other sockets (Unix, the tests' fakes) are counted as they are read and sent.

Closing on purpose never loses queued output: flush, ``shutdown(SHUT_WR)``,
then read and discard until the peer's EOF or a short timeout (the
"lingering close").  Every socket error ends the connection through
``_fatal``: one path, one log line.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import fcntl
import logging
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .loop import EVENT_READ, EVENT_WRITE, EventLoop, Timer
from .output import JOIN_MAX, MAX_IOV, OutputQueue

if TYPE_CHECKING:
    from .codec import Buffer

__all__ = ["HIGH_WATER", "LINGER_TIMEOUT", "LOW_WATER", "Transport"]

log = logging.getLogger("muxsrv.conn")

#: The most one recv asks for outside a large frame's body (a fresh bytes object
#: each time, shrunk to what arrived; below glibc's default mmap threshold).
RECV_SIZE: Final = 64 * 1024
#: Above this much pending output: stop reading, tell the handler pause_writing ...
HIGH_WATER: Final = 1024 * 1024
#: ... and below this, read again and resume_writing (no flapping on every send).
LOW_WATER: Final = 256 * 1024
#: How long a closing connection may take to flush its queued output.
FLUSH_TIMEOUT: Final = 30.0
#: How long a lingering close waits for the peer's EOF before closing anyway.
LINGER_TIMEOUT: Final = 2.0

# States.  OPEN: messages go to the handler.  CLOSING: flushing queued output,
# input discarded.  LINGER: write side shut, discarding input until EOF.
OPEN: Final = 0
CLOSING: Final = 1
LINGER: Final = 2
CLOSED: Final = 3

# Flags (one int: an idle connection's size counts).  Inside a handler callback:
# flushing waits for its end.  Pending output above the high-water mark.
IN_CALLBACK: Final = 1
WRITING_PAUSED: Final = 2
# The peer shut down its write side.
EOF: Final = 4
# The connection's own: connection_made called; eof_received called; a step queued;
# reading paused by the handler.
MADE: Final = 8
EOF_TOLD: Final = 16
STEP_PENDING: Final = 32
PAUSED: Final = 64
# A balancer's health check (a PROXY LOCAL header): its endings are logged at debug level.
QUIET: Final = 128
# Reading stopped by the server's input budget (--max-buffered), inside a large message.
STALLED: Final = 256

_QUIET_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ESHUTDOWN}
)


class Transport:
    """A socket with an output queue and a lingering close; subclasses read."""

    __slots__ = (
        "_asked",
        "_backlog",
        "_bin",
        "_bout",
        "_counted",
        "_flags",
        "_loop",
        "_mask",
        "_out",
        "_peer",
        "_sock",
        "_state",
        "_timer",
        "_why",
        "last_active",
    )

    def __init__(self, loop: EventLoop, sock: _socket.socket, peer: Any) -> None:
        self._loop = loop
        self._sock = sock
        self._peer = peer  # None: asked of the socket when first needed (saves memory)
        self._out: list[Buffer] | None = None  # output queued since the last flush
        self._backlog: OutputQueue | None = None  # what the kernel has not taken yet
        self._mask = 0
        self._state = OPEN
        self._flags = 0  # IN_CALLBACK, WRITING_PAUSED, EOF, and the read side's own
        self._timer: Timer | None = None
        self.last_active = loop.now
        # Wire bytes read and taken by the kernel: the kernel's own counts over TCP
        # (``_counted`` False), else counted here; kept from the kernel at the close.
        self._bin = self._bout = 0
        # When the kernel was last asked (loop time): without an event since (every
        # read, and every send but a handler's from a timer, which resets it), the
        # counts it gave still hold: a scrape asks the kernel of busy connections only.
        self._asked = -1.0
        self._counted = not (_TCP_INFO and isinstance(sock, _socket.socket)
                             and sock.family in _IP_FAMILIES)
        self._why: str | None = None  # why it closed, once known (muxsrv.stats)

    # -- what the read side fills in ------------------------------------------

    def handle_event(self, mask: int) -> None:
        """The loop's entry point: the socket is readable or writable."""
        raise NotImplementedError

    def _wants_input(self) -> bool:
        """Open and reading: True unless something holds input back."""
        return not self._flags & (EOF | WRITING_PAUSED)

    def _tell_writing(self, paused: bool) -> None:
        """Pending output crossed a water mark (pause_writing / resume_writing)."""

    def _maybe_finish(self) -> None:
        """All output sent: the read side may decide the connection is done."""

    def _closed(self, exc: BaseException | None) -> None:
        """The socket is closed (once): tell whoever needs to know."""

    def _output_grew(self) -> None:
        """Output the kernel did not take was queued (only then: not on the common path)."""

    def _drained(self) -> None:
        """The output queue emptied (only after the kernel once took less than all)."""

    # -- the public side ------------------------------------------------------

    def byte_counts(self) -> tuple[int, int]:
        """Wire bytes read and taken by the kernel so far (framing, TLS records included)."""
        if self._counted or self._state == CLOSED or self.last_active < self._asked:
            return self._bin, self._bout  # (over TCP: unchanged since asked, no event since)
        self._asked = self._loop.now
        self._bin, self._bout = _kernel_bytes(self._sock, self._bin, self._bout,
                                              self._state == LINGER, bool(self._flags & EOF))
        return self._bin, self._bout

    @property
    def peer(self) -> Any:
        """The peer's address (None once the socket can no longer tell)."""
        if self._peer is None and self._state != CLOSED:
            with contextlib.suppress(OSError):
                self._peer = self._sock.getpeername()
        return self._peer

    @property
    def loop(self) -> EventLoop:
        return self._loop

    @property
    def closing(self) -> bool:
        return self._state != OPEN

    @property
    def pending(self) -> int:
        """Bytes of output the kernel has not taken yet."""
        backlog = self._backlog
        return backlog.nbytes if backlog is not None else 0

    def close(self) -> None:
        """Deliver what is queued, then a lingering close."""
        if self._state != OPEN:
            return
        self._state = CLOSING
        self._timer = self._loop.call_later(FLUSH_TIMEOUT, self._flush_timed_out)
        self._flush()

    def abort(self) -> None:
        self._close(None)

    # -- output -----------------------------------------------------------

    def _flush(self) -> None:
        """Send what is queued, keep what the kernel did not take, fix the mask."""
        if self._flags & IN_CALLBACK or self._state == CLOSED:
            return
        out = self._out
        if out:
            self._out = None
            if self._backlog is not None:
                self._backlog.extend(out)
                self._send_backlog()
                if self._backlog is not None:
                    self._output_grew()
            else:
                # The common case, kept inline: send it all at once.
                try:
                    if len(out) == 1:
                        data = out[0]
                        total = len(data)
                        sent = self._sock.send(data)
                    else:
                        total = sum(map(len, out))
                        if total <= JOIN_MAX:
                            data = b"".join(out)
                            out = [data]
                            sent = self._sock.send(data)
                        else:
                            sent = self._sock.sendmsg(out[:MAX_IOV])
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._fatal(exc, "send")
                    return
                if self._counted:
                    self._bout += sent
                if sent != total:
                    backlog = self._backlog = OutputQueue()
                    backlog.extend(out)
                    backlog.consume(sent)
                    self._output_grew()
                elif self._mask == EVENT_READ and self._state == OPEN:
                    # All sent, and nothing else changed the mask: whatever stops
                    # reading (a pause, held input, EOF) updated it already.
                    return
        elif self._backlog is not None:
            self._send_backlog()
        if self._state == CLOSED:
            return
        if self._backlog is None and self._state == CLOSING:
            self._start_linger()
            return
        self._update_mask()
        if self._backlog is None:
            self._maybe_finish()

    def _send_backlog(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        chunk = backlog.chunk()
        try:
            sock = self._sock
            sent = sock.sendmsg(chunk) if isinstance(chunk, list) else sock.send(chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc, "send")
            return
        if self._counted:
            self._bout += sent
        backlog.consume(sent)
        if not backlog.nbytes:
            self._backlog = None
            self._drained()

    def _update_mask(self) -> None:
        """Compute the event mask from state; touch the registration only on change."""
        if self._state == CLOSED:
            return
        pending = self.pending
        paused = bool(self._flags & WRITING_PAUSED)
        if paused != (pending > (LOW_WATER if paused else HIGH_WATER)):
            self._flags ^= WRITING_PAUSED
            if self._state == OPEN:
                self._tell_writing(not paused)
            if self._state == CLOSED:
                return
            pending = self.pending  # the handler may have sent (resume_writing does)
        reading = self._wants_input() if self._state == OPEN else not self._flags & EOF
        want = (EVENT_READ if reading else 0) | (EVENT_WRITE if pending else 0)
        if want == self._mask:
            return
        loop = self._loop
        if self._mask == 0:
            loop.register(self._sock, want, self)
        elif want == 0:
            loop.unregister(self._sock)
        else:
            loop.modify(self._sock, want, self)
        self._mask = want

    # -- closing ----------------------------------------------------------

    def _discard_input(self) -> None:
        """Closing: read and drop input until EOF (the lingering close)."""
        try:
            data = self._sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(None)
            return
        if not data:
            self._flags |= EOF
            if self._state == LINGER:
                self._close(None)
            else:
                self._update_mask()

    def _start_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(None)
            return
        if self._flags & EOF:
            self._close(None)
            return
        self._state = LINGER
        self._timer = self._loop.call_later(LINGER_TIMEOUT, self._close, None)
        self._update_mask()

    def _flush_timed_out(self) -> None:
        self._why = "flush_timeout"
        log.log(self._info, "closing %s: output not drained in %g s", self._peer_text(),
                FLUSH_TIMEOUT, extra=self._extra())
        self._close(None)

    def _fatal(self, exc: BaseException, what: str) -> None:
        """The one path for errors: log once, close, and let the server go on."""
        if isinstance(exc, OSError) and exc.errno in _QUIET_ERRNOS:
            log.log(self._info, "%s: %s failed: %s", self._peer_text(), what, exc.strerror,
                    extra=self._extra())
        else:
            log.error("%s: %s failed", self._peer_text(), what, exc_info=exc, extra=self._extra())
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        if self._state == CLOSED:
            return
        lingered = self._state == LINGER
        self._state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._mask:
            self._loop.unregister(self._sock)
            self._mask = 0
        self._out = self._backlog = None
        if not self._counted:  # the kernel's counts, while it still has them
            self._bin, self._bout = _kernel_bytes(self._sock, self._bin, self._bout,
                                                  lingered, bool(self._flags & EOF))
        self._sock.close()
        self._closed(exc)

    @property
    def _info(self) -> int:
        """The level of the connection's routine log lines: debug for a health check."""
        return logging.DEBUG if self._flags & QUIET else logging.INFO

    def _peer_text(self) -> str:
        return format_address(self.peer)

    def _extra(self) -> dict[str, object]:
        """A log call's fields for this connection (``--log-format json``'s ``peer``)."""
        return {"peer": self._peer_text()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._peer_text()} state={self._state}>"


_TCP_INFO: Final = getattr(socket, "TCP_INFO", 0)
_IP_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6)
#: struct tcp_info through tcpi_bytes_received (Linux 4.2): tcpi_state, and the two counts.
_TCP_INFO_LEN: Final = 136
_BYTES: Final = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received at 120
#: tcpi_state values (include/net/tcp_states.h) in which the peer's FIN was received,
#: and in which ours was queued; the kernel counts each FIN as a byte.
_FIN_IN: Final = frozenset((6, 8, 9, 11))  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
_FIN_OUT: Final = frozenset((4, 5, 6, 9, 11))  # FIN_WAIT1, FIN_WAIT2, TIME_WAIT, LAST_ACK, CLOSING
_TCP_CLOSE: Final = 7  # after a reset, or the last ACK: which FINs, the caller knows
_INT: Final = struct.Struct("=i")


def _kernel_bytes(
    sock: _socket.socket, b_in: int, b_out: int, lingered: bool, eof: bool
) -> tuple[int, int]:
    """Bytes read and taken, from the kernel's TCP counters (``b_in, b_out`` if it fails).

    Read: received less what waits unread; taken: acknowledged plus what waits
    in the send queue (unsent or unacknowledged); each less its FIN.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
        fd = sock.fileno()
        buf = bytearray(4)  # (mutable: ioctl fills it in place)
        fcntl.ioctl(fd, termios.FIONREAD, buf)  # SIOCINQ
        (inq,) = _INT.unpack(buf)
        fcntl.ioctl(fd, termios.TIOCOUTQ, buf)  # SIOCOUTQ
        (outq,) = _INT.unpack(buf)
    except OSError:
        return b_in, b_out
    if len(info) < _TCP_INFO_LEN:
        return b_in, b_out
    acked, received = _BYTES.unpack_from(info, 120)
    state = info[0]
    fin_in = state in _FIN_IN or (state == _TCP_CLOSE and eof)
    fin_out = state in _FIN_OUT or (state == _TCP_CLOSE and lingered)
    return max(0, received - inq - fin_in), max(0, acked + outq - fin_out)
