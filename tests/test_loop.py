"""The event loop alone: timers, callbacks, descriptors, signals (in-process, no server)."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from time import monotonic

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxsrv.loop import EventLoop

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


@settings(max_examples=60, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 100_000), min_size=1, max_size=700),
    data=st.data(),
)
def test_due_timers_run_in_time_order_and_cancelled_ones_never(
    offsets: list[int], data: st.DataObject
) -> None:
    """Bugs caught: the heap rebuild after many cancellations (more than 256) losing or
    duplicating timers; a cancelled timer running; timers out of order."""
    cancel = data.draw(st.sets(st.integers(0, len(offsets) - 1)))
    lp = EventLoop()
    try:
        ran: list[int] = []
        base = monotonic() - 200  # every timer is already due
        timers = [lp.call_at(base + off / 1000, ran.append, i) for i, off in enumerate(offsets)]
        for i in cancel:
            timers[i].cancel()
            timers[i].cancel()  # twice is once
        lp.run_once(max_wait=0)
        expected = [i for i in range(len(offsets)) if i not in cancel]
        assert sorted(ran) == expected
        assert [offsets[i] for i in ran] == sorted(offsets[i] for i in expected)
        ran.clear()
        lp.run_once(max_wait=0)
        assert ran == []  # nothing left over to run twice
    finally:
        lp.close()


def test_cancelled_timers_do_not_pile_up_in_memory(loop: EventLoop) -> None:
    """Bug caught: cancelled timers kept until they are due (an hour's worth of
    per-request timeouts, each cancelled at once, held for the hour)."""
    far = loop.time() + 3600
    tracemalloc.start()
    try:
        loop.call_at(far, print).cancel()  # warm up
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            loop.call_at(far + i, print).cancel()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 20_000 * 10, f"{kept} bytes kept by 20,000 cancelled timers"


def test_mass_cancellation_rebuilds_the_heap_and_loses_nothing(loop: EventLoop) -> None:
    rng = random.Random(5)
    ran: list[int] = []
    base = monotonic() - 200
    whens = [rng.randrange(100_000) for _ in range(600)]
    timers = [loop.call_at(base + w / 1000, ran.append, i) for i, w in enumerate(whens)]
    cancel = set(rng.sample(range(600), 400))
    for i in cancel:
        timers[i].cancel()
    loop.run_once(max_wait=0)
    keep = [i for i in range(600) if i not in cancel]
    assert sorted(ran) == keep
    assert [whens[i] for i in ran] == sorted(whens[i] for i in keep)


def test_a_timer_can_cancel_later_timers(loop: EventLoop) -> None:
    ran: list[str] = []
    late = [loop.call_later(0.0, ran.append, f"late{i}") for i in range(300)]

    def cancel_all() -> None:
        ran.append("canceller")
        for t in late:
            t.cancel()  # 300 cancellations from inside run_once: the heap is rebuilt

    loop.call_at(monotonic() - 1, cancel_all)
    loop.run_until(lambda: False, 0.05)
    assert ran == ["canceller"]


def test_a_cancelled_callback_is_let_go_at_once(loop: EventLoop) -> None:
    """Bug caught: a cancelled timer keeping its callback's object alive until it is due
    (a finished command's whole output, held for --exec-timeout after its reply left)."""

    class Owner:
        def on_timeout(self) -> None:
            raise AssertionError("cancelled, yet it ran")

    timer_owner, soon_owner = Owner(), Owner()
    gone = [weakref.ref(timer_owner), weakref.ref(soon_owner)]
    loop.call_later(3600, timer_owner.on_timeout).cancel()
    loop.call_soon(soon_owner.on_timeout).cancel()
    del timer_owner, soon_owner
    assert [ref() for ref in gone] == [None, None]
    loop.run_once(max_wait=0)


def test_call_later_waits(loop: EventLoop) -> None:
    """Bug caught: a timer run before its time (or never)."""
    start = monotonic()
    fired: list[float] = []
    loop.call_later(0.2, lambda: fired.append(monotonic()))
    assert loop.run_until(lambda: bool(fired), 5)
    assert fired[0] - start >= 0.2


def test_call_soon_is_fifo_and_does_not_starve(loop: EventLoop) -> None:
    """Bug caught: a callback that schedules itself starving the select (an endless turn)."""
    order: list[int] = []

    def again() -> None:
        order.append(0)
        loop.call_soon(again)

    loop.call_soon(order.append, 1)
    loop.call_soon(again)
    loop.call_soon(order.append, 2)
    loop.run_once()
    assert order == [1, 0, 2]
    loop.run_once()
    assert order == [1, 0, 2, 0]


def test_failing_callback_is_logged_and_the_loop_goes_on(
    loop: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("callback failed")

    ran: list[str] = []
    loop.call_soon(boom)
    loop.call_later(0, boom)
    loop.call_soon(ran.append, "after")
    with caplog.at_level(logging.ERROR, logger="muxsrv"):
        loop.run_until(lambda: bool(ran), 1)
        loop.run_once(max_wait=0.01)
    assert ran == ["after"]
    assert caplog.text.count("RuntimeError: callback failed") == 2


def test_readers_and_writers(loop: EventLoop) -> None:
    """Bug caught: reader and writer on one descriptor clobbering each other's registration."""
    a, b = socket.socketpair()
    with a, b:
        events: list[str] = []
        loop.add_reader(a.fileno(), lambda: events.append("read"))
        loop.add_writer(a.fileno(), lambda: events.append("write"))
        assert loop.watched_fds == 1
        loop.run_once(max_wait=1)
        assert events == ["write"]  # writable at once, nothing to read yet
        loop.remove_writer(a.fileno())
        events.clear()
        b.send(b"x")
        loop.run_once(max_wait=1)
        assert events == ["read"]
        assert loop.remove_reader(a.fileno()) is True
        assert loop.remove_reader(a.fileno()) is False
        assert loop.watched_fds == 0


def test_signal_wakes_a_loop_with_nothing_to_do(loop: EventLoop) -> None:
    """Bug caught: a signal handled only when select() next returns on its own (SIGTERM
    ignored by an idle server)."""
    fired: list[float] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: fired.append(monotonic()))
    # Sent while the loop is blocked in select() (from a thread, so not run at once).
    sender = threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGUSR1))
    start = monotonic()
    sender.start()
    try:
        # No timers, no descriptors: only the wake-up socket can end this select early.
        loop.run_once(max_wait=5)
    finally:
        sender.join()
    assert fired and fired[0] - start < 2


def test_close_restores_signal_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    lp = EventLoop()
    lp.add_signal_handler(signal.SIGUSR2, lambda: None)
    assert signal.getsignal(signal.SIGUSR2) is not before
    lp.close()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_run_until_is_bounded(loop: EventLoop) -> None:
    start = time.monotonic()
    assert loop.run_until(lambda: False, 0.1) is False
    assert 0.1 <= time.monotonic() - start < 2
