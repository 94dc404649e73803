"""One client connection: its byte path, its codec, its handler.

:class:`Connection` is a :class:`~muxsrv.transport.Transport` (the socket,
the output queue, the lingering close) with the read side on top.

Reading: one ``recv`` per readiness event (so one busy client cannot starve
the others), of at most ``RECV_SIZE`` bytes, or of the rest of a large frame's
body.  The bytes go through the connection's stages, if it has any (see
``muxsrv.stages``), then to the decoder, which cuts at most ``MAX_BATCH``
messages per call for the handler; the replies of that batch leave in one
``send``.  What the decoder still holds, and messages received while the
handler paused reading, are handed over later from the loop, in order, before
anything read after them (and before an error or EOF that came after them).

The guarantees handlers get (the handler guide repeats them):

* a reply queued with ``send`` is delivered unless the connection was aborted
  or reset: sends never close the connection; whether it is finished (EOF
  seen, nothing owed) is decided afterwards, from the loop (``_step``);
* ``connection_lost`` runs exactly once, from the loop, never inside another
  handler callback (``abort()`` inside ``message_received`` returns first).

The counters (``muxsrv.stats``) cost nothing per message: per read batch
two additions, the messages (the function form: the frames its replies
queued; the decoder counts the rare replies of None and replies framed in
two buffers apart) and, when the batch's replies are all with the kernel,
the histogram's count for this loop turn; the loop reads the clock once at
the turn's end for all of them (``EventLoop.add_tally``).  Over TCP the
bytes are the kernel's (``Transport.byte_counts``).  A reply sent later (a
timer, the handler form) reads the clock itself and is timed from the read
of the oldest message still unanswered.
Why a connection closed is noted where it is decided (``_why``).

Closing on purpose stops handing input to the handler, then closes the
transport's way: nothing queued is lost.  A handler that raises in
``message_received`` is answered with an error frame; in ``connection_made``,
before any reply, with that error frame and a graceful close (the client hears
why, not a reset); anywhere else the error ends the connection through
``_fatal``, like a socket error.
"""

from __future__ import annotations

import _socket
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

from .address import format_address
from .codec import SHUTTING_DOWN, Buffer, Decoder, as_payload
from .limits import HELD_BACK
from .loop import EVENT_READ, EVENT_WRITE
from .stages import StagePath
from .stats import Histogram
from .transport import (
    _QUIET_ERRNOS,
    CLOSED,
    EOF,
    EOF_TOLD,
    IN_CALLBACK,
    MADE,
    OPEN,
    PAUSED,
    QUIET,
    RECV_SIZE,
    STALLED,
    STEP_PENDING,
    WRITING_PAUSED,
    Transport,
)

if TYPE_CHECKING:
    from .handler import Handler, HandlerFunction
    from .loop import EventLoop
    from .stages import Stage

__all__ = ["OVER_BUDGET", "Connection", "Owner"]

log = logging.getLogger("muxsrv.conn")
limits_log = logging.getLogger("muxsrv.limits")  # closes by --max-output, --max-buffered

#: The error frame of a connection closed by the input budget (--max-buffered).
OVER_BUDGET: Final = ("server busy: too many bytes held for unfinished messages "
                      "(--max-buffered); send it again later")
#: The most one recv of a large frame's body asks for (bytes are allocated first).
BODY_RECV_MAX: Final = 4 * 1024 * 1024


class Owner(Protocol):
    """What a connection needs of whoever accepted it (the server)."""

    loop: EventLoop

    latency: Histogram

    def connection_closed(self, conn: Connection) -> None: ...


class Connection(Transport):
    """A client connection; handlers see it through the :class:`~muxsrv.handler.Conn` API."""

    #: Whether this class runs the byte path's stages (the plain one never looks).
    takes_stages = False

    __slots__ = (
        "_born",
        "_decoder",
        "_fn",
        "_handler",
        "_held",
        "_lat",
        "_ndone",
        "_nin",
        "_nout",
        "_owner",
        "_stages",
        "_t_in",
        "_work",
        "id",
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
        super().__init__(owner.loop, sock, peer)
        if not hasattr(owner, "latency"):  # an owner from before the counters: one of its own
            owner.latency = Histogram()
        self._owner = owner
        self._lat = owner.latency
        owner.loop.add_tally(self._lat)
        self._decoder = decoder
        self._fn = function
        self._handler = handler
        self._stages: StagePath | None = None
        if stages:
            if not self.takes_stages:
                raise TypeError("a connection with stages is a muxsrv.staged.StagedConnection")
            self._stages = StagePath(stages)
        self._held: deque[bytes] | None = None  # received while the handler paused
        self._work = 0
        # The counters (muxsrv.stats): bytes read; messages read, replies queued, replies
        # whose latency was recorded; when the oldest unanswered message was read.
        self._nin = self._nout = self._ndone = 0
        self._t_in = self._born = owner.loop.now
        #: A number for /clients (the server's count of accepted connections).
        self.id = 0

    # -- the Conn API for handlers --------------------------------------------

    @property
    def framing(self) -> str:
        return self._decoder.framing

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        path = self._stages
        return path.peer_cert if path is not None else None

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
        self._nout += 1
        self._asked = -1.0  # (perhaps from a timer: no event marks the bytes sent)
        self._flush()
        if self._nout != self._ndone:
            self._answered()

    def send_error(self, text: str) -> None:
        if self._state != OPEN:
            return
        if not self._queue_error(text):
            log.warning("error for %s (no error channel with %s framing): %s",
                        self._peer_text(), self.framing, text, extra=self._extra())
        else:
            self._nout += 1
        self._asked = -1.0
        self._flush()

    def close(self) -> None:
        """Hand the handler nothing more; deliver what is queued; a lingering close."""
        self._held = None
        super().close()

    def pause_reading(self) -> None:
        self._flags |= PAUSED
        self._update_mask()

    def resume_reading(self) -> None:
        self._flags &= ~PAUSED
        decoder = self._decoder
        eof_untold = self._flags & (EOF | EOF_TOLD) == EOF
        if self._held or decoder.more or decoder.error is not None or eof_untold:
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

    def peer_validated(self) -> None:
        """TCP's handshake validated the address already (the cap is ``--udp``'s)."""

    # -- events from the loop ---------------------------------------------

    def start(self) -> None:
        """Register with the loop; tell the handler once every stage is ready."""
        self._update_mask()
        if self._stages is None or self._stages.ready:
            self._connection_made()

    def handle_event(self, mask: int) -> None:
        """The loop's entry point; the read path is inlined (it runs per message)."""
        self.last_active = self._loop.now
        if not mask & EVENT_READ:
            self._flush()
            if self._nout != self._ndone:
                self._answered()
            return
        if self._state != OPEN:
            if self._state == CLOSED:
                return  # closed earlier in this turn, by another descriptor's callback
            self._discard_input()
            if mask & EVENT_WRITE:
                self._flush()
            return
        decoder = self._decoder
        # Inside a large frame, ask for just the rest of its body: fresh bytes
        # the decoder keeps as they are and joins once.
        want = decoder.want
        if want:  # (the budget is asked only here: inside a large message's body)
            budget = getattr(self._owner, "input_budget", None)
            if budget is not None and not budget.admits(self, decoder.buffered):
                return
            size = min(want, BODY_RECV_MAX)
        else:
            size = RECV_SIZE
        try:
            data = self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc, "recv")
            return
        if not data:
            self._read_eof()
            return
        if self._counted:  # (not over TCP: the kernel counts those)
            self._bin += len(data)
        fn = self._fn
        if fn is not None:  # the function form: decode, call, encode in one pass
            out = self._out
            if out is None:
                out = self._out = []
                decoder.respond(data, fn, out, self._handler_failed)
                n = len(out)  # replies and error frames: one per message, nearly
            else:
                n = len(out)
                decoder.respond(data, fn, out, self._handler_failed)
                n = len(out) - n
            if decoder.more or decoder.error is not None:
                self._cut_short()
            self._flush()
            self._nin += n
            if self._backlog is None:  # all with the kernel: timed by this turn's end
                self._lat.turn += n
            else:
                self._replies_queued(n)
            return
        self._decode(data)
        self._flush()
        if self._nout != self._ndone:
            self._answered()

    def _replies_queued(self, n: int) -> None:
        """The function form, replies not all sent: timed as the handler form's are."""
        if self._nout <= self._ndone:
            self._t_in = self._loop.now
        self._nout += n

    def _drained(self) -> None:
        if self._nout != self._ndone:
            self._answered()

    def _answered(self) -> None:
        """Once all output is with the kernel: the latency of the replies just sent.

        Replies are matched to messages in order (a push beyond them is none); a
        batch of them is recorded once, from the read that began the oldest
        unanswered one (``_t_in``, the loop turn's clock) to now.
        """
        if self._backlog is not None or self._state == CLOSED:
            return
        done = self._nout if self._nout < self._nin or self._fn else self._nin
        if done > self._ndone:
            self._lat.add(self._loop.clock() - self._t_in, done - self._ndone)
        self._ndone = done

    def _messages_in(self, n: int) -> None:
        if self._nout <= self._ndone:
            self._t_in = self._loop.now
        self._nin += n
    def _decode(self, data: bytes) -> None:
        """Cut messages out of ``data``; hand them over; note what stopped the cutting."""
        decoder = self._decoder
        fn = self._fn
        if fn is not None:  # (handle_event inlines this for fresh bytes)
            out = self._out
            if out is None:
                out = self._out = []
            n = len(out)
            decoder.respond(data, fn, out, self._handler_failed)
            n = len(out) - n
            if n:
                self._nin += n
                self._replies_queued(n)
        else:
            messages = decoder.feed(data)
            if messages:
                self._messages_in(len(messages))
                self._deliver(messages)
        self._cut_short()

    def _cut_short(self) -> None:
        """The decoder stopped before the end of its bytes: a full batch, or an error."""
        decoder = self._decoder
        if decoder.more:
            self._schedule_step()  # the rest of this batch, from the loop
            self._update_mask()  # (read no more until then)
        elif decoder.error is not None and not (self._held or self._flags & PAUSED):
            self._input_done()

    def _deliver(self, messages: list[bytes]) -> None:
        """Hand messages to the handler; replies collect in ``_out`` for one send."""
        fn = self._fn
        if fn is not None:
            out = self._out
            if out is None:
                out = self._out = []
            reply = self._decoder.reply
            n = len(out)
            try:
                for payload in messages:
                    if not reply(fn, payload, out, self._handler_failed):
                        return
            finally:
                self._nin += len(out) - n
                self._replies_queued(len(out) - n)
            return
        handler = self._handler
        assert handler is not None
        self._flags |= IN_CALLBACK
        try:
            for i, payload in enumerate(messages):
                if self._state != OPEN:
                    return
                if self._flags & PAUSED:
                    self._held = deque(messages[i:])  # no more until resumed
                    self._update_mask()
                    return
                try:
                    handler.message_received(self, payload)
                except Exception as exc:
                    if not self._handler_failed(exc):
                        return
        finally:
            self._flags &= ~IN_CALLBACK

    def _step(self) -> None:
        """From the loop: go on with input held back, then see whether we are done."""
        self._flags &= ~STEP_PENDING
        if self._state != OPEN:
            return
        if self._held and not self._flags & PAUSED:
            held, self._held = self._held, None
            self._deliver(list(held))
        if not (self._held or self._flags & PAUSED or self._state != OPEN):
            if self._decoder.more:
                self._decode(b"")
            elif self._decoder.error is not None or (self._flags & EOF
                                                     and not self._flags & EOF_TOLD):
                self._input_done()
        self._flush()
        if self._nout != self._ndone:
            self._answered()
        self._finish_if_owed_nothing()

    def _schedule_step(self) -> None:
        if not self._flags & STEP_PENDING:
            self._flags |= STEP_PENDING
            self._loop.call_soon(self._step)

    def _input_done(self) -> None:
        """Every message before it was handed over: act on what ended the input."""
        decoder = self._decoder
        if decoder.error is not None:
            self._why = _framing_reason(decoder.error)
            self._violation(decoder.error)
            return
        self._flags |= EOF_TOLD
        if decoder.buffered:
            log.log(self._info, "%s closed mid-message; %d bytes dropped", self._peer_text(),
                    decoder.buffered, extra=self._extra())
        if self._handler is not None and self._flags & MADE:
            self._callback(self._handler.eof_received, "eof_received")

    def _read_eof(self) -> None:
        """The peer shut down its write side: final messages, then eof_received."""
        self._flags |= EOF
        self._update_mask()
        messages = self._decoder.eof()
        if messages:
            self._messages_in(len(messages))
            self._deliver(messages)
        if not (self._held or self._flags & PAUSED) and self._state == OPEN:
            self._input_done()  # else once the handler resumes reading
        self._flush()

    def _handler_failed(self, exc: Exception) -> bool:
        """Log a failing handler; answer with an error frame.  False: connection ends."""
        log.error("handler failed on a message from %s", self._peer_text(), exc_info=exc,
                  extra=self._extra())
        stats = getattr(self._owner, "stats", None)
        if stats is not None:
            stats.handler_errors += 1
        if self._queue_error(_handler_error(exc)):
            if self._fn is None:  # (the function form counts the frames it queued)
                self._nout += 1
            return True
        self._why = "error"
        self.close()
        return False

    def _violation(self, reason: str, frame: bool = True) -> None:
        level = logging.DEBUG if self._flags & QUIET else logging.WARNING
        log.log(level, "closing %s: %s", self._peer_text(), reason, extra=self._extra())
        if frame:
            self._queue_error(reason)
        self.close()

    def _queue_error(self, text: str) -> bool:
        """Queue an error frame; False if the framing has no error channel."""
        frame = self._decoder.error_frame(text)
        if frame is None:
            return False
        self._asked = -1.0  # (perhaps from a timer: the kernel's counts are asked again)
        out = self._out
        if out is None:
            out = self._out = []
        out.append(frame)
        return True

    def _callback(self, method: Any, name: str) -> None:
        """Call a handler method (sends inside it only queue); one flush after."""
        self._flags |= IN_CALLBACK
        try:
            method(self)
        except Exception as exc:
            self._flags &= ~IN_CALLBACK
            self._fatal(exc, f"handler {name}")
            return
        self._flags &= ~IN_CALLBACK

    def _connection_made(self) -> None:
        self._flags |= MADE
        handler = self._handler
        if handler is None:
            return
        self._flags |= IN_CALLBACK
        try:
            handler.connection_made(self)
        except Exception as exc:
            # Before any reply: tell the client why, then close gracefully (what the
            # handler sent first still goes), instead of a reset through _fatal.
            log.error("%s: handler connection_made failed", self._peer_text(), exc_info=exc,
                      extra=self._extra())
            if self._state == OPEN:
                self._queue_error(_handler_error(exc))
                self.close()
        finally:
            self._flags &= ~IN_CALLBACK
        self._flush()

    # -- what the transport asks ----------------------------------------------

    def _wants_input(self) -> bool:
        return not (self._flags & (EOF | PAUSED | WRITING_PAUSED | STALLED) or self._held
                    or self._decoder.more)

    def _tell_writing(self, paused: bool) -> None:
        if paused:
            stats = getattr(self._owner, "stats", None)
            if stats is not None:
                stats.pauses += 1
        handler = self._handler
        if handler is None or not self._flags & MADE:
            return
        try:
            if paused:
                handler.pause_writing(self)
            else:
                handler.resume_writing(self)
        except Exception as exc:
            self._fatal(exc, "handler pause_writing" if paused else "handler resume_writing")

    @property
    def close_reason(self) -> str:
        """Why it closed (``muxsrv.stats``'s names), once it has."""
        return self._why or "server"

    def counts(self) -> tuple[int, int, int, int]:
        """Bytes in, bytes out, messages in, messages out (replies and error frames)."""
        d = self._decoder
        if self._fn is not None:  # _nin: the frames its replies queued
            return (*self.byte_counts(), self._nin + d.silent - d.extra, self._nin - d.extra)
        return (*self.byte_counts(), self._nin, self._nout)

    @property
    def buffered_input(self) -> int:
        """Bytes of unfinished messages held."""
        return self._decoder.buffered if self._state == OPEN else 0

    def describe(self, now: float, handler: str) -> dict[str, Any]:
        """This connection as /clients lists it."""
        b_in, b_out, m_in, m_out = self.counts()
        flags = self._flags
        peer = self._peer
        if peer is None:  # asked, not kept: a plain connection keeps no address (memory)
            try:
                peer = self._sock.getpeername()
            except OSError:
                peer = None
        return {"id": self.id, "peer": format_address(peer), "age": round(now - self._born, 3),
                "idle": round(now - self.last_active, 3),
                "state": ("open", "closing", "linger", "closed")[self._state],
                "handler": handler, "bytes_in": b_in, "bytes_out": b_out,
                "messages_in": m_in, "messages_out": m_out, "pending_output": self.pending,
                "buffered_input": self.buffered_input,
                "paused": bool(flags & (PAUSED | WRITING_PAUSED | STALLED)),
                "writing_paused": bool(flags & WRITING_PAUSED)}

    def owes_nothing(self) -> bool:
        """Nothing queued, nothing in progress, nothing received and not yet handed over."""
        return not (self._out or self._backlog or self._work or self._held or self._decoder.more)

    def _maybe_finish(self) -> None:
        """After EOF with nothing owed the connection is done: decided from the loop."""
        flags = self._flags
        if (flags & EOF and self._state == OPEN and (flags & EOF_TOLD or not flags & PAUSED)
                and self.owes_nothing()):
            self._schedule_step()  # (paused before eof_received: resume_reading steps)

    def _finish_if_owed_nothing(self) -> None:
        told = self._flags & (EOF | EOF_TOLD) == EOF | EOF_TOLD
        if told and self._state == OPEN and self.owes_nothing():
            self._close(None)

    # -- ending -----------------------------------------------------------

    def check_idle(self, now: float, timeout: float) -> None:
        # Work waiting for a peer that reads nothing (writing paused) spares nobody.
        if ((self._work == 0 or self._flags & WRITING_PAUSED) and now - self.last_active >= timeout
                and self._state == OPEN):
            log.log(self._info, "closing %s: idle for %.3g s", self._peer_text(), timeout,
                    extra=self._extra())
            self._why = "idle"
            self._queue_error(f"idle timeout ({timeout:g} s)")
            self.close()

    def partial_mark(self) -> int | None:
        """While the client owes the rest of a message: its decoder's ``completions``.

        None when it owes nothing; ``HELD_BACK`` while the server itself
        holds its input back (a paused handler, messages not handed over yet,
        back-pressure from unread replies, the input budget): its clock stops.
        See ``muxsrv.limits``.
        """
        decoder = self._decoder
        if self._state != OPEN or self._flags & EOF or not decoder.buffered:
            return None
        if self._flags & (PAUSED | WRITING_PAUSED | STALLED) or self._held or decoder.more:
            return HELD_BACK
        return decoder.completions

    def _output_grew(self) -> None:
        limit = getattr(self._owner, "max_output", 0)
        if limit and self.pending > limit:
            self.output_over(f"over --max-output ({limit} bytes)")

    def output_over(self, limit: str) -> None:
        """Output queued past a limit: dropped at once (what is queued cannot go first)."""
        limits_log.warning("closing %s: %d bytes of output queued, %s", self._peer_text(),
                           self.pending, limit, extra=self._extra())
        self._why = "max_output" if "--max-output" in limit else "output_soft"
        self.abort()

    def held_bytes(self) -> int:
        """Bytes held for the client: its unfinished input and its queued output."""
        return self._decoder.buffered + self.pending

    def large_partial(self) -> int:
        """Bytes held of a large message still being received (what --max-buffered counts)."""
        decoder = self._decoder
        return decoder.buffered if decoder.want and self._state == OPEN else 0

    def stall(self, stalled: bool) -> None:
        """Stop (or go on) reading for the input budget."""
        if stalled != bool(self._flags & STALLED):
            self._flags ^= STALLED
            self._update_mask()

    def over_budget(self, limit: int) -> None:
        """Stalled by the input budget and among the largest: error frame, close."""
        if self._state != OPEN:
            return
        held = self._decoder.buffered
        limits_log.warning("closing %s: %d bytes of an unfinished message held while the "
                           "server is over --max-buffered (%d bytes)", self._peer_text(), held,
                           limit, extra=self._extra())
        self._decoder.discard()  # the memory goes back now, not after the lingering close
        self._why = "max_buffered"
        self._queue_error(OVER_BUDGET)
        self.close()

    def log_quietly(self) -> None:
        """Log this connection's ending at debug level (its refusal was logged already)."""
        self._flags |= QUIET

    def frame_timed_out(self, timeout: float) -> None:
        """A message not complete ``timeout`` s after its first byte: error frame, close."""
        if self._state == OPEN:
            self._why = "frame_timeout"
            self._violation(f"frame timeout: message not complete within {timeout:g} s")

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
        self._why = "drain"
        if self._work:
            log.info("closing %s: work still in progress at the drain's end", self._peer_text(),
                     extra=self._extra())
            self.abort()
            return
        self._queue_error(SHUTTING_DOWN)
        self.close()

    def refuse(self, reason: str) -> None:
        """Turn a just-accepted connection away: an error frame, then a lingering close."""
        self._queue_error(reason)
        self.close()

    def _closed(self, exc: BaseException | None) -> None:
        self._held = None
        if self._why is None:
            self._why = _close_reason(exc, self._flags)
        self._owner.connection_closed(self)
        if self._handler is not None and self._flags & MADE:
            self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        assert self._handler is not None
        try:
            self._handler.connection_lost(self, exc)
        except Exception:
            log.exception("%s: handler connection_lost failed", self._peer_text(),
                          extra=self._extra())


def _framing_reason(error: str) -> str:
    """The close reason (muxsrv.stats) of a framing violation."""
    if error.startswith(("frame of", "line of", "line longer")) or "exceeds" in error:
        return "frame_too_large"
    return "bad_framing"


def _close_reason(exc: BaseException | None, flags: int) -> str:
    """Why a connection closed, when nothing said so before."""
    if exc is None:
        return "eof" if flags & EOF else "server"
    if isinstance(exc, OSError) and exc.errno in _QUIET_ERRNOS:
        return "reset"
    return "error"


def _handler_error(exc: Exception) -> str:
    """The error frame's text for a handler that raised (the traceback goes to the log)."""
    return f"handler error ({type(exc).__name__}); details are in the server log"
