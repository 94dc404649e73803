"""The event loop: one thread, one selector, timers, and nothing else.

How it works
------------
Every file descriptor the server cares about is registered with one
``selectors.DefaultSelector`` (epoll on Linux), with an object as its ``data``
that has a ``handle_event(mask)`` method (an :class:`EventSource`).  Only the
loop touches the selector: others call ``register``/``modify``/``unregister``.
The selector and the clock can be given (``muxsrv.testing`` drives a real
loop over fake sockets and a fake clock).  One turn of the loop:

1. ``select()`` with a timeout that reaches the earliest timer (0 when
   callbacks are ready, no limit when there is nothing to wait for);
2. read the clock once (``loop.now``) for everything this turn does;
3. call ``handle_event(mask)`` for every ready descriptor;
4. if a tally counted something (``add_tally``: the latency of the replies sent
   in full by the read that brought their messages), read the clock once and
   settle it;
5. run the timers that are due, then the callbacks queued with ``call_soon``.

Signals arrive through ``signal.set_wakeup_fd`` on a socket pair, so a SIGTERM
wakes ``select()`` at once; its handler runs as an ordinary loop callback.

Design rules (what must never be added here)
--------------------------------------------
* No blocking call of any kind: no ``sleep``, no blocking ``recv``, no
  ``wait``.  A callback that blocks stalls every client of the server.
* No knowledge of connections, framing or handlers: the loop moves events to
  objects and runs timers.  Connections live in ``connection.py``, the
  accept logic in ``server.py``; ``connect`` only hands over to
  ``outbound.py`` (imported on first use: this module never imports a
  connection), which keeps the loop's outbound connections in ``_connector``.
* No threads.  ``call_soon`` is for the loop's own thread (and signal handlers,
  which Python runs on it).  The one door for another thread is
  ``call_soon_threadsafe`` (a test stopping a server it runs on a thread):
  it queues the callback and writes a byte to the wake-up socket.
* A failing callback is logged and forgotten; it never stops the loop.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import selectors
import signal
import socket
from collections import deque
from collections.abc import Callable
from time import monotonic
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from .handler import Conn, Handler

__all__ = ["EventLoop", "EventSource", "Handle", "Timer"]

log = logging.getLogger("muxsrv.loop")

EVENT_READ: Final = selectors.EVENT_READ
EVENT_WRITE: Final = selectors.EVENT_WRITE

#: Rebuild the timer heap once this many cancelled timers sit in it.
_CANCELLED_REBUILD: Final = 256


class EventSource(Protocol):
    """What the loop calls when a registered descriptor is ready."""

    def handle_event(self, mask: int) -> None: ...


class Tally(Protocol):
    """Something counted during a turn and settled once at its end (``add_tally``)."""

    turn: int

    def turn_ended(self, seconds: float) -> None: ...


def _cancelled() -> None:
    """What a cancelled handle holds instead of its callback."""


class Handle:
    """A callback scheduled on the loop; ``cancel()`` stops it from running.

    Cancelling also lets go of the callback and its arguments: a cancelled timer
    stays in the heap until it is due or the heap is rebuilt, and must not keep
    what its callback refers to alive meanwhile (a finished command's output).
    """

    __slots__ = ("_args", "_callback", "cancelled")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._callback = callback
        self._args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._callback, self._args = _cancelled, ()

    def _run(self) -> None:
        try:
            self._callback(*self._args)
        except Exception:
            log.exception("error in loop callback %r", self._callback)


class Timer(Handle):
    """A callback due at ``when`` (on the loop's monotonic clock)."""

    __slots__ = ("_loop", "when")

    def __init__(
        self, when: float, callback: Callable[..., object], args: tuple[Any, ...], loop: EventLoop
    ) -> None:
        super().__init__(callback, args)
        self.when = when
        self._loop: EventLoop | None = loop  # None once it left the heap

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._callback, self._args = _cancelled, ()
            if self._loop is not None:
                self._loop._timer_cancelled()

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class _FdWatcher:
    """Reader and writer callbacks for one descriptor registered by a handler."""

    __slots__ = ("reader", "writer")

    def __init__(self) -> None:
        self.reader: Callable[[], object] | None = None
        self.writer: Callable[[], object] | None = None

    def handle_event(self, mask: int) -> None:
        if mask & EVENT_READ and self.reader is not None:
            self.reader()
        if mask & EVENT_WRITE and self.writer is not None:
            self.writer()

    @property
    def mask(self) -> int:
        return (EVENT_READ if self.reader else 0) | (EVENT_WRITE if self.writer else 0)


class _Waker:
    """The read end of the signal wake-up socket pair: drain it and move on."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def handle_event(self, mask: int) -> None:
        try:
            while self.sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass


class EventLoop:
    """A selectors loop with timers; see the module docstring."""

    def __init__(
        self,
        selector: selectors.BaseSelector | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._clock = clock
        #: The clock itself (``time()`` without the method call, for the rare path).
        self.clock = clock
        #: Per-turn tallies (``add_tally``): read at the end of every turn that had events.
        self._tallies: list[Tally] = []
        #: The clock reading for the current turn of the loop.
        self.now = clock()
        self._timers: list[Timer] = []
        self._cancelled = 0
        self._ready: deque[Handle] = deque()
        self._watchers: dict[int, _FdWatcher] = {}
        self._stopping = False
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._selector.register(self._waker_r, EVENT_READ, _Waker(self._waker_r))
        self._old_wakeup_fd: int | None = None
        self._signals: dict[int, Any] = {}
        #: ``outbound.Connector``: the connections ``connect`` opened (made on first use).
        self._connector: object = None

    # -- time and callbacks ------------------------------------------------

    def time(self) -> float:
        return self._clock()

    def add_tally(self, tally: Tally) -> None:
        """Have ``tally.turn_ended(seconds)`` called after every turn its ``turn`` is not 0.

        ``seconds``: from the turn's clock reading (``now``) to the end of its
        events, one clock read for all tallies; the tally resets ``turn`` itself.
        """
        if tally not in self._tallies:  # (identity: a tally has no __eq__)
            self._tallies.append(tally)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Handle:
        handle = Handle(callback, args)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> Handle:
        """``call_soon`` from another thread: wakes the loop if it waits in ``select``."""
        handle = self.call_soon(callback, *args)  # deque.append is atomic
        # A full buffer holds wake-ups enough already; a closed one: the loop is gone.
        with contextlib.suppress(OSError):
            self._waker_w.send(b"\0")
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(self._clock() + max(delay, 0.0), callback, *args)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(when, callback, args, self)
        heapq.heappush(self._timers, timer)
        return timer

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled > _CANCELLED_REBUILD and self._cancelled * 2 > len(self._timers):
            for t in self._timers:
                if t.cancelled:
                    t._loop = None
            # In place: run_once holds a reference to this very list.
            self._timers[:] = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    # -- the selector (nobody else touches it) -------------------------------

    def register(self, fileobj: Any, mask: int, source: EventSource) -> None:
        """Call ``source.handle_event(mask)`` when ``fileobj`` is ready for ``mask``."""
        self._selector.register(fileobj, mask, source)

    def modify(self, fileobj: Any, mask: int, source: EventSource) -> None:
        self._selector.modify(fileobj, mask, source)

    def unregister(self, fileobj: Any) -> None:
        self._selector.unregister(fileobj)

    def is_registered(self, fileobj: Any) -> bool:
        return fileobj in self._selector.get_map()

    # -- descriptors watched for handlers ----------------------------------

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (until ``remove_reader``)."""
        self._watch(fd, "reader", callback)

    def remove_reader(self, fd: int) -> bool:
        return self._watch(fd, "reader", None)

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (until ``remove_writer``)."""
        self._watch(fd, "writer", callback)

    def remove_writer(self, fd: int) -> bool:
        return self._watch(fd, "writer", None)

    def _watch(self, fd: int, role: str, callback: Callable[[], object] | None) -> bool:
        watcher = self._watchers.get(fd)
        if watcher is None:
            if callback is None:
                return False
            watcher = self._watchers[fd] = _FdWatcher()
        old = watcher.mask
        setattr(watcher, role, callback)
        new = watcher.mask
        if new == old:
            return True
        if old == 0:
            self._selector.register(fd, new, watcher)
        elif new == 0:
            self._selector.unregister(fd)
            del self._watchers[fd]
        else:
            self._selector.modify(fd, new, watcher)
        return True

    @property
    def watched_fds(self) -> int:
        """How many descriptors handlers are still watching."""
        return len(self._watchers)

    # -- outbound connections ---------------------------------------------

    def connect(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        framing: str = "length",
        timeout: float | None = 10.0,
        max_frame: int = 16 * 1024 * 1024,
    ) -> Conn:
        """Connect to ``host:port`` without blocking; ``handler`` speaks on the connection.

        Returns the connection at once (sends queue until it is connected);
        ``handler.connection_made`` follows once connected, and
        ``connection_lost(conn, exc)`` always comes, once, from the loop: a refused
        connect, the ``timeout`` (seconds; None: the kernel's), a reset.  ``host``
        is a numeric address or ``localhost`` (ValueError otherwise: a name
        lookup would block).  See ``muxsrv.outbound``.
        """
        from .outbound import connect

        return connect(self, host, port, handler, framing=framing, timeout=timeout,
                       max_frame=max_frame)

    # -- signals -----------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop when ``signum`` arrives."""

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            self.call_soon(callback)

        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(
                self._waker_w.fileno(), warn_on_full_buffer=False
            )
        self._signals[signum] = signal.signal(signum, on_signal)

    # -- running -----------------------------------------------------------

    def stop(self) -> None:
        """Leave ``run_forever`` at the end of the current turn."""
        self._stopping = True

    def run_forever(self) -> None:
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run turns until ``done()`` or ``timeout`` seconds; return ``done()``."""
        deadline = self._clock() + timeout
        self._stopping = False
        while not done() and not self._stopping:
            left = deadline - self._clock()
            if left <= 0:
                break
            self.run_once(max_wait=left)
        return done()

    def run_once(self, max_wait: float | None = None) -> None:
        timers = self._timers
        ready = self._ready
        timeout: float | None
        if ready:
            timeout = 0.0
        elif timers:
            timeout = max(0.0, timers[0].when - self._clock())
        else:
            timeout = None
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        events = self._selector.select(timeout)
        self.now = now = self._clock()
        for key, mask in events:
            try:
                key.data.handle_event(mask)
            except Exception:
                log.exception("error handling events for %r", key.data)
        end = 0.0
        for tally in self._tallies:  # (one, the server's latency: per turn, not per batch)
            if tally.turn:
                if not end:
                    end = self._clock()
                tally.turn_ended(end - now)
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            timer._loop = None
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer._run()
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle.cancelled:
                handle._run()

    def close(self) -> None:
        for signum, old in self._signals.items():
            signal.signal(signum, old)
        self._signals.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        self._selector.close()
        self._waker_r.close()
        self._waker_w.close()
