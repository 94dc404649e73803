"""One client connection: its socket, its decoder, its output buffer, its handler.

Reading: one ``recv`` per readiness event (so one busy client cannot starve
the others), of at most ``RECV_SIZE`` bytes, or of the rest of a large frame's
body; the decoder slices every message it completes straight out of those
bytes for the handler, and the replies of that whole batch leave in one
``send``.

Writing, the asyncio way: try ``send`` at once; keep exactly what it did not
take; ask the selector for ``EVENT_WRITE`` only while output is pending.

State decides the event mask: ``_update_mask`` computes READ (unless paused,
at EOF or closed) | WRITE (if output is pending) and touches the selector only
when that changes.  Reading pauses while pending output is above the
high-water mark and resumes below the low-water mark.

Closing on purpose never loses queued output: stop handing input to the
handler, flush, ``shutdown(SHUT_WR)``, then read and discard until the peer's
EOF or a short timeout (the "lingering close"; a plain ``close()`` with unread
input would make the kernel send a reset and drop the unsent tail).  Every
socket or handler error ends the connection through ``_fatal``: one path, one
log line, and the server goes on.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import socket
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .framing import Buffer, encode_error, encode_length_parts, make_decoder
from .loop import EVENT_READ, EVENT_WRITE, Timer

if TYPE_CHECKING:
    from .handler import Handler, HandlerFunction
    from .loop import EventLoop
    from .server import Server

__all__ = ["Connection"]

log = logging.getLogger("muxsrv")

#: The most one recv asks for outside a large frame's body (a fresh bytes object
#: each time, shrunk to what arrived; below glibc's default mmap threshold).
RECV_SIZE: Final = 64 * 1024
#: Pause reading above this much pending output (per connection) ...
HIGH_WATER: Final = 1024 * 1024
#: ... and resume below this, so pausing does not flap on every send.
LOW_WATER: Final = 256 * 1024
#: Output above this size is sent with sendmsg (no join copy); below, joined.
JOIN_MAX: Final = 64 * 1024
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers.
MAX_IOV: Final = 1024
#: The most one recv of a large frame's body asks for (bytes are allocated first).
BODY_RECV_MAX: Final = 4 * 1024 * 1024
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

_QUIET_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ESHUTDOWN}
)


class Connection:
    """A client connection; handlers see it through the :class:`~muxsrv.handler.Conn` API."""

    __slots__ = (
        "_batching",
        "_decoder",
        "_eof",
        "_fn",
        "_handler",
        "_held",
        "_loop",
        "_mask",
        "_out",
        "_paused",
        "_paused_out",
        "_peer",
        "_server",
        "_sock",
        "_state",
        "_timer",
        "_work",
        "last_active",
    )

    def __init__(
        self,
        server: Server,
        sock: _socket.socket,
        peer: Any,
        function: HandlerFunction | None,
        handler: Handler | None,
    ) -> None:
        settings = server.settings
        self._server = server
        self._loop = server.loop
        self._sock = sock
        self._peer = peer  # None: asked of the socket when first needed (saves memory)
        self._decoder = make_decoder(settings.framing, settings.max_frame)
        self._fn = function
        self._handler = handler
        # Pending output; None when there is none (an idle connection owns no list).
        self._out: list[Buffer] | None = None
        self._mask = 0
        self._state = OPEN
        self._batching = False  # inside message_received: send() only queues
        self._eof = False
        self._paused = False  # by the handler, or by the server's drain
        # Messages decoded after the handler paused reading: handed over on resume.
        self._held: list[bytes] | None = None
        self._paused_out = False  # by flow control: too much pending output
        self._work = 0
        self._timer: Timer | None = None
        self.last_active = server.loop.now

    # -- the Conn API for handlers --------------------------------------------

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
    def framing(self) -> str:
        return self._server.settings.framing

    @property
    def closing(self) -> bool:
        return self._state != OPEN

    def send(self, payload: Buffer, *more: Buffer) -> None:
        if self._state != OPEN:
            return
        for part in (payload, *more):
            if not isinstance(part, (bytes, bytearray, memoryview)):
                raise TypeError(f"send() takes bytes, not {type(part).__name__}")
        if not more:
            self._server.encode(self._queue(), payload)
        elif self.framing == "length":
            encode_length_parts(self._queue(), (payload, *more))
        else:
            self._server.encode(self._queue(), b"".join((payload, *more)))
        self._flush()

    def send_error(self, text: str) -> None:
        if self._state != OPEN:
            return
        if self.framing == "length":
            self._queue().append(encode_error(text))
            self._flush()
        else:
            log.warning("error for %s (no error channel with %s framing): %s",
                        self._peer_text(), self.framing, text)

    def close(self) -> None:
        """Deliver what is queued, then a lingering close."""
        if self._state != OPEN:
            return
        self._state = CLOSING
        self._timer = self.loop.call_later(FLUSH_TIMEOUT, self._flush_timed_out)
        self._flush()

    def abort(self) -> None:
        self._close(None)

    def pause_reading(self) -> None:
        self._paused = True
        self._update_mask()

    def resume_reading(self) -> None:
        if self._server.draining:
            return
        self._paused = False
        if self._held is not None:
            # First what arrived before the pause, from the loop (not from inside
            # the handler's own call); reading resumes after that.
            self._loop.call_soon(self._deliver_held)
        else:
            self._update_mask()

    def work_started(self) -> None:
        self._work += 1

    def work_done(self) -> None:
        if self._work > 0:
            self._work -= 1
        self.last_active = self._loop.now
        self._maybe_finish()

    # -- events from the loop ---------------------------------------------

    def start(self) -> None:
        """Register with the selector and tell the handler."""
        self._update_mask()
        handler = self._handler
        if handler is not None:
            try:
                handler.connection_made(self)
            except Exception as exc:
                self._fatal(exc, "handler connection_made")

    def handle_event(self, mask: int) -> None:
        """The loop's entry point; the read path is inlined (it runs per message)."""
        self.last_active = self._loop.now
        if mask & EVENT_READ:
            if self._state != OPEN:
                self._discard_input()
                if mask & EVENT_WRITE:
                    self._flush()
                return
            decoder = self._decoder
            # Inside a large frame, ask for just the rest of its body: fresh bytes
            # the decoder keeps as they are and joins once.
            want = decoder.want
            try:
                data = self._sock.recv(min(want, BODY_RECV_MAX) if want else RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fatal(exc, "recv")
                return
            if not data:
                self._read_eof()
                return
            fn = self._fn
            if fn is not None:  # the function form: decode, call, encode in one pass
                out = self._out
                if out is None:
                    out = self._out = []
                decoder.respond(data, fn, out, self._handler_failed)
            else:
                messages = decoder.feed(data)
                if messages:
                    self._deliver(messages)
            if decoder.error is not None and self._state == OPEN:
                self._violation(decoder.error)
            self._flush()
        elif mask & EVENT_WRITE:
            self._flush()

    def _deliver(self, messages: list[bytes]) -> None:
        """Hand messages to the handler; replies collect in ``_out`` for one send."""
        fn = self._fn
        out = self._out
        if out is None:
            out = self._out = []
        if fn is not None:
            reply = self._decoder.reply
            for payload in messages:
                if not reply(fn, payload, out, self._handler_failed):
                    return
            return
        handler = self._handler
        assert handler is not None
        # Replies sent from message_received are batched: send() only queues and
        # the caller flushes once after the batch.
        self._batching = True
        try:
            for i, payload in enumerate(messages):
                if self._state != OPEN:
                    return
                if self._paused and not self._server.draining:
                    self._held = messages[i:]  # the handler paused: no more until resumed
                    return
                try:
                    handler.message_received(self, payload)
                except Exception as exc:
                    if not self._handler_failed(exc):
                        return
        finally:
            self._batching = False

    def _deliver_held(self) -> None:
        held = self._held
        if held is None or self._state != OPEN or (self._paused and not self._server.draining):
            return
        self._held = None
        self._deliver(held)
        self._flush()

    def _handler_failed(self, exc: Exception) -> bool:
        """Log a failing handler; answer with an error frame.  False: connection ends."""
        log.error("handler failed on a message from %s", self._peer_text(), exc_info=exc)
        if self.framing != "length":
            self.close()
            return False
        self._queue().append(
            encode_error(f"handler error ({type(exc).__name__}); details are in the server log")
        )
        return True

    def _violation(self, reason: str) -> None:
        log.warning("closing %s: %s", self._peer_text(), reason)
        if self.framing == "length":
            self._queue().append(encode_error(reason))
        self.close()

    def _read_eof(self) -> None:
        """The peer shut down its write side: final messages, then finish when owed nothing."""
        self._eof = True
        decoder = self._decoder
        messages = decoder.eof()
        if messages:
            self._deliver(messages)
        elif decoder.error is not None:
            self._violation(decoder.error)
        elif decoder.buffered:
            log.info("%s closed mid-message; %d bytes dropped", self._peer_text(), decoder.buffered)
        handler = self._handler
        if handler is not None and self._state == OPEN:
            try:
                handler.eof_received(self)
            except Exception as exc:
                self._fatal(exc, "handler eof_received")
                return
        self._flush()

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
            self._eof = True
            if self._state == LINGER:
                self._close(None)
            else:
                self._update_mask()

    # -- output -----------------------------------------------------------

    def _queue(self) -> list[Buffer]:
        out = self._out
        if out is None:
            out = self._out = []
        return out

    def _flush(self) -> None:
        """Send what is queued, keep what the kernel did not take, fix the mask."""
        if self._batching or self._state == CLOSED:
            return
        out = self._out
        if out:
            try:
                if len(out) == 1:
                    data = out[0]
                    total = len(data)
                    sent = self._sock.send(data)
                else:
                    total = sum(map(len, out))
                    if total <= JOIN_MAX:
                        data = b"".join(out)
                        sent = self._sock.send(data)
                    else:
                        sent = self._sock.sendmsg(out[:MAX_IOV])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc, "send")
                return
            if sent == total:
                out = self._out = None
            elif len(out) == 1 or total <= JOIN_MAX:
                out[:] = (memoryview(data)[sent:],)
            else:
                _consume(out, sent)
            if out is None and self._mask == EVENT_READ and self._state == OPEN:
                return  # the common case: all sent, still reading: nothing changes
        if not out and self._state == CLOSING:
            self._start_linger()
            return
        self._update_mask()
        if not out:
            self._maybe_finish()

    def _update_mask(self) -> None:
        """Compute the event mask from state; touch the selector only on change."""
        state = self._state
        if state == CLOSED:
            return
        out = self._out
        if out:
            pending = sum(map(len, out))
            self._paused_out = pending > (LOW_WATER if self._paused_out else HIGH_WATER)
        else:
            self._paused_out = False
        if state == OPEN:
            reading = not (self._eof or self._paused or self._paused_out or self._held)
        else:
            reading = not self._eof
        want = (EVENT_READ if reading else 0) | (EVENT_WRITE if out else 0)
        if want == self._mask:
            return
        selector = self._loop.selector
        if self._mask == 0:
            selector.register(self._sock, want, self)
        elif want == 0:
            selector.unregister(self._sock)
        else:
            selector.modify(self._sock, want, self)
        self._mask = want

    def _maybe_finish(self) -> None:
        """Close when nothing more is owed: after EOF, or while the server drains."""
        if self._out or self._work or self._held or self._state != OPEN:
            return
        if self._eof:
            self._close(None)
        elif self._server.draining:
            self.close()

    # -- closing ----------------------------------------------------------

    def begin_drain(self) -> None:
        """Server shutdown: read no more; close once replies already owed are sent."""
        self._paused = True
        if self._held is not None:
            # Received before the handler paused: still answered.
            self._loop.call_soon(self._deliver_held)
        self._update_mask()
        self._maybe_finish()

    def check_idle(self, now: float, timeout: float) -> None:
        if self._work == 0 and now - self.last_active >= timeout and self._state == OPEN:
            log.info("closing %s: idle for %.3g s", self._peer_text(), timeout)
            if self.framing == "length":
                self._queue().append(encode_error(f"idle timeout ({timeout:g} s)"))
            self.close()

    def refuse(self, reason: str) -> None:
        """Turn a just-accepted connection away: an error frame, then a lingering close."""
        if self.framing == "length":
            self._queue().append(encode_error(reason))
        self.close()

    def _start_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(None)
            return
        if self._eof:
            self._close(None)
            return
        self._state = LINGER
        self._timer = self.loop.call_later(LINGER_TIMEOUT, self._close, None)
        self._update_mask()

    def _flush_timed_out(self) -> None:
        log.info("closing %s: output not drained in %g s", self._peer_text(), FLUSH_TIMEOUT)
        self._close(None)

    def _fatal(self, exc: BaseException, what: str) -> None:
        """The one path for errors: log once, close, and let the server go on."""
        if isinstance(exc, OSError) and exc.errno in _QUIET_ERRNOS:
            log.info("%s: %s failed: %s", self._peer_text(), what, exc.strerror)
        else:
            log.error("%s: %s failed", self._peer_text(), what, exc_info=exc)
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        if self._state == CLOSED:
            return
        self._state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._mask:
            self._loop.selector.unregister(self._sock)
            self._mask = 0
        self._out = None
        self._sock.close()
        self._server.connection_closed(self)
        handler = self._handler
        if handler is not None:
            try:
                handler.connection_lost(self, exc)
            except Exception:
                log.exception("%s: handler connection_lost failed", self._peer_text())

    def _peer_text(self) -> str:
        return format_address(self.peer)

    def __repr__(self) -> str:
        return f"<Connection {self._peer_text()} state={self._state}>"


def _consume(out: list[Buffer], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``out``, keeping the rest as views."""
    i = 0
    while sent:
        size = len(out[i])
        if sent >= size:
            sent -= size
            i += 1
        else:
            out[i] = memoryview(out[i])[sent:]
            sent = 0
    del out[:i]
