"""One client connection: its socket, its byte path, its output, its handler.

Reading: one ``recv`` per readiness event (so one busy client cannot starve
the others), of at most ``RECV_SIZE`` bytes, or of the rest of a large frame's
body.  The bytes go through the connection's stages, if it has any (see
``muxsrv.stages``), then to the decoder, which cuts at most ``MAX_BATCH``
messages per call for the handler; the replies of that batch leave in one
``send``.  What the decoder still holds, and messages received while the
handler paused reading, are handed over later from the loop, in order, before
anything read after them (and before an error or EOF that came after them).

Writing, the asyncio way: try ``send`` at once; keep exactly what it did not
take in an :class:`~muxsrv.output.OutputQueue` (a running byte count, linear
cost); ask for ``EVENT_WRITE`` only while output is pending.  Above
``HIGH_WATER`` pending bytes the connection stops reading and tells the
handler ``pause_writing``; below ``LOW_WATER``, ``resume_writing``.

State decides the event mask: ``_update_mask`` computes it from state and
asks the loop to change the registration only when it changes.

The guarantees handlers get (the handler guide repeats them):

* a reply queued with ``send`` is delivered unless the connection was aborted
  or reset: sends never close the connection; whether it is finished (EOF
  seen, nothing owed) is decided afterwards, from the loop;
* ``connection_lost`` runs exactly once, from the loop, never inside another
  handler callback (``abort()`` inside ``message_received`` returns first).

Closing on purpose never loses queued output: stop handing input to the
handler, flush, ``shutdown(SHUT_WR)``, then read and discard until the peer's
EOF or a short timeout (the "lingering close").  Every socket or handler
error ends the connection through ``_fatal``: one path, one log line.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

from .address import format_address
from .framing import Buffer, Decoder, as_payload
from .loop import EVENT_READ, EVENT_WRITE, EventLoop, Timer
from .output import JOIN_MAX, MAX_IOV, OutputQueue

if TYPE_CHECKING:
    from .handler import Handler, HandlerFunction
    from .stages import Stage

__all__ = ["HIGH_WATER", "LOW_WATER", "Connection", "Owner"]

log = logging.getLogger("muxsrv")

#: The most one recv asks for outside a large frame's body (a fresh bytes object
#: each time, shrunk to what arrived; below glibc's default mmap threshold).
RECV_SIZE: Final = 64 * 1024
#: Above this much pending output: stop reading, tell the handler pause_writing ...
HIGH_WATER: Final = 1024 * 1024
#: ... and below this, read again and resume_writing (no flapping on every send).
LOW_WATER: Final = 256 * 1024
#: The most one recv of a large frame's body asks for (bytes are allocated first).
BODY_RECV_MAX: Final = 4 * 1024 * 1024
#: How long a closing connection may take to flush its queued output.
FLUSH_TIMEOUT: Final = 30.0
#: How long a lingering close waits for the peer's EOF before closing anyway.
LINGER_TIMEOUT: Final = 2.0
#: What a draining server tells a client before it closes (the client may resend).
SHUTTING_DOWN: Final = "server shutting down"

# States.  OPEN: messages go to the handler.  CLOSING: flushing queued output,
# input discarded.  LINGER: write side shut, discarding input until EOF.
OPEN: Final = 0
CLOSING: Final = 1
LINGER: Final = 2
CLOSED: Final = 3

_QUIET_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ESHUTDOWN}
)


class Owner(Protocol):
    """What a connection needs of whoever accepted it (the server)."""

    loop: EventLoop

    def connection_closed(self, conn: Connection) -> None: ...


class Connection:
    """A client connection; handlers see it through the :class:`~muxsrv.handler.Conn` API."""

    __slots__ = (
        "_backlog",
        "_decoder",
        "_eof",
        "_eof_told",
        "_fn",
        "_handler",
        "_held",
        "_in_callback",
        "_loop",
        "_made",
        "_mask",
        "_out",
        "_owner",
        "_paused",
        "_peer",
        "_sock",
        "_stages",
        "_state",
        "_step_pending",
        "_timer",
        "_work",
        "_writing_paused",
        "last_active",
    )

    def __init__(
        self,
        owner: Owner,
        sock: _socket.socket,
        peer: Any,
        decoder: Decoder,
        function: HandlerFunction | None,
        handler: Handler | None,
        stages: list[Stage] | None = None,
    ) -> None:
        self._owner = owner
        self._loop = owner.loop
        self._sock = sock
        self._peer = peer  # None: asked of the socket when first needed (saves memory)
        self._decoder = decoder
        self._fn = function
        self._handler = handler
        self._stages = stages or None
        self._out: list[Buffer] | None = None  # replies queued since the last flush
        self._backlog: OutputQueue | None = None  # what the kernel has not taken yet
        self._mask = 0
        self._state = OPEN
        self._in_callback = False  # inside a handler callback: send() only queues
        self._eof = False  # the peer shut down its write side ...
        self._eof_told = False  # ... and the handler was told (eof_received)
        self._paused = False  # by the handler (pause_reading)
        self._held: deque[bytes] | None = None  # received while the handler paused
        self._writing_paused = False  # pending output above the high-water mark
        self._work = 0
        self._made = False  # connection_made was called
        self._step_pending = False
        self._timer: Timer | None = None
        self.last_active = self._loop.now

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
        return self._decoder.framing

    @property
    def closing(self) -> bool:
        return self._state != OPEN

    def send(self, payload: Buffer, *more: Buffer) -> None:
        if self._state != OPEN:
            return
        out = self._out
        if out is None:
            out = self._out = []
        if more:
            self._decoder.encode_parts(out, [as_payload(p) for p in (payload, *more)])
        else:
            self._decoder.encode(out, as_payload(payload))
        self._flush()

    def send_error(self, text: str) -> None:
        if self._state != OPEN:
            return
        if not self._queue_error(text):
            log.warning("error for %s (no error channel with %s framing): %s",
                        self._peer_text(), self.framing, text)
        self._flush()

    def close(self) -> None:
        """Deliver what is queued, then a lingering close."""
        if self._state != OPEN:
            return
        self._state = CLOSING
        self._held = None
        self._timer = self._loop.call_later(FLUSH_TIMEOUT, self._flush_timed_out)
        self._flush()

    def abort(self) -> None:
        self._close(None)

    def pause_reading(self) -> None:
        self._paused = True
        self._update_mask()

    def resume_reading(self) -> None:
        self._paused = False
        if self._held or self._decoder.more:
            self._schedule_step()  # what was received first, from the loop
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
        """Register with the loop; tell the handler once every stage is ready."""
        self._update_mask()
        if self._stages is None or all(stage.ready for stage in self._stages):
            self._connection_made()

    def handle_event(self, mask: int) -> None:
        """The loop's entry point; the read path is inlined (it runs per message)."""
        self.last_active = self._loop.now
        if not mask & EVENT_READ:
            self._flush()
            return
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
        if self._stages is not None:
            data = self._stages_in(data)
        if data:
            self._decode(data)
        self._flush()

    def _decode(self, data: bytes) -> None:
        """Cut messages out of ``data``; hand them over; note what stopped the cutting."""
        decoder = self._decoder
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
        if decoder.more:
            self._schedule_step()  # the rest of this batch, from the loop
            self._update_mask()  # (read no more until then)
        elif decoder.error is not None and not self._held:
            self._input_done()

    def _deliver(self, messages: list[bytes]) -> None:
        """Hand messages to the handler; replies collect in ``_out`` for one send."""
        fn = self._fn
        if fn is not None:
            out = self._out
            if out is None:
                out = self._out = []
            reply = self._decoder.reply
            for payload in messages:
                if not reply(fn, payload, out, self._handler_failed):
                    return
            return
        handler = self._handler
        assert handler is not None
        self._in_callback = True
        try:
            for i, payload in enumerate(messages):
                if self._state != OPEN:
                    return
                if self._paused:
                    self._held = deque(messages[i:])  # no more until resumed
                    self._update_mask()
                    return
                try:
                    handler.message_received(self, payload)
                except Exception as exc:
                    if not self._handler_failed(exc):
                        return
        finally:
            self._in_callback = False

    def _step(self) -> None:
        """From the loop: go on with input held back, then see whether we are done."""
        self._step_pending = False
        if self._state != OPEN:
            return
        if self._held and not self._paused:
            held, self._held = self._held, None
            self._deliver(list(held))
        if not (self._held or self._paused or self._state != OPEN):
            if self._decoder.more:
                self._decode(b"")
            elif self._decoder.error is not None or (self._eof and not self._eof_told):
                self._input_done()
        self._flush()
        self._finish_if_owed_nothing()

    def _schedule_step(self) -> None:
        if not self._step_pending:
            self._step_pending = True
            self._loop.call_soon(self._step)

    def _input_done(self) -> None:
        """Every message before it was handed over: act on what ended the input."""
        decoder = self._decoder
        if decoder.error is not None:
            self._violation(decoder.error)
            return
        self._eof_told = True
        if decoder.buffered:
            log.info("%s closed mid-message; %d bytes dropped", self._peer_text(), decoder.buffered)
        if self._handler is not None and self._made:
            self._callback(self._handler.eof_received, "eof_received")

    def _read_eof(self) -> None:
        """The peer shut down its write side: final messages, then eof_received."""
        self._eof = True
        self._update_mask()
        messages = self._decoder.eof()
        if messages:
            self._deliver(messages)
        if not self._held and self._state == OPEN:
            self._input_done()
        self._flush()

    def _handler_failed(self, exc: Exception) -> bool:
        """Log a failing handler; answer with an error frame.  False: connection ends."""
        log.error("handler failed on a message from %s", self._peer_text(), exc_info=exc)
        text = f"handler error ({type(exc).__name__}); details are in the server log"
        if self._queue_error(text):
            return True
        self.close()
        return False

    def _violation(self, reason: str, frame: bool = True) -> None:
        log.warning("closing %s: %s", self._peer_text(), reason)
        if frame:
            self._queue_error(reason)
        self.close()

    def _queue_error(self, text: str) -> bool:
        """Queue an error frame; False if the framing has no error channel."""
        frame = self._decoder.error_frame(text)
        if frame is None:
            return False
        out = self._out
        if out is None:
            out = self._out = []
        out.append(frame)
        return True

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

    def _callback(self, method: Any, name: str) -> None:
        """Call a handler method (sends inside it only queue); one flush after."""
        self._in_callback = True
        try:
            method(self)
        except Exception as exc:
            self._in_callback = False
            self._fatal(exc, f"handler {name}")
            return
        self._in_callback = False

    def _connection_made(self) -> None:
        self._made = True
        if self._handler is not None:
            self._callback(self._handler.connection_made, "connection_made")
            self._flush()

    # -- stages -------------------------------------------------------------

    def _stages_in(self, data: bytes) -> bytes:
        """Received bytes through every stage; what reaches the codec."""
        stages = self._stages
        assert stages is not None
        for stage in stages:
            data = stage.receive(data)
            if stage.error is not None:
                self._violation(stage.error, frame=False)
                return b""
            if not data:
                break
        if any(stage.done for stage in stages):
            self._stages = [stage for stage in stages if not stage.done] or None
        if not self._made and all(stage.ready for stage in stages):
            self._connection_made()
        return data if self._state == OPEN else b""

    def _stages_out(self, out: list[Buffer] | None) -> list[Buffer] | None:
        """Queued output through every stage, nearest the codec first."""
        stages = self._stages
        assert stages is not None
        data = b"".join(out) if out else b""
        for stage in reversed(stages):
            data = stage.send(data)
        return [data] if data else None

    # -- output -----------------------------------------------------------

    def _flush(self) -> None:
        """Send what is queued, keep what the kernel did not take, fix the mask."""
        if self._in_callback or self._state == CLOSED:
            return
        out = self._out
        if self._stages is not None:
            out = self._out = self._stages_out(out)
        if out:
            self._out = None
            if self._backlog is not None:
                self._backlog.extend(out)
                self._send_backlog()
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
                if sent != total:
                    backlog = self._backlog = OutputQueue()
                    backlog.extend(out)
                    backlog.consume(sent)
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
        backlog.consume(sent)
        if not backlog.nbytes:
            self._backlog = None

    @property
    def pending(self) -> int:
        """Bytes of output the kernel has not taken yet."""
        backlog = self._backlog
        return backlog.nbytes if backlog is not None else 0

    def _update_mask(self) -> None:
        """Compute the event mask from state; touch the registration only on change."""
        if self._state == CLOSED:
            return
        pending = self.pending
        if self._writing_paused != (pending > (LOW_WATER if self._writing_paused else HIGH_WATER)):
            self._writing_paused = not self._writing_paused
            self._tell_writing(self._writing_paused)
            if self._state == CLOSED:
                return
            pending = self.pending  # the handler may have sent (resume_writing does)
        if self._state == OPEN:
            reading = not (self._eof or self._paused or self._writing_paused or self._held
                           or self._decoder.more)
        else:
            reading = not self._eof
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

    def _tell_writing(self, paused: bool) -> None:
        handler = self._handler
        if handler is None or not self._made or self._state != OPEN:
            return
        try:
            if paused:
                handler.pause_writing(self)
            else:
                handler.resume_writing(self)
        except Exception as exc:
            self._fatal(exc, "handler pause_writing" if paused else "handler resume_writing")

    def owes_nothing(self) -> bool:
        """Nothing queued, nothing in progress, nothing received and not yet handed over."""
        return not (self._out or self._backlog or self._work or self._held or self._decoder.more)

    def _maybe_finish(self) -> None:
        """After EOF with nothing owed the connection is done: decided from the loop."""
        if self._eof and self._state == OPEN and self.owes_nothing():
            self._schedule_step()

    def _finish_if_owed_nothing(self) -> None:
        if self._eof and self._eof_told and self._state == OPEN and self.owes_nothing():
            self._close(None)

    # -- closing ----------------------------------------------------------

    def check_idle(self, now: float, timeout: float) -> None:
        # Work waiting for a peer that reads nothing (writing paused) spares nobody.
        if ((self._work == 0 or self._writing_paused) and now - self.last_active >= timeout
                and self._state == OPEN):
            log.info("closing %s: idle for %.3g s", self._peer_text(), timeout)
            self._queue_error(f"idle timeout ({timeout:g} s)")
            self.close()

    def at_rest(self, now: float, quiet: float) -> bool:
        """Owes nothing, holds no partial message, and heard nothing for ``quiet`` s."""
        return (self._state == OPEN and self.owes_nothing() and not self._decoder.buffered
                and now - self.last_active >= quiet)

    def say_goodbye(self) -> None:
        """Draining: close at a message boundary, telling the client it may resend.

        What was received but never handed to the handler (held by a pause, or a
        partial message) is dropped: the client resends it.  A connection with
        a reply still in progress is aborted instead: a goodbye would promise
        that everything handed over before it was answered.
        """
        if self._state != OPEN:
            return
        if self._work:
            log.info("closing %s: work still in progress at the drain's end", self._peer_text())
            self.abort()
            return
        self._queue_error(SHUTTING_DOWN)
        self.close()

    def refuse(self, reason: str) -> None:
        """Turn a just-accepted connection away: an error frame, then a lingering close."""
        self._queue_error(reason)
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
        self._timer = self._loop.call_later(LINGER_TIMEOUT, self._close, None)
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
            self._loop.unregister(self._sock)
            self._mask = 0
        self._out = self._backlog = self._held = None
        self._sock.close()
        self._owner.connection_closed(self)
        if self._handler is not None and self._made:
            self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        assert self._handler is not None
        try:
            self._handler.connection_lost(self, exc)
        except Exception:
            log.exception("%s: handler connection_lost failed", self._peer_text())

    def _peer_text(self) -> str:
        return format_address(self.peer)

    def __repr__(self) -> str:
        return f"<Connection {self._peer_text()} state={self._state}>"
