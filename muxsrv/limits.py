"""Limits on what a client can make the server hold: deadlines, budgets, counts.

``LimitSweep``: the limits kept by one periodic sweep, the whole-message
deadline (``--frame-timeout``) and the output limits (``--max-output``,
``--output-soft-limit``); ``InputBudget``: the bytes held for large
unfinished messages across all connections (``--max-buffered``);
``AddressCounts``: connections per client address (``--max-conns-per-ip``),
counted at admission, uncounted at close.

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

Output limits (Redis's ``client-output-buffer-limit``)
------------------------------------------------------
Back-pressure already stops reading from a client with more than
``HIGH_WATER`` of replies pending, so a client that sends requests and reads
nothing holds about 1 MiB.  What it cannot bound is output a handler queues
without input (timers, exec, streams) to a client that reads slowly or not at
all.  The hard limit (``--max-output``) is checked each time a connection's
queue grows, which happens only when the kernel did not take everything
(``Transport._output_grew``), and again by the sweep, so a connection that
receives nothing is caught too; past it the connection is dropped at once
(its queue cannot be delivered ahead of an error frame) and logged.  The soft
limit is only the sweep's: a connection found over it on every pass for
``--output-soft-seconds`` is dropped, as Redis drops a slow pub/sub reader.
The sweep keeps ``{connection: first seen over}`` for those over it, rebuilt
on every pass like the deadline's.

The input budget (``--max-buffered``)
-------------------------------------
What a connection holds of an unfinished message is at most a header and
4 KiB unless the message is large (``BODY_BUFFER_MIN``): then its body is
collected in pieces, each read asking for the rest of it (``want``).  The
budget counts only those bodies, and is asked only there, before each such
read (``Connection.handle_event``'s ``if want:`` branch, which existed
already): small messages, the per-message path, never meet it.  Over the
budget, a connection that would read more of a large body is stalled (it
stops reading; the kernel's window then stops its client).  The sweep
recounts what each counted connection holds (a finished body drops out),
and while the total is still over the budget it closes, with an error frame,
the stalled connections holding the most, largest first, until the total is
within it; then the others read again.  Connections sending small messages
are never stalled, so they keep being served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .connection import Connection
    from .loop import EventLoop, Timer

__all__ = [
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_SOFT_SECONDS",
    "AddressCounts",
    "InputBudget",
    "LimitSweep",
    "address_key",
    "sweep_interval",
]

log = logging.getLogger("muxsrv.limits")

#: Seconds a message may take from its first byte to its last: HAProxy's and
#: nginx's request-header deadlines are of this order, and a 16 MiB frame
#: needs only ~4.5 Mbit/s to arrive within it.
DEFAULT_FRAME_TIMEOUT: Final = 30.0
#: --max-output: a connection with more output queued than this is dropped.  Four
#: --max-frame replies at the default; a client this far behind is not reading.
DEFAULT_MAX_OUTPUT: Final = 64 * 1024 * 1024
#: --output-soft-seconds: over --output-soft-limit (off by default) this long: dropped.
DEFAULT_SOFT_SECONDS: Final = 60.0
#: --max-buffered: 16 uploads of the default --max-frame at once; beyond, memory is
#: an attacker's to take (50 connections announcing 16 MiB held 715 MiB unbounded).
DEFAULT_MAX_BUFFERED: Final = 256 * 1024 * 1024
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
        max_output: int = 0,
        soft_limit: int = 0,
        soft_seconds: float = 0.0,
        budget: InputBudget | None = None,
    ) -> None:
        self._loop = loop
        self._conns = conns
        self.frame_timeout = frame_timeout
        self.max_output = max_output
        self.soft_limit = soft_limit
        self.soft_seconds = soft_seconds
        self.budget = budget
        self.interval = sweep_interval(frame_timeout, soft_seconds if soft_limit else 0)
        self._timer: Timer | None = None
        #: Connections seen mid-message: when first seen so, and the mark then.
        self._partial: dict[Connection, tuple[float, int]] = {}
        #: Connections seen over the soft output limit: since when.
        self._over: dict[Connection, float] = {}

    @property
    def active(self) -> bool:
        return (self.frame_timeout > 0 or self.max_output > 0 or self.soft_limit > 0
                or self.budget is not None)

    def start(self) -> None:
        if self.active and self._timer is None:
            self._timer = self._loop.call_later(self.interval, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._partial.clear()
        self._over.clear()

    def _sweep(self) -> None:
        self._timer = self._loop.call_later(self.interval, self._sweep)
        now = self._loop.now
        if self.frame_timeout > 0:
            self._frame_deadlines(now)
        if self.max_output > 0 or self.soft_limit > 0:
            self._output_limits(now)
        if self.budget is not None:
            self.budget.sweep()

    def _output_limits(self, now: float) -> None:
        hard, soft, seconds = self.max_output, self.soft_limit, self.soft_seconds
        seen = self._over
        over: dict[Connection, float] = {}
        dropped: list[tuple[Connection, str]] = []
        for conn in self._conns():
            pending = conn.pending
            if hard and pending > hard:
                dropped.append((conn, f"over --max-output ({hard} bytes)"))
            elif soft and pending > soft:
                since = seen.get(conn, now)
                if now - since >= seconds:
                    dropped.append((conn, f"over --output-soft-limit ({soft} bytes) for "
                                          f"{seconds:g} s"))
                else:
                    over[conn] = since
        self._over = over
        for conn, limit in dropped:
            conn.output_over(limit)

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


# -- --max-buffered -------------------------------------------------------------------


class InputBudget:
    """Bytes held for large unfinished messages across all connections, and who is stalled."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._held: dict[Connection, int] = {}
        #: Stalled connections, in the order they were stalled.
        self._stalled: dict[Connection, None] = {}

    def admits(self, conn: Connection, held: int) -> bool:
        """``conn`` holds ``held`` bytes of a large message and would read more: may it?"""
        self.total += held - self._held.get(conn, 0)
        self._held[conn] = held
        if self.total <= self.limit:
            return True
        self._stalled[conn] = None
        conn.stall(True)
        return False

    def forget(self, conn: Connection) -> None:
        """``conn`` closed (or let go of its message)."""
        self.total -= self._held.pop(conn, 0)
        self._stalled.pop(conn, None)

    def sweep(self) -> None:
        """Recount; close the largest stalled holders while over; then let the rest read."""
        for conn in list(self._held):
            held = conn.large_partial()
            if held:
                self.total += held - self._held[conn]
                self._held[conn] = held
            else:
                self.forget(conn)
        if self.total > self.limit:
            for conn in sorted(self._stalled, key=self._held.__getitem__, reverse=True):
                conn.over_budget(self.limit)
                self.forget(conn)
                if self.total <= self.limit:
                    break
        if self.total <= self.limit:
            stalled, self._stalled = self._stalled, {}
            for conn in stalled:
                conn.stall(False)

    @property
    def stalled(self) -> int:
        return len(self._stalled)


# -- --max-conns-per-ip -------------------------------------------------------------


def address_key(peer: Any) -> str | None:
    """The client address a per-address limit counts by (None: not an IP peer)."""
    if not isinstance(peer, tuple) or not peer:
        return None  # a Unix socket: whoever may open it is on this host
    host = str(peer[0]).partition("%")[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # an IPv4 client on a dual-stack listener is the same client
    return host


class AddressCounts:
    """Connections open per client address, exact over every way a connection ends.

    A connection is counted when it is admitted (``add``) and uncounted when it
    closes (``forget``, from the server's ``connection_closed``, which every
    close path reaches exactly once); a connection never admitted is never
    uncounted.  Only addresses with a connection open are kept.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reason = f"too many connections from your address (limit {limit})"
        self._counts: dict[str, int] = {}
        self._keys: dict[Connection, str] = {}

    def full(self, peer: Any) -> bool:
        key = address_key(peer)
        return key is not None and self._counts.get(key, 0) >= self.limit

    def add(self, conn: Connection, peer: Any) -> None:
        key = address_key(peer)
        if key is not None and conn not in self._keys:
            self._keys[conn] = key
            self._counts[key] = self._counts.get(key, 0) + 1

    def forget(self, conn: Connection) -> None:
        key = self._keys.pop(conn, None)
        if key is not None:
            left = self._counts[key] - 1
            if left:
                self._counts[key] = left
            else:
                del self._counts[key]

    def count(self, peer: Any) -> int:
        key = address_key(peer)
        return self._counts.get(key, 0) if key is not None else 0

    def __len__(self) -> int:
        """Connections counted."""
        return len(self._keys)
