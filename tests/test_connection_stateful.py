"""Hypothesis explores interleavings of the connection state machine.

Over sequences of: messages arriving in any split, the peer's read capacity
changing, the handler pausing, resuming, sending from timers, closing and
aborting, EOF, time passing; after every step:

* the replies the peer has read are a prefix of the replies the handler sent
  while the connection was open, in order; the messages the handler got are a
  prefix of what the peer sent, in order;
* nothing touches the socket after it is closed; ``connection_lost`` runs at
  most once, never inside another callback;

and at the end, once the peer reads everything and shuts down: every reply
owed was delivered (unless the connection was aborted), every message sent
before a close was handed over, and the connection ended exactly once.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from muxsrv.handler import Conn, Handler
from muxsrv.testing import Harness, frame

pytestmark = pytest.mark.timeout(300)


class Model(Handler):
    """Echoes with a prefix; writes down what it sent while the connection was open."""

    def __init__(self) -> None:
        self.conn: Conn | None = None
        self.got: list[bytes] = []
        self.owed: list[bytes] = []  # every reply sent while open, in order
        self.lost = 0
        self.inside = False  # inside one of our callbacks
        self.plan: list[str] = []  # what to do on the next messages, besides echoing
        self.aborted = False
        self.closed = False  # by the handler (close or abort)
        #: Broken guarantees, noted here: the connection logs what callbacks raise.
        self.violations: list[str] = []

    def connection_made(self, conn: Conn) -> None:
        self.conn = conn

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if self.inside or self.lost:
            self.violations.append("message_received inside a callback or after lost")
        self.got.append(payload)
        self.push(b"r:" + payload)
        if self.plan:
            self.inside = True
            self.act(conn, self.plan.pop(0), len(self.got))
            self.inside = False

    def act(self, conn: Conn, what: str, n: int) -> None:
        if what == "pause":
            conn.pause_reading()
            conn.loop.call_later(0.5, conn.resume_reading)
        elif what == "work":  # a reply that comes later, from a timer
            conn.work_started()
            conn.loop.call_later(0.7, self.finish_work, conn, n)
        elif what == "close":
            self.closed = True
            conn.close()
        elif what == "abort":
            self.aborted = self.closed = True
            conn.abort()

    def finish_work(self, conn: Conn, n: int) -> None:
        if conn.closing and not self.closed:
            self.violations.append("closed while work was in progress")
        self.push(b"w%d" % n)
        conn.work_done()

    def push(self, reply: bytes) -> None:
        conn = self.conn
        if conn is not None and not conn.closing:
            self.inside = True
            conn.send(reply)
            self.inside = False
            self.owed.append(reply)

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        if self.inside:
            self.violations.append("connection_lost inside another callback")
        self.lost += 1


class ConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(Model)
        self.h.sock.capacity = 0
        handler = self.h.handler
        assert isinstance(handler, Model)
        self.model = handler
        self.sent: list[bytes] = []  # what the peer sent, in order
        self.read: list[bytes] = []  # replies the peer has read
        self.eof = False
        self.timers = 0

    @property
    def conn(self) -> Conn:
        assert self.model.conn is not None
        return self.model.conn

    @precondition(lambda self: not self.eof)
    @rule(payloads=st.lists(st.binary(max_size=40), min_size=1, max_size=12),
          cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6))
    def arrive(self, payloads: list[bytes], cuts: list[int]) -> None:
        stream = b"".join(frame(p) for p in payloads)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        self.h.peer_sends(*(stream[a:b] for a, b in pairwise(points)))
        self.sent += payloads

    @rule(n=st.one_of(st.none(), st.integers(min_value=0, max_value=300)))
    def peer_reads(self, n: int | None) -> None:
        self.h.sock.allow(n)
        if n is None:
            self.h.sock.capacity = 10**9

    @rule(what=st.sampled_from(["pause", "work", "close", "abort"]))
    def on_next_message(self, what: str) -> None:
        self.model.plan.append(what)

    @rule()
    def pause(self) -> None:
        self.conn.pause_reading()

    @rule()
    def resume(self) -> None:
        self.conn.resume_reading()

    @rule(delay=st.floats(min_value=0, max_value=3))
    def send_later(self, delay: float) -> None:
        self.timers += 1
        self.conn.loop.call_later(delay, self.model.push, b"t%d" % self.timers)

    @rule()
    def send_now(self) -> None:
        self.timers += 1
        self.model.push(b"n%d" % self.timers)

    @rule(what=st.sampled_from(["close", "abort", "pause"]), delay=st.floats(0, 3))
    def from_a_timer(self, what: str, delay: float) -> None:
        self.conn.loop.call_later(delay, self.model.act, self.conn, what, 0)

    @rule()
    def peer_shuts_down(self) -> None:
        self.eof = True
        self.h.sock.peer_shuts_down()

    @rule(seconds=st.floats(min_value=0, max_value=5))
    def time_passes(self, seconds: float) -> None:
        self.h.advance(seconds)

    @rule()
    def settle(self) -> None:
        self.h.run()

    @invariant()
    def in_order_and_once(self) -> None:
        self.read += self.h.replies()
        model = self.model
        assert self.read == model.owed[: len(self.read)]
        assert model.got == self.sent[: len(model.got)]
        assert self.h.sock.used_after_close == 0
        assert model.violations == []
        assert model.lost <= 1 and self.h.closed <= 1
        if model.lost:
            assert self.h.closed == 1

    def teardown(self) -> None:
        try:
            h = self.h
            h.sock.capacity = 10**9
            if self.model.conn is not None:
                self.conn.resume_reading()
            h.sock.peer_shuts_down()
            h.advance(60)
            self.in_order_and_once()
            model = self.model
            if not model.aborted:
                assert self.read == model.owed
                if not model.closed:
                    assert model.got == self.sent
            assert model.lost == 1 and h.closed == 1
        finally:
            self.h.close()


ConnectionMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_connection_state_machine = ConnectionMachine.TestCase
