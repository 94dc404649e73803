"""Drive a real connection with no network and no real time.

In the spirit of Twisted's ``StringTransport`` and Netty's ``EmbeddedChannel``:
a :class:`FakeSocket` is scripted by the test (what the peer sends, in which
pieces; how many bytes ``send`` takes; EOF; a reset), a :class:`FakeSelector`
reports it ready exactly when it is, and a :class:`FakeClock` moves only when
the loop would otherwise wait.  The loop and the connection are the real ones
(``EventLoop(selector=, clock=)``), so a test of the harness is a test of
the server's own state machine, deterministic from the first byte to the last::

    h = Harness(MyHandler)               # a handler class, or function=f
    h.peer_sends(frame(b"hi"))           # one segment; split them as you like
    h.run()                              # until nothing more can happen now
    assert h.replies() == [b"HI"]
    h.advance(30)                        # time passes: timers fire

``check_handler`` (from :mod:`muxsrv.checks`) runs all of that in every
variant at once.

What is not modelled: the clock does not move during a turn of the loop, so a
``call_later(0, ...)`` made by a timer runs in that same turn (with a real
clock, on the next); a handler that re-arms a 0-delay timer forever keeps
``run()`` from settling.  The peer cannot close with unread data (a reset
after FIN): it shuts down, or it resets.
"""

from __future__ import annotations

import errno
import selectors
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

from .auth import Gate
from .codec import MAX_FRAME_LIMIT, Buffer
from .connection import Connection
from .framing import LengthDecoder, make_decoder
from .handler import HandlerFactory, HandlerFunction
from .length import encode_length
from .loop import EVENT_READ, EVENT_WRITE, EventLoop
from .proxying import Proxying
from .staged import StagedConnection
from .stages import Stage
from .stats import Histogram

if TYPE_CHECKING:  # at run time through __getattr__ (muxsrv.checks imports this module)
    from .checks import HandlerCheckFailed, check_handler

__all__ = [
    "FakeClock",
    "FakeLoop",
    "FakeSelector",
    "FakeSocket",
    "HandlerCheckFailed",
    "Harness",
    "check_handler",
    "frame",
]

#: The most buffers one ``sendmsg`` takes on Linux.
IOV_MAX = 1024


def frame(payload: bytes) -> bytes:
    """``payload`` as one length-framed message."""
    out: list[Buffer] = []
    encode_length(out, payload)
    return b"".join(out)


class FakeClock:
    """A monotonic clock that moves only when told (or when the loop would sleep)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class FakeSocket:
    """A connected, non-blocking socket whose peer is the test.

    ``recv`` hands out the segments given to ``peer_sends``, one per call (a
    segment larger than the call asks for is split, never two joined);
    ``send`` takes at most ``capacity`` bytes (None: everything) and raises
    ``BlockingIOError`` at 0.  Every call after ``close`` is counted in
    ``used_after_close`` (a test asserts it stays 0).
    """

    _next_fd = 10_000

    def __init__(self, peer: Any = ("127.0.0.1", 40000)) -> None:
        self._segments: deque[bytes] = deque()
        self._eof = False
        self._reset = False
        self._peer = peer
        #: Bytes ``send`` may still take (None: no limit).
        self.capacity: int | None = None
        #: The most one ``send`` call takes (None: no limit); 1 for a trickling transport.
        self.max_send: int | None = None
        #: Everything sent, as the peer would read it.
        self.sent = bytearray()
        #: Bytes offered to ``send``/``sendmsg`` in all (a measure of copying).
        self.offered = 0
        self.send_calls = 0
        self.shut_wr = False
        self.closed = False
        self.used_after_close = 0
        FakeSocket._next_fd += 1
        self._fd = FakeSocket._next_fd

    # -- the test's side ---------------------------------------------------

    def peer_sends(self, *segments: bytes) -> None:
        """Bytes arriving from the peer, each argument one segment."""
        self._segments.extend(segment for segment in segments if segment)

    def peer_shuts_down(self) -> None:
        """The peer's EOF (after the segments already given)."""
        self._eof = True

    def peer_resets(self) -> None:
        """The next recv or send fails with ECONNRESET."""
        self._reset = True

    def allow(self, nbytes: int | None) -> None:
        """Let ``send`` take ``nbytes`` more (None: no limit from now on)."""
        if nbytes is None or self.capacity is None:
            self.capacity = nbytes
        else:
            self.capacity += nbytes

    @property
    def readable(self) -> bool:
        return bool(self._segments) or self._eof or self._reset

    @property
    def writable(self) -> bool:
        return self._reset or self.capacity is None or self.capacity > 0

    # -- the socket API the server uses --------------------------------------

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def getpeername(self) -> Any:
        self._check()
        return self._peer

    def recv(self, bufsize: int) -> bytes:
        self._check()
        if self._reset:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        if not self._segments:
            if self._eof:
                return b""
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        segment = self._segments.popleft()
        if len(segment) > bufsize:
            self._segments.appendleft(segment[bufsize:])
            segment = segment[:bufsize]
        return segment

    def send(self, data: Buffer) -> int:
        return self.sendmsg([data])

    def sendmsg(self, buffers: Iterable[Buffer]) -> int:
        self._check()
        if self._reset:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        buffers = list(buffers)
        if len(buffers) > IOV_MAX:
            raise OSError(errno.EMSGSIZE, "Message too long")  # as Linux refuses it
        data = b"".join(buffers)
        self.send_calls += 1
        self.offered += len(data)
        if self.shut_wr:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        n = len(data) if self.capacity is None else min(len(data), self.capacity)
        if self.max_send is not None:
            n = min(n, self.max_send)
        if n == 0 and data:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        if self.capacity is not None:
            self.capacity -= n
        self.sent += data[:n]
        return n

    def shutdown(self, how: int) -> None:
        self._check()
        self.shut_wr = True

    def close(self) -> None:
        self.closed = True

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def _check(self) -> None:
        if self.closed:
            self.used_after_close += 1
            raise OSError(errno.EBADF, "Bad file descriptor")


class FakeSelector(selectors.BaseSelector):
    """Reports fake sockets ready when they are; real descriptors never.

    When nothing is ready and the loop would wait, ``select`` moves the clock
    to the end of the wait (the next timer), but never past ``until``; with
    nothing to wait for before then, it records that the loop is settled
    (``settled``) and returns at once.
    """

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self._keys: dict[Any, selectors.SelectorKey] = {}
        #: The last select found nothing to do now (no events, no callbacks).
        self.settled = False
        #: How far a wait may move the clock (None: not at all, a wait settles).
        self.until: float | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if fileobj in self._keys:
            raise KeyError(f"{fileobj!r} is already registered")
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = self._keys[fileobj]._replace(events=events, data=data)
        self._keys[fileobj] = key
        return key

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = []
        for key in list(self._keys.values()):
            sock = key.fileobj
            if not isinstance(sock, FakeSocket):
                continue
            mask = (EVENT_READ if key.events & EVENT_READ and sock.readable else 0) | (
                EVENT_WRITE if key.events & EVENT_WRITE and sock.writable else 0
            )
            if mask:
                ready.append((key, mask))
        self.settled = False
        if not ready and timeout != 0:
            now, until = self._clock.now, self.until
            if until is not None and now < until:
                self._clock.advance(until - now if timeout is None else min(timeout, until - now))
            else:
                self.settled = True
        return ready

    def close(self) -> None:
        self._keys.clear()


class FakeLoop:
    """The real :class:`EventLoop` on a :class:`FakeSelector` and a :class:`FakeClock`.

    ``run`` turns it until nothing more can happen without time passing;
    ``advance`` lets time pass, firing timers on the way.  :class:`Harness`
    is one with a connection on it; on its own it drives anything else a test
    puts on the loop (the UDP endpoint, outbound connections).
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.selector = FakeSelector(self.clock)
        self.loop = EventLoop(selector=self.selector, clock=self.clock)

    def run(self, max_turns: int = 1_000_000) -> int:
        """Turn the loop until nothing more happens without time passing; the turns."""
        for turn in range(1, max_turns + 1):
            self.loop.run_once()
            if self.selector.settled:
                return turn
        raise AssertionError(f"the loop did not settle in {max_turns} turns")

    def turn(self) -> None:
        """Exactly one turn of the loop (a wake-up), with no waiting."""
        self.loop.run_once(max_wait=0)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, firing timers on the way, then settle."""
        self.selector.until = self.clock.now + seconds
        try:
            self.run()
        finally:
            self.selector.until = None

    def close(self) -> None:
        """Release the loop (its wake-up socket pair)."""
        self.loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Harness(FakeLoop):
    """One real :class:`Connection` on a real loop, over a fake socket and clock.

    Give it a handler class (or any factory of handler instances), or a
    function handler as ``function``.  The harness is the connection's owner: ``closed`` tells
    whether the connection has ended.  With a :class:`~muxsrv.auth.Gate` (``gate``) the
    connection is checked and gated as the server would (``peer``: its address; share a
    ``clock`` between harnesses to see time pass for a gate's ledger).
    """

    def __init__(
        self,
        handler: HandlerFactory | None = None,
        *,
        function: HandlerFunction | None = None,
        framing: str = "length",
        max_frame: int = 16 * 1024 * 1024,
        stages: list[Stage] | None = None,
        gate: Gate | None = None,
        peer: Any = ("127.0.0.1", 40000),
        clock: FakeClock | None = None,
        proxying: Proxying | None = None,
    ) -> None:
        if (handler is None) == (function is None):
            raise TypeError("Harness takes a handler factory or a function, not both")
        super().__init__(clock)
        self.sock = FakeSocket(peer)
        #: How many times the connection told its owner it closed (0 or 1).
        self.closed = 0
        #: The latency histogram the connection adds to (as a server's).
        self.latency = Histogram()
        self._gate = gate
        self._proxying = proxying
        self.handler = handler() if handler is not None else None
        sock: Any = self.sock  # a socket as far as the connection can tell
        # As the server does: protected mode and lock-outs turn the peer away at once.
        # With a PROXY header (proxying), they wait for the header's address.
        refusal = None
        if gate is not None and proxying is None:
            refusal = gate.refusal(peer, self.clock.now)
        if refusal is not None:
            self.handler = None
        gated = gate.stage(self.loop, peer) if gate is not None and refusal is None else None
        if gated is not None:
            stages = [*(stages or ()), gated]
        header = None
        if proxying is not None:
            header = proxying.stage(
                peer, None if gate is None else lambda p: gate.refusal(p, self.clock.now))
            stages = [header, *(stages or ())]
        kind = StagedConnection if stages else Connection
        self.conn = kind(self, sock, self.sock.getpeername(),
                         make_decoder(framing, max_frame), function, self.handler, stages)
        self._client = LengthDecoder(MAX_FRAME_LIMIT, accept_errors=True)
        self._read = 0
        self.conn.start()
        if refusal is not None:
            self.conn.refuse(refusal)
        if proxying is not None and header is not None:
            proxying.arm(self.loop, self.conn, header)
        if gate is not None and gated is not None:
            gate.arm(self.loop, self.conn, gated)

    # -- the owner's side ------------------------------------------------------

    def connection_closed(self, conn: Connection) -> None:
        self.closed += 1
        if self._gate is not None:
            self._gate.forget(conn)
        if self._proxying is not None:
            self._proxying.forget(conn)

    # -- driving -------------------------------------------------------------

    def peer_sends(self, *segments: bytes) -> None:
        self.sock.peer_sends(*segments)


    # -- what the peer got -----------------------------------------------------

    def replies(self) -> list[bytes]:
        """Length-framed messages received since the last call (ErrorFrame for errors)."""
        data = bytes(self.sock.sent[self._read:])
        self._read = len(self.sock.sent)
        return self._client.feed(data) + _drain(self._client)


def __getattr__(name: str) -> Any:
    # The conformance check lives in muxsrv.checks (which imports this module).
    if name in ("check_handler", "HandlerCheckFailed"):
        from . import checks
        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _drain(decoder: LengthDecoder) -> list[bytes]:
    """Messages a client decoder still holds after a large feed (batches)."""
    out: list[bytes] = []
    while decoder.more:
        out += decoder.feed(b"")
    return out
