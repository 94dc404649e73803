"""``check_handler(..., real_loop=True)``: the check over a real loop and a socket pair.

A handler that needs real file descriptors (``exec``'s child processes, other
sockets) cannot run on the fake selector, which reports only fake sockets
ready.  Here the loop is the real :class:`~muxsrv.loop.EventLoop` (a real
selector, the monotonic clock) and the connection's socket is one end of
``socket.socketpair()``; the test holds the other end.

Every step waits for a condition with a deadline (``timeout`` seconds a
variant), never a fixed sleep: after each segment the loop turns until the
connection has read everything sent so far; a step is over when nothing is
owed (the input read, no output pending, no ``work_started`` without its
``work_done``); a variant is over when the connection closed after the
client's EOF, ``connection_lost`` ran and the handler's descriptors are gone.

What applies: replies that differ between splits (whole, each message in its
own segment, byte at a time, up to ``REAL_SPLITS`` two-way splits, seeded
random chunks, EOF after each message), replies out of order, exceptions,
callbacks longer than the bound, sends after ``close()`` or
``connection_lost``, ``connection_lost`` once.  What does not: the kernel
decides how much one ``send`` takes (no one-byte transport), a socket pair
cannot be reset, and a non-reading client is not modelled (no bound on
unread output).  A handler whose replies come from timers it does not cover
with ``work_started`` may be compared before they fire.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Sequence
from typing import Any

from .checks import REFERENCE, Checker
from .checks_probe import CheckedHandler, Probe, checked_function
from .codec import MAX_FRAME_LIMIT
from .connection import Connection
from .framing import LengthDecoder, make_decoder
from .loop import EventLoop
from .stats import Histogram
from .testing import _drain

__all__ = ["check_real"]

#: Two-way splits tried with real processes (each one a full run).
REAL_SPLITS = 8
#: Seeded random-chunk runs.
REAL_RANDOM_RUNS = 2
#: After a failed variant, how long the aborted handler may take to let go.
CLEANUP_TIMEOUT = 2.0


class RealHarness:
    """One real connection on a real loop over a socket pair; the test is the client."""

    def __init__(self, checker: RealChecker, variant: str) -> None:
        self.checker = checker
        self.variant = variant
        self.probe = Probe(checker.messages or [b""], checker.limit)
        self.loop = EventLoop()
        server, self.client = socket.socketpair()
        server.setblocking(False)
        self.client.setblocking(False)
        self.server = server
        self.closed = 0
        self.latency = Histogram()  # (a connection's owner keeps one)
        self.received = bytearray()
        self._seen = 0
        self._decoder: Any = (
            LengthDecoder(MAX_FRAME_LIMIT, accept_errors=True)
            if checker.framing == "length"
            else make_decoder(checker.framing, MAX_FRAME_LIMIT)
        )
        handler = None
        function = None
        if checker.function is not None:
            function = checked_function(checker.function, self.probe)
        else:
            factory = checker.factory
            assert factory is not None
            handler = CheckedHandler(factory(), self.probe)
        self.conn = Connection(
            self,
            server,
            ("127.0.0.1", 0),
            make_decoder(checker.framing, checker.max_frame),
            function,
            handler,
        )
        self.conn.start()

    # -- the owner's side ------------------------------------------------------

    def connection_closed(self, conn: Connection) -> None:
        self.closed += 1

    # -- driving ---------------------------------------------------------------

    def _read_client(self) -> None:
        while True:
            try:
                data = self.client.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            self.received += data

    def wait(self, done: Callable[[], bool], what: str) -> None:
        """Turn the loop until ``done()``; fail on a problem or after the timeout."""
        deadline = self.loop.time() + self.checker.timeout
        while True:
            self._read_client()
            if self.probe.problems:
                self.checker.fail(self.probe.problems[0], self.variant)
            if done():
                return
            left = deadline - self.loop.time()
            if left <= 0:
                self.checker.fail(
                    f"timed out after {self.checker.timeout:g} s waiting for "
                    f"{what}, at {self.probe.where()}",
                    self.variant,
                )
            self.loop.run_once(max_wait=min(left, 0.05))

    def _input_read(self) -> bool:
        if self.closed or self.server.fileno() < 0:
            return True
        readable, _, _ = select.select([self.server], [], [], 0)
        return not readable

    def _owes_nothing(self) -> bool:
        return bool(self.closed) or (self.conn.owes_nothing() and self.conn.pending == 0)

    def send(self, segment: bytes) -> None:
        """One segment, read by the connection before the next one is sent.

        Sent without blocking, between turns of the loop: a segment larger than
        the socket pair's buffers goes out as the connection reads it.
        """
        todo = memoryview(segment)

        def sent() -> bool:
            nonlocal todo
            while todo:
                try:
                    todo = todo[self.client.send(todo):]
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError:  # the connection closed: the rest is never read
                    return True
            return self._input_read()

        self.wait(sent, "the connection to read what was sent")

    def settle(self) -> None:
        self.wait(lambda: self._input_read() and self._owes_nothing(), "the replies")

    def finish(self) -> None:
        """EOF from the client; wait until the connection ended and the handler let go."""
        self.client.shutdown(socket.SHUT_WR)
        self.wait(lambda: bool(self.closed), "the connection to close after EOF")

        def released() -> bool:
            return bool(self.checker.factory is None or self.probe.lost) and (
                self.loop.watched_fds == 0
            )

        self.wait(released, "connection_lost and the handler's descriptors to go")

    def replies(self) -> list[bytes]:
        data = bytes(self.received[self._seen :])
        self._seen = len(self.received)
        got: list[bytes] = self._decoder.feed(data)
        if isinstance(self._decoder, LengthDecoder):
            got += _drain(self._decoder)
        return got

    def close(self) -> None:
        """Release everything; a variant that failed midway has its connection aborted
        first, so that the handler's ``connection_lost`` lets go of its children."""
        if not self.closed:
            self.conn.abort()
            self.loop.run_until(
                lambda: bool(self.closed)
                and bool(self.checker.factory is None or self.probe.lost)
                and self.loop.watched_fds == 0,
                CLEANUP_TIMEOUT,
            )
        self.loop.close()
        self.client.close()
        self.server.close()


class RealChecker(Checker):
    """The variants that mean something over a real socket pair."""

    max_frame = 16 * 1024 * 1024

    def __init__(
        self,
        handler: Any,
        messages: Sequence[bytes],
        framing: str,
        seed: int,
        max_callback_seconds: float,
        timeout: float,
    ) -> None:
        super().__init__(
            handler,
            messages,
            framing,
            seed,
            REAL_RANDOM_RUNS,
            REAL_SPLITS,
            max_callback_seconds,
            0.0,
            0,
        )
        self.timeout = timeout

    def run(
        self, variant: str, segments: Sequence[bytes], max_send: int | None = None
    ) -> tuple[list[bytes], int]:
        h = RealHarness(self, variant)
        try:
            h.settle()
            for segment in segments:
                h.send(segment)
            h.settle()
            h.finish()
            return h.replies(), len(h.received)
        finally:
            h.close()

    def lockstep(self, variant: str) -> tuple[list[bytes], list[str]]:
        h = RealHarness(self, variant)
        out: list[bytes] = []
        labels: list[str] = []

        def collect(label: str) -> None:
            got = h.replies()
            out.extend(got)
            labels.extend([label] * len(got))

        try:
            h.settle()
            collect("connection_made")
            for i, data in enumerate(self.encoded):
                h.send(data)
                h.settle()
                collect(f"message {i} ({self.messages[i]!r:.60})")
            h.finish()
            collect("EOF")
        finally:
            h.close()
        return out, labels

    def check(self) -> None:
        reference, _ = self.run(REFERENCE, [self.data])
        labels = self.check_stepped(reference)
        self.check_splits(reference, labels)
        self.check_eof_after_each(labels)


def check_real(
    handler: Any,
    messages: Sequence[bytes],
    *,
    framing: str,
    seed: int,
    max_callback_seconds: float,
    timeout: float,
) -> None:
    """``check_handler`` with ``real_loop=True``; see the module docstring."""
    RealChecker(handler, messages, framing, seed, max_callback_seconds, timeout).check()
