"""Limits kept by one periodic sweep: the whole-message deadline (``--frame-timeout``).

Why a sweep, and what it costs
------------------------------
An inactivity timeout cannot stop a client that sends a byte every T/2 of a
message it never finishes (slowloris): every byte is activity.  The deadline
that can is "a message must be complete within T of its first byte", as
HAProxy's ``timeout http-request`` and nginx's ``client_header_timeout``.

Nothing here runs per message or per read.  One timer for the whole server
fires every ``interval`` (at most 1 s, at most T/8) and walks the open
connections once, asking each for its :meth:`~muxsrv.connection.Connection.
partial_mark`: None while it holds no unfinished message the client owes (the
common case: a request/response client between messages), else its decoder's
``completions`` count.  That count is bumped by the decoder only when a
message held over from an earlier read is finished, at most once per read
(``muxsrv.length._finish_tail``, ``body_received``; the line decoder's held
line), never on the per-message path: while it stands still and bytes are
held, it is the same message, however many bytes were added to it.

The sweep keeps ``{connection: (first seen, mark)}`` for the connections it
found mid-message, rebuilt on every pass (a connection that closed, or
finished its message, simply drops out: nothing to forget, nothing to leak).
A message is timed from the first pass that saw it unfinished, which is never
before its first byte: a message completed within T is never cut, and one
that is not is closed between T and T + 2 intervals after its first byte.

A connection whose input the server itself holds back (the handler paused
reading, messages still to hand over) is not timed meanwhile: its client
cannot finish a message the server does not read.  Raw framing has no
messages to finish (every ``recv`` is one): the deadline does not apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .connection import Connection
    from .loop import EventLoop, Timer

__all__ = ["DEFAULT_FRAME_TIMEOUT", "LimitSweep", "sweep_interval"]

log = logging.getLogger("muxsrv")

#: Seconds a message may take from its first byte to its last: HAProxy's and
#: nginx's request-header deadlines are of this order, and a 16 MiB frame
#: needs only ~4.5 Mbit/s to arrive within it.
DEFAULT_FRAME_TIMEOUT: Final = 30.0
#: The sweep's period at most: deadlines are kept to within about this much.
MAX_INTERVAL: Final = 1.0


def sweep_interval(*durations: float) -> float:
    """The sweep's period for these deadlines (0: off): at most 1 s, at most 1/8 of each."""
    active = [d for d in durations if d > 0]
    return min([MAX_INTERVAL, *(max(0.01, d / 8) for d in active)])


class LimitSweep:
    """One timer that walks the connections and closes those past a limit."""

    def __init__(
        self,
        loop: EventLoop,
        conns: Callable[[], Iterable[Connection]],
        *,
        frame_timeout: float = 0.0,
    ) -> None:
        self._loop = loop
        self._conns = conns
        self.frame_timeout = frame_timeout
        self.interval = sweep_interval(frame_timeout)
        self._timer: Timer | None = None
        #: Connections seen mid-message: when first seen so, and the mark then.
        self._partial: dict[Connection, tuple[float, int]] = {}

    @property
    def active(self) -> bool:
        return self.frame_timeout > 0

    def start(self) -> None:
        if self.active and self._timer is None:
            self._timer = self._loop.call_later(self.interval, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._partial.clear()

    def _sweep(self) -> None:
        self._timer = self._loop.call_later(self.interval, self._sweep)
        now = self._loop.now
        if self.frame_timeout > 0:
            self._frame_deadlines(now)

    def _frame_deadlines(self, now: float) -> None:
        timeout = self.frame_timeout
        seen = self._partial
        still: dict[Connection, tuple[float, int]] = {}
        late: list[Connection] = []
        for conn in self._conns():
            mark = conn.partial_mark()
            if mark is None:
                continue
            first = seen.get(conn)
            if first is None or first[1] != mark:
                still[conn] = (now, mark)  # a message not seen unfinished before
            elif now - first[0] >= timeout:
                late.append(conn)
            else:
                still[conn] = first
        self._partial = still
        for conn in late:  # (closing may change the collection walked above)
            conn.frame_timed_out(timeout)
