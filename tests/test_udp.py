"""The UDP endpoint, deterministically: a fake datagram socket, the real loop, a fake clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from udp_support import A, B, C, FakeDatagramSocket, FakeLoop, endpoint

from muxsrv import Conn, Handler
from muxsrv.udp import MAX_DATAGRAM, QUEUE_ENTRY_OVERHEAD, UDP_BATCH, DatagramEndpoint


class Trace(Handler):
    """Numbers its datagrams; records every call in a shared trace."""

    trace: list[tuple[str, Any]]

    def __init__(self) -> None:
        self.count = 0

    def connection_made(self, conn: Conn) -> None:
        self.trace.append(("made", conn.peer))

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.count += 1
        if payload == b"raise":
            conn.send(b"sent before the raise")
            raise RuntimeError("boom")
        if payload == b"close":
            conn.send(b"bye")
            conn.close()
            self.trace.append(("closing", conn.peer))
            return
        if payload == b"validate":
            conn.peer_validated()
        if payload.startswith(b"size "):
            conn.send(b"x" * int(payload[5:]))
            return
        conn.send(b"%d %s" % (self.count, payload))

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self.trace.append(("lost", conn.peer))


def tracer() -> type[Trace]:
    return type("T", (Trace,), {"trace": []})


def test_function_handler_replies_to_each_sender(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    endpoint(fake, sock, function=bytes.upper)
    sock.arrive(A, b"hello", b"")
    sock.arrive(B, b"world")
    fake.run()
    assert sock.sent_to == [(b"HELLO", A), (b"", A), (b"WORLD", B)]


def test_reads_at_most_a_batch_per_wake_up(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    endpoint(fake, sock, function=bytes.upper)
    sock.arrive(A, *[b"%d" % i for i in range(UDP_BATCH * 2 + 5)])
    fake.turn()
    assert sock.recv_calls == UDP_BATCH
    fake.turn()
    assert sock.recv_calls == UDP_BATCH * 2
    fake.run()
    assert len(sock.sent_to) == UDP_BATCH * 2 + 5
    assert sock.sent_to[-1] == (b"%d" % (UDP_BATCH * 2 + 4), A)


def test_one_instance_per_peer_in_order(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    cls = tracer()
    endpoint(fake, sock, factory=cls)
    sock.arrive(A, b"a", b"b")
    sock.arrive(B, b"c")
    sock.arrive(A, b"d")
    fake.run()
    assert sock.replies_to(A) == [b"1 a", b"2 b", b"3 d"]
    assert sock.replies_to(B) == [b"1 c"]
    assert cls.trace == [("made", A), ("made", B)]


def test_idle_instances_expire_and_come_back_fresh(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    cls = tracer()
    ep = endpoint(fake, sock, factory=cls, idle_timeout=10.0)
    sock.arrive(A, b"a")
    sock.arrive(B, b"b")
    fake.run()
    fake.advance(6)
    sock.arrive(B, b"b")  # B stays active
    fake.run()
    fake.advance(5)  # A silent 11 s > 10: gone; B 5 s: kept
    assert cls.trace == [("made", A), ("made", B), ("lost", A)]
    assert ep.peers is not None and A not in ep.peers and B in ep.peers
    sock.arrive(A, b"again")
    fake.run()
    assert sock.replies_to(A) == [b"1 a", b"1 again"]  # a fresh instance counts from 1
    fake.advance(20)
    assert cls.trace[-2:] == [("lost", B), ("lost", A)]  # the oldest first
    assert len(ep.peers) == 0


def test_work_in_progress_keeps_an_idle_instance(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    conns: list[Conn] = []

    class Busy(Handler):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            conn.work_started()
            conns.append(conn)

    ep = endpoint(fake, sock, factory=Busy, idle_timeout=1.0)
    sock.arrive(A, b"work")
    fake.run()
    fake.advance(5)
    assert ep.peers is not None and A in ep.peers
    sock.arrive(B, b"b")  # B is newer than A ...
    fake.run()
    conns[0].work_done()  # ... until A's work is done: activity, A is the newest
    assert list(ep.peers._peers) == [B, A]
    fake.advance(0.5)
    assert A in ep.peers  # not expired at once for the time it was busy
    fake.advance(2)
    assert A not in ep.peers


def test_peer_bound_drops_the_least_recently_active(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    cls = tracer()
    ep = endpoint(fake, sock, factory=cls, max_peers=2)
    sock.arrive(A, b"1")
    sock.arrive(B, b"2")
    sock.arrive(A, b"3")  # A is now the most recent
    sock.arrive(C, b"4")  # full: B goes
    fake.run()
    assert cls.trace == [("made", A), ("made", B), ("lost", B), ("made", C)]
    assert ep.peers is not None and len(ep.peers) == 2 and B not in ep.peers
    assert ep.dropped()["peer table full"] == 1
    assert sock.replies_to(C) == [b"1 4"]


def test_handler_error_sends_nothing_and_the_instance_goes_on(
    fake: FakeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    sock = FakeDatagramSocket()
    cls = tracer()
    ep = endpoint(fake, sock, factory=cls)
    with caplog.at_level(logging.ERROR, "muxsrv"):
        sock.arrive(A, b"raise", b"after")
        fake.run()
    assert sock.replies_to(A) == [b"2 after"]  # same instance: its count went on
    assert "handler message_received failed" in caplog.text and "RuntimeError" in caplog.text
    assert ep.dropped()["handler error"] == 1
    assert ("lost", A) not in cls.trace


def test_function_handler_error_sends_nothing(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()

    def picky(payload: bytes) -> bytes:
        if payload == b"bad":
            raise ValueError("bad")
        return payload

    ep = endpoint(fake, sock, function=picky)
    sock.arrive(A, b"bad", b"good")
    fake.run()
    assert sock.sent_to == [(b"good", A)]
    assert ep.counts["handler error"] == 1


def test_close_ends_the_instance_from_the_loop(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    cls = tracer()
    endpoint(fake, sock, factory=cls)
    sock.arrive(A, b"close")
    fake.turn()
    sock.arrive(A, b"next")
    fake.run()
    # connection_lost after the callback that closed it; the next datagram: a new instance.
    assert cls.trace == [("made", A), ("closing", A), ("lost", A), ("made", A)]
    assert sock.replies_to(A) == [b"bye", b"1 next"]


def test_queue_when_sendto_would_block_bounded(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p, max_queue=2 * (100 + QUEUE_ENTRY_OVERHEAD) + 50)
    sock.capacity = 0  # EAGAIN
    sock.arrive(A, *[b"%03d" % i + b"." * 97 for i in range(5)])  # 100 bytes each
    fake.run()
    assert sock.sent_to == []
    assert ep.queued == 2 * (100 + QUEUE_ENTRY_OVERHEAD)
    assert ep.counts["queue full (--udp-max-queue)"] == 3
    assert fake.selector.get_map()[sock].events & 2  # watching for writable
    sock.capacity = None
    fake.run()
    assert [data[:3] for data, _ in sock.sent_to] == [b"000", b"001"]  # in order
    assert ep.queued == 0
    assert not fake.selector.get_map()[sock].events & 2  # not any more
    sock.arrive(A, b"later")
    fake.run()
    assert sock.sent_to[-1] == (b"later", A)


def test_replies_wait_behind_queued_ones(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p)
    sock.capacity = 5
    sock.arrive(A, b"abcdefgh", b"xy")  # the first blocks; the second fits but must wait
    fake.turn()
    assert sock.sent_to == [] and ep.queued == 10 + 2 * QUEUE_ENTRY_OVERHEAD
    sock.capacity = None
    fake.run()
    assert sock.sent_to == [(b"abcdefgh", A), (b"xy", A)]


def test_amplification_function_handler(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p * 3 if p.startswith(b"3") else p * 4)
    sock.arrive(A, b"3abc", b"4abc")
    fake.run()
    assert sock.sent_to == [(b"3abc" * 3, A)]
    assert ep.counts["amplification"] == 1


def test_amplification_until_validated(fake: FakeLoop, caplog: pytest.LogCaptureFixture) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=tracer())
    with caplog.at_level(logging.WARNING, "muxsrv"):
        sock.arrive(A, b"size 22")  # 7 bytes: up to 21, kept
        sock.arrive(A, b"size 000040")  # 11 bytes: 21 + 33 = 54, 14 left
        sock.arrive(A, b"size 000048")  # 14 + 33 = 47: not 48
        fake.run()
    assert sock.replies_to(A) == [b"x" * 40]
    assert ep.dropped()["amplification"] == 2
    assert "amplification" in caplog.text
    sock.arrive(A, b"validate", b"size 60000")
    fake.run()
    assert sock.replies_to(A)[-1] == b"x" * 60000
    sock.arrive(B, b"size 60000")  # another peer: still capped
    fake.run()
    assert sock.replies_to(B) == []


def test_allowance_is_shared_by_the_replies_to_one_datagram(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()

    class Chatty(Handler):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            for _ in range(5):
                conn.send(payload)

    endpoint(fake, sock, factory=Chatty)
    sock.arrive(A, b"ab")
    fake.run()
    assert sock.replies_to(A) == [b"ab"] * 3  # 6 bytes of 5 x 2


def test_reply_over_65507_dropped_even_validated(
    fake: FakeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=tracer())
    with caplog.at_level(logging.WARNING, "muxsrv"):
        sock.arrive(A, b"validate", b"size %d" % (MAX_DATAGRAM + 1), b"size %d" % MAX_DATAGRAM)
        fake.run()
    assert [len(r) for r in sock.replies_to(A)] == [len(b"1 validate"), MAX_DATAGRAM]
    assert ep.dropped()["reply over 65,507 bytes"] == 1
    assert "reply over 65,507 bytes" in caplog.text


def test_protected_mode_drops_non_loopback_sources(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p, loopback_only=True)
    sock.arrive(("192.0.2.1", 5), b"no")
    sock.arrive(A, b"yes")
    fake.run()
    assert sock.sent_to == [(b"yes", A)]
    assert ep.counts["not loopback (protected mode)"] == 1


def test_close_ends_every_instance_and_the_socket(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    cls = tracer()
    ep = endpoint(fake, sock, factory=cls)
    sock.arrive(A, b"a")
    sock.arrive(B, b"b")
    fake.run()
    ep.close()
    assert cls.trace[2:] == [("lost", A), ("lost", B)]
    assert sock.closed and sock not in fake.selector.get_map()
    ep.close()  # twice: nothing more
    assert len(cls.trace) == 4 and sock.used_after_close == 0


def test_failing_connection_made_keeps_no_instance(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()

    lost: list[Any] = []

    class Fails(Handler):
        def connection_made(self, conn: Conn) -> None:
            conn.send(b"hi")
            raise RuntimeError("no")

        def message_received(self, conn: Conn, payload: bytes) -> None:
            raise AssertionError("not after a failed connection_made")

        def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
            lost.append(conn.peer)

    ep = endpoint(fake, sock, factory=Fails)
    sock.arrive(A, b"x")
    fake.run()
    assert sock.sent_to == [] and ep.peers is not None and len(ep.peers) == 0
    assert lost == [A]  # connection_lost exactly once, as over TCP


def test_closed_inside_a_batch_reads_no_more(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    eps: list[DatagramEndpoint] = []

    def stopper(payload: bytes) -> bytes:
        if payload == b"stop":
            eps[0].close()  # as a handler's signal to the server would
        return payload

    eps.append(endpoint(fake, sock, function=stopper))
    sock.arrive(A, b"a", b"stop", b"b")
    fake.run()
    assert sock.sent_to == [(b"a", A)]
    assert sock.used_after_close == 0 and "receive error" not in eps[0].counts


def test_send_error_is_only_logged_at_most_once_a_second(
    fake: FakeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    sock = FakeDatagramSocket()

    class Complains(Handler):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            conn.send_error("no such thing")

    endpoint(fake, sock, factory=Complains)
    with caplog.at_level(logging.INFO, "muxsrv.udp"):
        sock.arrive(A, *[b"x"] * 50)
        fake.run()
    assert sock.sent_to == []
    assert caplog.text.count("error not sent (datagrams have no error frame): no such") == 1
