"""A Connection in-process, on real loopback sockets: the write back-pressure callbacks.

No server process: the test drives the loop itself and reads the peer's side
between turns, so what the connection holds can be looked at on every turn.
"""

from __future__ import annotations

import time

import pytest
from support import Owner, loopback_pair

from muxsrv.connection import HIGH_WATER, Connection
from muxsrv.framing import make_decoder
from muxsrv.handler import Conn, Handler
from muxsrv.loop import EVENT_WRITE, EventLoop

pytestmark = pytest.mark.timeout(60)

REPLY = b"x" * (600 * 1024)
REPLIES = 200


class Producer(Handler):
    """Sends REPLIES replies on its own (from the loop), as long as writing is not paused."""

    def __init__(self) -> None:
        self.sent = 0
        self.paused = False
        self.trace: list[str] = []

    def connection_made(self, conn: Conn) -> None:
        self.conn = conn
        conn.loop.call_soon(self.produce)

    def produce(self) -> None:
        while not self.paused and self.sent < REPLIES:
            self.sent += 1
            self.conn.send(REPLY)

    def pause_writing(self, conn: Conn) -> None:
        self.trace.append("pause")
        self.paused = True

    def resume_writing(self, conn: Conn) -> None:
        self.trace.append("resume")
        self.paused = False
        self.produce()  # the natural way: go on at once, from inside the callback


def test_replies_sent_from_resume_writing_are_all_delivered() -> None:
    """Bug caught: the event mask computed from the pending bytes seen before
    resume_writing ran, so the replies it sent, once the backlog had drained to
    nothing, were never written (the connection unregistered, stalled for ever)."""
    loop = EventLoop()
    owner = Owner(loop)
    sock, peer = loopback_pair()  # the kernel's own buffers: drained at once, often
    handler = Producer()
    conn = Connection(owner, sock, None, make_decoder("length", 1 << 20), None, handler)
    want = REPLIES * (len(REPLY) + 4)
    received = 0
    most = 0
    try:
        conn.start()
        peer.setblocking(False)
        deadline = time.monotonic() + 30
        while received < want and time.monotonic() < deadline:
            loop.run_once(max_wait=0.05)
            most = max(most, conn.pending)
            # Between turns, output pending always means waiting to write.
            assert not conn.pending or conn._mask & EVENT_WRITE, "output pending, not written"
            for _ in range(64):  # bounded per turn
                try:
                    data = peer.recv(1 << 20)
                except BlockingIOError:
                    break
                assert data, "the server closed the connection"
                received += len(data)
    finally:
        peer.close()
        conn.abort()
        loop.run_once(max_wait=0)  # connection_lost
        loop.close()
    assert received == want, (received, want, conn.pending)
    assert handler.sent == REPLIES and "resume" in handler.trace
    assert handler.trace == ["pause", "resume"] * (len(handler.trace) // 2)
    assert most <= HIGH_WATER + len(REPLY) + 4
