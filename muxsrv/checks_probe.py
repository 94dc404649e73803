"""Watching a handler while the check runs: what it sends, when, and how long it takes.

The check (``muxsrv.checks``) never changes what a handler does; it wraps it.
:class:`CheckedHandler` (or :func:`checked_function`) times every callback on
the real monotonic clock and notes exceptions; the ``conn`` it hands over is a
:class:`ConnProbe`, which notes the handler's own ``close()``/``abort()`` and
any send after it or after ``connection_lost``; that conn's loop is a
:class:`LoopProbe`, so timers and readers the handler registers are watched
the same way.  What went wrong is collected in one :class:`Probe` per run,
named by the message the handler was at; the check fails on the first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from .codec import Buffer
from .handler import Conn, Handler, HandlerFunction
from .loop import EventLoop

__all__ = ["CheckedHandler", "ConnProbe", "LoopProbe", "Probe", "checked_function"]


class Probe:
    """What one variant's handler did: the message it is at, and what it did wrong."""

    def __init__(self, messages: Sequence[bytes], limit: float) -> None:
        self.messages = messages
        self.limit = limit
        self.received = 0  # messages handed to the handler so far
        self.problems: list[str] = []
        self.lost = 0
        self.closed_by_handler = False

    def where(self) -> str:
        if not self.received:
            return "before any message"
        i = (self.received - 1) % len(self.messages)
        return f"message {i} ({self.messages[i]!r:.60})"

    def problem(self, text: str) -> None:
        self.problems.append(f"{text}, at {self.where()}")

    def timed(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:
            self.problem(f"{what} raised {type(exc).__name__}: {exc}")
            raise
        finally:
            took = time.perf_counter() - start
            if took > self.limit:
                self.problem(
                    f"{what} ran for {took * 1000:.0f} ms (more than "
                    f"{self.limit * 1000:.0f} ms: it blocks the loop)"
                )

    def wrap(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: self.timed(what, fn, *args)

    def check_send(self, what: str) -> None:
        if self.lost:
            self.problem(f"{what} after connection_lost")
        elif self.closed_by_handler:
            self.problem(f"{what} after the handler's own close()/abort()")


class LoopProbe:
    """The loop as the handler sees it: its timers and readers are watched too."""

    def __init__(self, loop: EventLoop, probe: Probe) -> None:
        self._loop = loop
        self._probe = probe

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Any:
        return self._loop.call_soon(self._probe.wrap("a call_soon callback", callback), *args)

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Any:
        return self._loop.call_later(delay, self._probe.wrap("a timer", callback), *args)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        return self._loop.call_at(when, self._probe.wrap("a timer", callback), *args)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._loop.add_reader(fd, self._probe.wrap(f"the reader of fd {fd}", callback))

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        self._loop.add_writer(fd, self._probe.wrap(f"the writer of fd {fd}", callback))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


class ConnProbe:
    """The :class:`~muxsrv.handler.Conn` handed to the handler: notes close and late sends."""

    def __init__(self, conn: Conn, probe: Probe) -> None:
        self._conn = conn
        self._probe = probe
        self._loop = LoopProbe(conn.loop, probe)

    @property
    def peer(self) -> Any:
        return self._conn.peer

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        return self._conn.peer_cert

    @property
    def loop(self) -> EventLoop:
        return cast(EventLoop, self._loop)

    @property
    def framing(self) -> str:
        return self._conn.framing

    @property
    def closing(self) -> bool:
        return self._conn.closing

    def send(self, payload: Buffer, *more: Buffer) -> None:
        self._probe.check_send("send")
        self._conn.send(payload, *more)

    def send_error(self, text: str) -> None:
        self._probe.check_send("send_error")
        self._conn.send_error(text)

    def close(self) -> None:
        self._probe.closed_by_handler = True
        self._conn.close()

    def abort(self) -> None:
        self._probe.closed_by_handler = True
        self._conn.abort()

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def work_started(self) -> None:
        self._conn.work_started()

    def peer_validated(self) -> None:
        self._conn.peer_validated()

    def work_done(self) -> None:
        self._conn.work_done()


class CheckedHandler(Handler):
    """Wraps one handler instance: every callback timed, its conn a :class:`ConnProbe`."""

    def __init__(self, inner: Handler, probe: Probe) -> None:
        self._inner = inner
        self._probe = probe
        self._proxy: ConnProbe | None = None

    def _conn(self, conn: Conn) -> Conn:
        if self._proxy is None:
            self._proxy = ConnProbe(conn, self._probe)
        return self._proxy

    def connection_made(self, conn: Conn) -> None:
        self._probe.timed("connection_made", self._inner.connection_made, self._conn(conn))

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self._probe.received += 1
        self._probe.timed(
            "message_received", self._inner.message_received, self._conn(conn), payload
        )

    def eof_received(self, conn: Conn) -> None:
        self._probe.timed("eof_received", self._inner.eof_received, self._conn(conn))

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        try:
            self._probe.timed("connection_lost", self._inner.connection_lost, self._conn(conn), exc)
        finally:
            self._probe.lost += 1
            if self._probe.lost > 1:
                self._probe.problem("connection_lost ran twice")

    def pause_writing(self, conn: Conn) -> None:
        self._probe.timed("pause_writing", self._inner.pause_writing, self._conn(conn))

    def resume_writing(self, conn: Conn) -> None:
        self._probe.timed("resume_writing", self._inner.resume_writing, self._conn(conn))


def checked_function(fn: HandlerFunction, probe: Probe) -> HandlerFunction:
    def checked(payload: bytes) -> Buffer | None:
        probe.received += 1
        reply: Buffer | None = probe.timed("the handler", fn, payload)
        return reply

    return checked
